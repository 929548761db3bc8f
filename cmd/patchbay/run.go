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
  rollout    rollout tools: validate PATH..., rollback MODEL --admin URL
  help       this text

Run 'patchbay <command> -h' for a command's flags.
`

// errUsage marks errors caused by bad command-line use (exit code 2).
var errUsage = errors.New("usage")

func exitCode(err error) int {
	if errors.Is(err, errUsage) || errors.Is(err, flag.ErrHelp) {
		return 2
	}
	return 1
}

// run dispatches a subcommand. Each subcommand parses its own flags into the
// Config of its package; libraries never see flags.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("no command: %w", errUsage)
	}
	switch args[0] {
	case "xds":
		return runXDS(ctx, args[1:], stderr)
	case "extproc":
		return runExtproc(ctx, args[1:], stderr)
	case "modelhost":
		return runModelhost(ctx, args[1:], stderr)
	case "rollout":
		return runRollout(ctx, args[1:], stdout, stderr)
	case "up":
		return runUp(ctx, args[1:], stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	default:
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("unknown command %q: %w", args[0], errUsage)
	}
}
