package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/patchbay-io/patchbay/modelhost"
)

var update = flag.Bool("update", false, "rewrite testdata/help/*.golden from the current help output")

// helpCommands are every command's help, each as the user asks for it.
var helpCommands = []struct {
	golden string
	args   []string
}{
	{"patchbay", []string{"--help"}},
	{"xds", []string{"xds", "--help"}},
	{"extproc", []string{"extproc", "--help"}},
	{"modelhost", []string{"modelhost", "--help"}},
	{"up", []string{"up", "--help"}},
	{"rollout", []string{"rollout", "--help"}},
	{"rollout-validate", []string{"rollout", "validate", "--help"}},
	{"rollout-rollback", []string{"rollout", "rollback", "--help"}},
	{"rollout-status", []string{"rollout", "status", "--help"}},
}

// runCLI runs the binary's real entry point and returns what main would exit with.
func runCLI(args ...string) (stdout, stderr string, code int) {
	var o, e bytes.Buffer
	if err := run(context.Background(), args, &o, &e); err != nil {
		fmt.Fprintln(&e, "patchbay:", err)
		code = exitCode(err)
	}
	return o.String(), e.String(), code
}

// machineFree replaces the one default that depends on the machine (128 x GOMAXPROCS).
func machineFree(s string) string {
	return strings.ReplaceAll(s, fmt.Sprintf("(default %d)", modelhost.DefaultMaxInflight()), "(default 128 x GOMAXPROCS)")
}

// TestHelpGolden: every command's help (--help, -h and `patchbay help <command>` alike)
// goes to stdout with exit status 0, starts with the one header style
// "Usage: patchbay <command> ...", and is the text in testdata/help (go test -update
// rewrites it).
func TestHelpGolden(t *testing.T) {
	for _, hc := range helpCommands {
		t.Run(hc.golden, func(t *testing.T) {
			stdout, stderr, code := runCLI(hc.args...)
			if code != 0 || stderr != "" {
				t.Fatalf("%q: exit status %d, stderr %q; want 0 and nothing on stderr", hc.args, code, stderr)
			}
			stdout = machineFree(stdout)
			path := filepath.Join("testdata", "help", hc.golden+".golden")
			if *update {
				if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, []byte(stdout), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test -update to write it)", err)
			}
			if stdout != string(want) {
				t.Errorf("%q help differs from %s (go test -update rewrites it):\n%s", hc.args, path, stdout)
			}
			wantHeader := "Usage: patchbay " + strings.Join(hc.args[:len(hc.args)-1], " ")
			if hc.golden == "patchbay" {
				wantHeader = "Usage: patchbay <command>"
			}
			if !strings.Contains(stdout, "\n"+wantHeader+" ") && !strings.HasPrefix(stdout, wantHeader+" ") {
				t.Errorf("%q help lacks the header %q:\n%s", hc.args, wantHeader, stdout)
			}
			// The other spellings give the same text.
			base := hc.args[:len(hc.args)-1]
			for _, alt := range [][]string{append(append([]string{}, base...), "-h"), append([]string{"help"}, base...)} {
				o, e, c := runCLI(alt...)
				if c != 0 || e != "" || machineFree(o) != stdout {
					t.Errorf("%q: exit status %d, stderr %q, stdout differs from %q's: %q", alt, c, e, hc.args, o)
				}
			}
		})
	}
}

// TestHelpListsSubcommandsAndArguments: the rollout help names its subcommands with
// their positional arguments, and the top-level help names every command.
func TestHelpListsSubcommandsAndArguments(t *testing.T) {
	out, _, _ := runCLI("rollout", "--help")
	for _, want := range []string{"validate PATH...", "rollback MODEL [flags]", "status [MODEL] [flags]"} {
		if !strings.Contains(out, want) {
			t.Errorf("rollout help lacks %q:\n%s", want, out)
		}
	}
	out, _, _ = runCLI("help")
	for _, want := range []string{"xds", "extproc", "modelhost", "up", "rollout"} {
		if !strings.Contains(out, "\n  "+want+" ") {
			t.Errorf("top-level help lacks the command %q:\n%s", want, out)
		}
	}
}

// TestUsageErrorsExit2WithUsage: an unknown flag, an unknown subcommand or a missing
// subcommand exits with status 2 and prints the usage of the command to stderr, never
// to stdout.
func TestUsageErrorsExit2WithUsage(t *testing.T) {
	for _, tc := range []struct {
		args   []string
		header string
	}{
		{[]string{"--bogus"}, "Usage: patchbay <command>"},
		{[]string{"nope"}, "Usage: patchbay <command>"},
		{[]string{}, "Usage: patchbay <command>"},
		{[]string{"xds", "--bogus"}, "Usage: patchbay xds [flags]"},
		{[]string{"extproc", "--bogus"}, "Usage: patchbay extproc [flags]"},
		{[]string{"modelhost", "--bogus"}, "Usage: patchbay modelhost [flags]"},
		{[]string{"modelhost", "--repository", "x", "--shadow-sample", "0"}, "Usage: patchbay modelhost [flags]"},
		{[]string{"modelhost", "--repository", "x", "--shadow-sample", "1.5"}, "Usage: patchbay modelhost [flags]"},
		{[]string{"up", "--bogus"}, "Usage: patchbay up [flags]"},
		{[]string{"rollout"}, "Usage: patchbay rollout <command>"},
		{[]string{"rollout", "nope"}, "Usage: patchbay rollout <command>"},
		{[]string{"rollout", "validate", "--bogus"}, "Usage: patchbay rollout validate [flags] PATH..."},
		{[]string{"rollout", "validate"}, "Usage: patchbay rollout validate [flags] PATH..."},
		{[]string{"rollout", "rollback", "--bogus"}, "Usage: patchbay rollout rollback MODEL [flags]"},
		{[]string{"rollout", "status", "--bogus"}, "Usage: patchbay rollout status [MODEL] [flags]"},
		{[]string{"xds", "--source", "files"}, "Usage: patchbay xds [flags]"},
	} {
		stdout, stderr, code := runCLI(tc.args...)
		if code != 2 || stdout != "" || !strings.Contains(stderr, tc.header) {
			t.Errorf("%q: exit status %d, stdout %q, stderr:\n%s\nwant status 2 and %q on stderr", tc.args, code, stdout, stderr, tc.header)
		}
	}
}
