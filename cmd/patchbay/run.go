package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
)

const usage = `patchbay routes machine-learning predictions to the right model version.

Usage: patchbay <command> [flags]

Commands:
  xds        xDS control plane: rollout files -> Envoy, ext_proc and proxyless gRPC config
  extproc    Envoy ext_proc router: sticky buckets and experiment arms per request
  modelhost  model host: Open Inference Protocol (REST + gRPC) over a model repository
  up         everything on this machine from examples/ (model hosts, xds, extproc, Envoy if found)
  rollout    rollout tools: validate PATH..., rollback MODEL [flags]
  help       this text; 'patchbay help <command>' is 'patchbay <command> --help'

Run 'patchbay <command> -h' for a command's arguments and flags.
`

// errUsage marks errors caused by bad command-line use (exit code 2).
var errUsage = errors.New("usage")

func exitCode(err error) int {
	if errors.Is(err, errUsage) {
		return 2
	}
	return 1
}

// run dispatches a subcommand. Each subcommand parses its own flags into the
// Config of its package; libraries never see flags. Help asked for (help, -h,
// --help, on any command) goes to stdout and is a success (exit status 0); a usage
// error prints the usage to stderr and exits with status 2.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	err := dispatch(ctx, args, stdout, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	return err
}

func dispatch(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("no command: %w", errUsage)
	}
	switch args[0] {
	case "xds":
		return runXDS(ctx, args[1:], stdout, stderr)
	case "extproc":
		return runExtproc(ctx, args[1:], stdout, stderr)
	case "modelhost":
		return runModelhost(ctx, args[1:], stdout, stderr)
	case "rollout":
		return runRollout(ctx, args[1:], stdout, stderr)
	case "up":
		return runUp(ctx, args[1:], stdout, stderr)
	case "help", "-h", "-help", "--help":
		if len(args) > 1 && args[0] == "help" && args[1] != "help" {
			// patchbay help rollout validate == patchbay rollout validate --help
			return dispatch(ctx, append(append([]string{}, args[1:]...), "--help"), stdout, stderr)
		}
		fmt.Fprint(stdout, usage)
		return nil
	default:
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("unknown command %q: %w", args[0], errUsage)
	}
}
