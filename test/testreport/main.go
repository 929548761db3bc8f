// Command testreport reads `go test -json` on stdin and prints what a person needs from a
// whole-repository run: each package's result line, the full output of every failed test
// and of every build failure, and at the end every skipped test with its reason, so a skip
// (a real component that could not be had, Envoy absent) is never silent. It exits 1 when
// anything failed. `make test` pipes the suite through it.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
)

type event struct {
	Action     string
	Package    string
	Test       string
	Output     string
	ImportPath string
}

type key struct{ pkg, test string }

func main() {
	os.Exit(run(os.Stdin, os.Stdout))
}

func run(in io.Reader, out io.Writer) int {
	var (
		buf                   = map[key][]string{}
		build                 = map[string][]string{}
		skips                 []string
		passed, failed, nskip int
		bad                   bool
	)
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if err := json.Unmarshal(line, &e); err != nil || e.Action == "" {
			fmt.Fprintln(out, string(line)) // not an event (e.g. a go vet or go build message): pass it on
			continue
		}
		switch e.Action {
		case "build-output":
			build[e.ImportPath] = append(build[e.ImportPath], e.Output)
		case "build-fail":
			fmt.Fprint(out, strings.Join(build[e.ImportPath], ""))
			bad = true
		case "output":
			k := key{e.Package, e.Test}
			if e.Test == "" {
				if keepPackageLine(e.Output) {
					fmt.Fprint(out, e.Output)
				}
				continue
			}
			buf[k] = append(buf[k], e.Output)
		case "pass", "fail", "skip":
			if e.Test == "" {
				if e.Action == "fail" {
					bad = true
				}
				continue
			}
			k := key{e.Package, e.Test}
			switch e.Action {
			case "pass":
				passed++
			case "fail":
				failed++
				bad = true
				fmt.Fprint(out, strings.Join(buf[k], ""))
			case "skip":
				nskip++
				skips = append(skips, fmt.Sprintf("%s %s: %s", e.Package, e.Test, reason(buf[k])))
			}
			delete(buf, k)
		}
	}
	if err := sc.Err(); err != nil {
		fmt.Fprintln(out, "testreport:", err)
		bad = true
	}
	sort.Strings(skips)
	fmt.Fprintf(out, "\nskipped (%d):\n", len(skips))
	for _, s := range skips {
		fmt.Fprintln(out, "  "+s)
	}
	fmt.Fprintf(out, "%d passed, %d failed, %d skipped\n", passed, failed, nskip)
	if bad {
		return 1
	}
	return 0
}

// keepPackageLine keeps a package's result lines ("ok", "FAIL", "?", panics) and drops the
// bare PASS that -json adds.
func keepPackageLine(s string) bool {
	t := strings.TrimSpace(s)
	return t != "" && t != "PASS" && !strings.HasPrefix(t, "=== ")
}

// reason is the skip message: the test's output less the framework's own lines.
func reason(lines []string) string {
	var parts []string
	for _, l := range lines {
		t := strings.TrimSpace(l)
		if t == "" || strings.HasPrefix(t, "=== ") || strings.HasPrefix(t, "--- SKIP") {
			continue
		}
		parts = append(parts, t)
	}
	if len(parts) == 0 {
		return "(no reason given)"
	}
	return strings.Join(parts, " ")
}
