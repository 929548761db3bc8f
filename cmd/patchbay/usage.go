package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
)

// plural says "1 version", "2 versions", "0 versions".
func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

// newFlags returns the flag set of "patchbay <name>" with the one usage style of every
// command: "Usage: patchbay <name> <synopsis>", a paragraph saying what it does, then
// its flags.
func newFlags(name, synopsis, about string) *flag.FlagSet {
	fs := flag.NewFlagSet("patchbay "+name, flag.ContinueOnError)
	fs.Usage = func() {
		w := fs.Output()
		fmt.Fprintf(w, "Usage: patchbay %s %s\n\n%s\n", name, synopsis, about)
		n := 0
		fs.VisitAll(func(*flag.Flag) { n++ })
		if n > 0 {
			fmt.Fprint(w, "\nFlags:\n")
			fs.PrintDefaults()
		}
	}
	return fs
}

// parseFlags parses args. Asked for (-h, -help, --help), the usage goes to stdout and
// the error is flag.ErrHelp, which run turns into exit status 0; on a bad flag the
// message and the usage go to stderr and the error is a usage error (exit status 2).
// Later fs.Usage calls write to stderr.
func parseFlags(fs *flag.FlagSet, args []string, stdout, stderr io.Writer) error {
	var buf bytes.Buffer
	fs.SetOutput(&buf)
	err := fs.Parse(args)
	fs.SetOutput(stderr)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, flag.ErrHelp):
		_, _ = stdout.Write(buf.Bytes())
		return flag.ErrHelp
	default:
		_, _ = stderr.Write(buf.Bytes())
		return fmt.Errorf("%w: %w", errUsage, err)
	}
}
