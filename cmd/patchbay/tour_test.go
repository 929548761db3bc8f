package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	xdsresolver "google.golang.org/grpc/xds"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/test/harness"
)

// TestUpTourLinesRun runs every command `patchbay up` prints under "Try:" (without
// Envoy, so the lines through Envoy are not printed): curl lines with the real curl
// through bash, exactly as printed; grpcurl lines (grpcurl is not needed here) split
// into words by bash and replayed with grpc-go: same target, -H headers, method and
// -d body (protojson into the OIP request). The proxyless lines dial xds:///<model>
// with the bootstrap up wrote, and there is one for every example model.
func TestUpTourLinesRun(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and starts the patchbay binary")
	}
	if _, err := exec.LookPath("bash"); err != nil {
		t.Skip("bash is needed to split the printed lines as a shell does")
	}
	u := startUpForTest(t)
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	lines := tryLines(t, u.banner)
	if !strings.Contains(u.banner, "go install github.com/fullstorydev/grpcurl/cmd/grpcurl@latest") {
		t.Error("banner does not say how to install grpcurl")
	}
	// The rollback line needs an earlier split: make the edit the banner suggests first.
	m := regexp.MustCompile(`or edit (\S+) \(live`).FindStringSubmatch(u.banner)
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

	var proxyless []string
	ran := 0
	for _, line := range lines {
		switch {
		case strings.HasPrefix(line, "curl "):
			runCurlLine(t, root, line)
		case strings.Contains(line, "grpcurl "):
			model := replayGRPCurl(t, root, line)
			if strings.Contains(line, "xds:///") {
				proxyless = append(proxyless, model)
			}
		default:
			t.Errorf("printed line is neither curl nor grpcurl, so this test cannot run it: %s", line)
			continue
		}
		ran++
	}
	if ran < 6 {
		t.Errorf("ran %d lines, want at least 6:\n%s", ran, strings.Join(lines, "\n"))
	}
	files, _ := filepath.Glob(filepath.Join(root, "examples", "rollouts", "*.yaml"))
	var models []string
	for _, f := range files {
		models = append(models, strings.TrimSuffix(filepath.Base(f), ".yaml"))
	}
	slices.Sort(models)
	slices.Sort(proxyless)
	if len(models) == 0 || !slices.Equal(models, proxyless) {
		t.Errorf("proxyless lines dial %v, want one per example model %v", proxyless, models)
	}
}

// tryLines are the command lines under "Try:" (comments left out).
func tryLines(t *testing.T, banner string) []string {
	t.Helper()
	_, try, ok := strings.Cut(banner, "\nTry:\n")
	if !ok {
		t.Fatalf("banner has no Try: section:\n%s", banner)
	}
	var out []string
	for _, l := range strings.Split(try, "\n") {
		if !strings.HasPrefix(l, "  ") {
			break // the section ends at the first unindented line
		}
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			out = append(out, l)
		}
	}
	return out
}

// runCurlLine runs a printed curl line with bash, as printed, and fails on a non-zero
// exit or an OIP/admin error answer. A rollback retries (bounded) until the control
// plane has applied the edit that gives it an earlier split.
func runCurlLine(t *testing.T, root, line string) {
	t.Helper()
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("curl is not on PATH")
	}
	var out []byte
	var err error
	for range 50 {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		cmd := exec.CommandContext(ctx, "bash", "-c", line)
		cmd.Dir = root
		out, err = cmd.CombinedOutput()
		cancel()
		if err == nil && !strings.Contains(string(out), `"error"`) {
			t.Logf("ran: %s\n  -> %.200s", line, out)
			return
		}
		if !strings.Contains(line, "/rollback") {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Errorf("printed line failed: %s\n  err=%v\n  output: %s", line, err, out)
}

// replayGRPCurl splits a printed grpcurl line with bash (quotes and $(...) as a shell
// does them), checks the flags and files it names, and makes the same call with
// grpc-go. It returns the request's model name.
func replayGRPCurl(t *testing.T, root, line string) string {
	t.Helper()
	env, cmdline, _ := strings.Cut(line, "grpcurl ")
	env = strings.TrimSpace(env)
	out, err := exec.Command("bash", "-c", "printf '%s\\0' "+cmdline).Output()
	if err != nil {
		t.Fatalf("bash cannot split %q: %v", line, err)
	}
	words := strings.Split(strings.TrimSuffix(string(out), "\x00"), "\x00")
	var md []string
	var body, importPath, proto string
	var pos []string
	for i := 0; i < len(words); i++ {
		w := words[i]
		next := func() string {
			if i+1 >= len(words) {
				t.Fatalf("%s has no value in %q", w, line)
			}
			i++
			return words[i]
		}
		switch w {
		case "-plaintext", "-v":
		case "-H":
			k, v, ok := strings.Cut(next(), ":")
			if !ok {
				t.Fatalf("bad -H in %q", line)
			}
			md = append(md, strings.TrimSpace(k), strings.TrimSpace(v))
		case "-d":
			body = next()
		case "-import-path":
			importPath = next()
		case "-proto":
			proto = next()
		default:
			if strings.HasPrefix(w, "-") {
				t.Fatalf("grpcurl flag %s in %q is not replayed by this test", w, line)
			}
			pos = append(pos, w)
		}
	}
	if _, err := os.Stat(filepath.Join(root, importPath, proto)); err != nil || proto == "" {
		t.Errorf("grpcurl line names proto %q in %q, not found from the repository root: %v", proto, importPath, err)
	}
	if len(pos) != 2 {
		t.Fatalf("want TARGET METHOD in %q, got %q", line, pos)
	}
	target, method := pos[0], pos[1]
	var req oip.ModelInferRequest
	if err := protojson.Unmarshal([]byte(body), &req); err != nil {
		t.Fatalf("-d body of %q is not an OIP ModelInferRequest: %v", line, err)
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if strings.HasPrefix(target, "xds:///") {
		bootstrap, ok := strings.CutPrefix(env, "GRPC_XDS_BOOTSTRAP=")
		if !ok {
			t.Fatalf("proxyless line does not set GRPC_XDS_BOOTSTRAP: %s", line)
		}
		js, err := os.ReadFile(bootstrap)
		if err != nil {
			t.Fatal(err)
		}
		r, err := xdsresolver.NewXDSResolverWithConfigForTesting(js)
		if err != nil {
			t.Fatalf("grpc-go rejects up's xDS bootstrap: %v", err)
		}
		opts = append(opts, grpc.WithResolvers(r))
	} else if env != "" {
		t.Errorf("unexpected prefix %q on %s", env, line)
	}
	conn, err := grpc.NewClient(target, opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, md...)
	var resp oip.ModelInferResponse
	if err := conn.Invoke(ctx, "/"+method, &req, &resp, grpc.WaitForReady(true)); err != nil {
		t.Errorf("printed line failed: %s\n  %v", line, err)
		return req.ModelName
	}
	if resp.ModelName != req.ModelName || len(resp.Outputs) == 0 {
		t.Errorf("%s answered %v", line, &resp)
	}
	t.Logf("replayed: %s\n  -> model %s version %s", line, resp.ModelName, resp.ModelVersion)
	return req.ModelName
}

// TestUpStopsUnderGoRun runs the README's `go tool patchbay up` (and `go run
// ./cmd/patchbay up`) as a real go process and checks that everything stops when:
//   - the go tool process gets SIGINT or SIGTERM (go tool forwards every signal to the
//     program it runs: runBuiltTool in cmd/go/internal/tool/tool.go);
//   - the go run process gets SIGTERM (which kills the go command alone: up notices its
//     parent is gone);
//   - up's own pid, printed in the banner, gets SIGINT (the go command ignores SIGINT
//     sent to go run alone: cmd/go/internal/base/signal.go).
func TestUpStopsUnderGoRun(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go tool / go run and the patchbay parts")
	}
	toGo := func(sig syscall.Signal) func(*testing.T, *exec.Cmd, int) {
		return func(t *testing.T, goCmd *exec.Cmd, _ int) {
			if err := goCmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
		}
	}
	goTool := []string{"tool", "patchbay", "up"}
	goRun := []string{"run", "./cmd/patchbay", "up"}
	for _, tc := range []struct {
		name   string
		goArgs []string
		signal func(t *testing.T, goCmd *exec.Cmd, upPID int)
	}{
		{"SIGINT to go tool", goTool, toGo(syscall.SIGINT)},
		{"SIGTERM to go tool", goTool, toGo(syscall.SIGTERM)},
		{"SIGTERM to go run", goRun, toGo(syscall.SIGTERM)},
		{"SIGINT to the pid up prints under go run", goRun, func(t *testing.T, _ *exec.Cmd, upPID int) {
			if err := syscall.Kill(upPID, syscall.SIGINT); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root, err := filepath.Abs(filepath.Join("..", ".."))
			if err != nil {
				t.Fatal(err)
			}
			args := upGoRunArgs(t, root)
			stdout, stderr := new(harness.Buffer), new(harness.Buffer)
			goRun := exec.Command("go", append(slices.Clone(tc.goArgs), args...)...)
			goRun.Dir = root
			goRun.Stdout, goRun.Stderr = stdout, stderr
			goRun.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			if err := goRun.Start(); err != nil {
				t.Fatal(err)
			}
			waited := make(chan error, 1)
			go func() { waited <- goRun.Wait() }()
			var pids map[string]int
			t.Cleanup(func() {
				// Whatever the outcome, leave nothing running: go run's group, then the parts.
				_ = syscall.Kill(-goRun.Process.Pid, syscall.SIGKILL)
				for _, pid := range pids {
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
				if t.Failed() {
					t.Logf("stdout:\n%s\nstderr:\n%s", stdout.String(), stderr.String())
				}
			})
			deadline := time.Now().Add(3 * time.Minute) // go run compiles first
			for !strings.Contains(stdout.String(), "Ctrl-C stops everything") {
				if time.Now().After(deadline) {
					t.Fatalf("go %s did not come up within 3m", strings.Join(tc.goArgs, " "))
				}
				select {
				case err := <-waited:
					t.Fatalf("go %s exited before up was up: %v", strings.Join(tc.goArgs, " "), err)
				case <-time.After(200 * time.Millisecond):
				}
			}
			m := regexp.MustCompile(`kill -INT (\d+)`).FindStringSubmatch(stdout.String())
			if m == nil {
				t.Fatal("banner does not print up's pid")
			}
			upPID, _ := strconv.Atoi(m[1])
			pids = startedPIDs(stderr.String())
			// Two model hosts, xds, extproc, and redis when redis-server is on PATH.
			want := 4
			if _, err := exec.LookPath("redis-server"); err == nil {
				want = 5
			}
			if len(pids) != want {
				t.Fatalf("started %v, want %d parts", pids, want)
			}
			pids["up"] = upPID
			tc.signal(t, goRun, upPID)
			for name, pid := range pids {
				gone := false
				for range 150 { // 30s at most: a part gets --stop-grace 5s before SIGKILL
					if processGone(pid) {
						gone = true
						break
					}
					time.Sleep(200 * time.Millisecond)
				}
				if !gone {
					t.Errorf("%s (pid %d) still running after the signal", name, pid)
				}
			}
			select {
			case <-waited:
			case <-time.After(30 * time.Second):
				t.Errorf("go %s did not exit", tc.goArgs[0])
			}
		})
	}
}

// processGone: no such process, or a zombie waiting to be reaped.
func processGone(pid int) bool {
	if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
		return true
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return os.IsNotExist(err)
	}
	_, rest, _ := strings.Cut(string(b), ") ")
	return strings.HasPrefix(rest, "Z")
}

// upGoRunArgs are up's flags for free ports, with the example rollouts copied and
// moved to the model hosts' ports.
func upGoRunArgs(t *testing.T, root string) []string {
	t.Helper()
	hostHTTP := []string{freeAddr(t), freeAddr(t)}
	hostGRPC := []string{freeAddr(t), freeAddr(t)}
	rollouts := t.TempDir()
	files, _ := filepath.Glob(filepath.Join(root, "examples", "rollouts", "*.yaml"))
	moved := strings.NewReplacer("127.0.0.1:9001", hostHTTP[0], "127.0.0.1:9002", hostHTTP[1], "127.0.0.1:9011", hostGRPC[0], "127.0.0.1:9012", hostGRPC[1])
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(rollouts, filepath.Base(f)), []byte(moved.Replace(string(b))), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return []string{"--rollouts", rollouts, "--envoy", "off",
		"--modelhost-http", strings.Join(hostHTTP, ","), "--modelhost-grpc", strings.Join(hostGRPC, ","),
		"--modelhost-admin", freeAddr(t) + "," + freeAddr(t),
		"--xds-listen", freeAddr(t), "--xds-admin", freeAddr(t),
		"--extproc-listen", freeAddr(t), "--extproc-admin", freeAddr(t),
		"--edge-listener", freeAddr(t), "--sidecar-listener", freeAddr(t),
		"--stop-grace", "5s", "--log-level", "warn"}
}

// TestExampleCommentsMatchUpHostLayout checks the prose of examples/rollouts/ranker.yaml
// and examples/README.md about which host serves which version against what up
// actually gives each host from the example rollouts (on its default ports).
func TestExampleCommentsMatchUpHostLayout(t *testing.T) {
	examples := filepath.Join("..", "..", "examples")
	u := &upRun{cfg: upConfig{
		rollouts: filepath.Join(examples, "rollouts"), repository: filepath.Join(examples, "models"),
		hostHTTP: []string{"127.0.0.1:9001", "127.0.0.1:9002"}, hostGRPC: []string{"127.0.0.1:9011", "127.0.0.1:9012"},
	}, dir: t.TempDir(), log: &prefixLog{w: io.Discard}}
	u.hostRepositories()
	served := func(host int, model string) []string {
		var out []string
		for _, mv := range strings.Split(u.served[host], ", ") {
			if m, v, ok := strings.Cut(mv, "/"); ok && m == model {
				out = append(out, v)
			}
		}
		return out
	}
	b, err := os.ReadFile(filepath.Join(examples, "rollouts", "ranker.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	comment := strings.Join(strings.Fields(strings.ReplaceAll(string(b), "#", " ")), " ")
	m := regexp.MustCompile(`host a serves ranker (v\d+) only, host b ranker (v\d+) only`).FindStringSubmatch(comment)
	if m == nil {
		t.Fatal("ranker.yaml's comment no longer says which host serves which version")
	}
	if got := served(0, "ranker"); !slices.Equal(got, []string{m[1]}) {
		t.Errorf("ranker.yaml says host a serves ranker %s only; up gives it %v", m[1], got)
	}
	if got := served(1, "ranker"); !slices.Equal(got, []string{m[2]}) {
		t.Errorf("ranker.yaml says host b serves ranker %s only; up gives it %v", m[2], got)
	}
	readme, err := os.ReadFile(filepath.Join(examples, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	text := strings.Join(strings.Fields(string(readme)), " ")
	for i, host := range []string{"a", "b"} {
		var parts []string
		for _, model := range []string{"ranker", "churn", "recs"} {
			parts = append(parts, model+" "+strings.Join(served(i, model), "/"))
		}
		want := strings.Join(parts[:2], ", ") + " and " + parts[2]
		if !strings.Contains(text, host+" ") || !strings.Contains(text, want) {
			t.Errorf("examples/README.md does not say host %s serves %q", host, want)
		}
	}
}
