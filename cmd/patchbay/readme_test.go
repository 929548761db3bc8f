package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestReadmeTourLinesRun runs the command lines of README.md's "A five-minute tour" sh
// block and of examples/README.md's code blocks against `patchbay up --envoy off` on free
// ports: the README's default addresses (up's flag defaults) are mapped to the ports the
// test gave up, "$TOKEN_FILE" to the token file up wrote, and each line is run with bash
// from the repository root. curl must answer 2xx with a body (curl is run with -f and
// bash with pipefail, so a 404 or a grep that matches nothing fails the line). Lines
// through Envoy (marked (Envoy), or on its ports :10000, :15001, :9901, :9902) cannot
// run without Envoy and are logged as skipped, as is the line that starts up itself.
func TestReadmeTourLinesRun(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and starts the patchbay binary")
	}
	for _, tool := range []string{"bash", "curl"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is needed to run the README's lines", tool)
		}
	}
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, tour, ok := strings.Cut(string(readme), "A five-minute tour")
	if !ok {
		t.Fatal(`README.md has no "A five-minute tour" section`)
	}
	tourLines := codeLines(tour, true)
	if len(tourLines) == 0 {
		t.Fatal("README.md's tour has no ```sh block")
	}
	examples, err := os.ReadFile(filepath.Join(root, "examples", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	lines := append(tourLines, codeLines(string(examples), false)...)

	u := startUpForTest(t)
	m := regexp.MustCompile(`\$\(cat (\S+)\)`).FindStringSubmatch(u.banner)
	if m == nil {
		t.Fatal("banner names no token file")
	}
	tokenFile := m[1]
	var pairs []string
	for def, addr := range map[string]string{
		"9001": u.hostHTTP[0], "9002": u.hostHTTP[1], "9011": u.hostGRPC[0], "9012": u.hostGRPC[1],
		"9021": u.hostAdmin[0], "9022": u.hostAdmin[1], "18000": u.xdsListen, "18001": u.xdsAdmin,
		"18080": u.extprocListen, "18081": u.extprocAdmin,
	} {
		pairs = append(pairs, "localhost:"+def, addr, "127.0.0.1:"+def, addr)
	}
	pairs = append(pairs, `"$TOKEN_FILE"`, `'`+tokenFile+`'`, "$TOKEN_FILE", `'`+tokenFile+`'`)
	moved := strings.NewReplacer(pairs...)

	// The rollback line needs an earlier split: make the edit the tour suggests first.
	m = regexp.MustCompile(`or edit (\S+) \(live`).FindStringSubmatch(u.banner)
	if m == nil {
		t.Fatal("banner does not name the rollout directory to edit")
	}
	rankerFile := filepath.Join(m[1], "ranker.yaml")
	b, err := os.ReadFile(rankerFile)
	if err != nil {
		t.Fatal(err)
	}
	edited := strings.Replace(strings.Replace(string(b), "v7: 90", "v7: 50", 1), "v8: 10", "v8: 50", 1)
	if edited == string(b) {
		t.Fatal("ranker.yaml has no 90/10 split to edit")
	}
	if err := os.WriteFile(rankerFile, []byte(edited), 0o600); err != nil {
		t.Fatal(err)
	}

	ran, sawRollback := 0, false
	for _, line := range lines {
		switch {
		case regexp.MustCompile(`\(Envoy\)|:(10000|15001|9901|9902)\b`).MatchString(line):
			t.Logf("skipped (goes through Envoy, and this test runs up --envoy off): %s", line)
			continue
		case regexp.MustCompile(`^go (run \./cmd/patchbay|tool patchbay) up\b`).MatchString(line):
			t.Logf("skipped (starts up on the fixed ports; this test runs up on free ports, TestUpStopsUnderGoRun runs it under go run): %s", line)
			continue
		}
		run := moved.Replace(line)
		if strings.Contains(run, "grpcurl ") {
			replayGRPCurl(t, root, run)
		} else {
			runReadmeLine(t, root, line, run)
		}
		sawRollback = sawRollback || strings.Contains(line, "rollback")
		ran++
	}
	if ran < 4 || !sawRollback {
		t.Errorf("ran %d lines (rollback among them: %v), want at least 4 and the rollback:\n%s", ran, sawRollback, strings.Join(lines, "\n"))
	}
}

// codeLines are the command lines of a text's code blocks: ```sh blocks (only the
// first when first is set) and 4-space indented blocks, with backslash continuations
// joined and comments (whole-line and trailing "  # ...") left out.
func codeLines(text string, first bool) []string {
	var out []string
	var cur string
	in, prevBlank := false, true
	for _, l := range strings.Split(text, "\n") {
		trimmed := strings.TrimSpace(l)
		switch {
		case !in && (trimmed == "```sh" || trimmed == "```bash"):
			in = true
			continue
		case in && trimmed == "```":
			in = false
			if first {
				return out
			}
			continue
		case !in && strings.HasPrefix(l, "    ") && prevBlank && trimmed != "":
			// an indented code line: the block continues while lines stay indented
		case !in:
			prevBlank = trimmed == ""
			continue
		}
		if strings.HasPrefix(trimmed, "#") || trimmed == "" {
			continue
		}
		if i := strings.Index(trimmed, "  #"); i >= 0 && !in {
			trimmed = strings.TrimSpace(trimmed[:i])
		}
		if s, ok := strings.CutSuffix(trimmed, `\`); ok {
			cur += s
			continue
		}
		out = append(out, cur+trimmed)
		cur = ""
	}
	return out
}

// runReadmeLine runs one line with bash from the repository root, curl as curl -f and
// with pipefail, and fails on a non-zero exit, an empty output or an error answer. A
// rollback retries (bounded) until the control plane has applied the earlier split.
func runReadmeLine(t *testing.T, root, line, run string) {
	t.Helper()
	var out []byte
	var err error
	for range 50 {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute) // go run compiles first
		cmd := exec.CommandContext(ctx, "bash", "-o", "pipefail", "-c", `curl() { command curl -f "$@"; }`+"\n"+run)
		cmd.Dir = root
		out, err = cmd.CombinedOutput()
		cancel()
		if err == nil && strings.TrimSpace(string(out)) != "" && !strings.Contains(string(out), `"error"`) {
			t.Logf("ran: %s\n  as: %s\n  -> %.200s", line, run, out)
			return
		}
		if !strings.Contains(line, "rollback") {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Errorf("README line failed: %s\n  as: %s\n  err=%v\n  output: %s", line, run, err, out)
}
