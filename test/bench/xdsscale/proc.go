// Package xdsscale measures the control plane against the number of models it serves:
// time to ready, memory of the shipped binary, and what a one-model edit costs an Envoy
// delta ADS client (time, route bytes), with the route matchers a request walks. The
// helpers here (rollout files, the binary as a child process, /proc readings, the route
// walk) are shared with test/bench/fanout.
package xdsscale

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Large reports whether the large sizes were asked for (PATCHBAY_BENCH_LARGE=1).
func Large() bool { return os.Getenv("PATCHBAY_BENCH_LARGE") == "1" }

var (
	buildOnce sync.Once
	buildBin  string
	buildErr  error
)

// Binary builds ./cmd/patchbay once per test process and returns its path.
func Binary(tb testing.TB) string {
	tb.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "patchbay-bench-bin-")
		if err != nil {
			buildErr = err
			return
		}
		buildBin = filepath.Join(dir, "patchbay")
		root, err := repoRoot()
		if err != nil {
			buildErr = err
			return
		}
		cmd := exec.Command("go", "build", "-o", buildBin, "./cmd/patchbay")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/patchbay: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		tb.Fatal(buildErr)
	}
	return buildBin
}

func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		up := filepath.Dir(dir)
		if up == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = up
	}
}

// Versions is the number of versions of every model.
const Versions = 5

// ModelName is the i-th model's name.
func ModelName(i int) string { return fmt.Sprintf("model-%05d", i) }

// ModelDoc is model i's rollout: Versions versions, each with one REST endpoint (and a
// gRPC one when withGRPC) on its own IP address (no DNS); traffic on two of them, a
// canary (edit 0: v1 90%, v2 10%; edit e moves e%80 points from v1 to v2), the other three
// kept at 0 for rollbacks (their clusters exist, they get no routes of their own).
func ModelDoc(i, edit int, withGRPC bool) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: %s\nversions:\n", ModelName(i))
	for v := 1; v <= Versions; v++ {
		ip := fmt.Sprintf("10.%d.%d.%d", i/250, i%250, v)
		fmt.Fprintf(&b, "  - name: v%d\n    endpoints: [\"%s:8000\"]\n", v, ip)
		if withGRPC {
			fmt.Fprintf(&b, "    grpcEndpoints: [\"%s:9000\"]\n", ip)
		}
	}
	shift := edit % 80
	fmt.Fprintf(&b, "traffic: {v1: %d, v2: %d, v3: 0, v4: 0, v5: 0}\n", 90-shift, 10+shift)
	return b.String()
}

// WriteModels writes one rollout file per model into dir: REST only, except the models
// listed in withGRPC, which serve gRPC too.
func WriteModels(tb testing.TB, dir string, models int, withGRPC ...int) {
	tb.Helper()
	for i := 0; i < models; i++ {
		if err := os.WriteFile(filepath.Join(dir, ModelName(i)+".yaml"), []byte(ModelDoc(i, 0, slices.Contains(withGRPC, i))), 0o644); err != nil {
			tb.Fatal(err)
		}
	}
}

// EditModel rewrites model i's file with split edit, atomically (temp file, rename).
func EditModel(tb testing.TB, dir string, i, edit int, withGRPC bool) {
	tb.Helper()
	tmp := filepath.Join(dir, "."+ModelName(i)+".tmp")
	if err := os.WriteFile(tmp, []byte(ModelDoc(i, edit, withGRPC)), 0o644); err != nil {
		tb.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, ModelName(i)+".yaml")); err != nil {
		tb.Fatal(err)
	}
}

// Proc is a control plane running as its own process (the shipped binary).
type Proc struct {
	Cmd   *exec.Cmd
	ADS   string // host:port of ADS
	Admin string // host:port of the admin API
	// Started is when the process was started; Ready the time from then to /readyz 200.
	Started time.Time
	Ready   time.Duration

	bin  string
	args []string
	log  *os.File
	done chan struct{}
}

func freePort(tb testing.TB) string {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// HealthOff is the flag the benchmarks add to the shipped defaults: the version prober
// would probe every version of every model against endpoints that do not exist; its cost
// grows with versions, not with clients or edits, and would blur both.
const HealthOff = "--version-health-interval=0"

// Start runs `patchbay xds --rollouts dir` (plus extra flags) and waits (bounded by
// timeout) until /readyz answers 200. The process is stopped when the test ends.
func Start(tb testing.TB, bin, dir string, timeout time.Duration, extra ...string) *Proc {
	tb.Helper()
	p := &Proc{ADS: freePort(tb), Admin: freePort(tb), bin: bin}
	p.args = append([]string{"xds", "--rollouts", dir, "--listen", p.ADS, "--admin", p.Admin, "--log-level", "warn"}, extra...)
	logf, err := os.Create(filepath.Join(tb.TempDir(), "xds.log"))
	if err != nil {
		tb.Fatal(err)
	}
	p.log = logf
	tb.Cleanup(func() {
		p.stop(syscall.SIGTERM)
		logf.Close()
	})
	p.launch(tb, timeout)
	return p
}

func (p *Proc) launch(tb testing.TB, timeout time.Duration) {
	tb.Helper()
	p.Cmd = exec.Command(p.bin, p.args...)
	p.Cmd.Stdout, p.Cmd.Stderr = p.log, p.log
	p.Started = time.Now()
	if err := p.Cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	done := make(chan struct{})
	p.done = done
	cmd := p.Cmd
	go func() { cmd.Wait(); close(done) }()
	client := &http.Client{Timeout: time.Second}
	for time.Since(p.Started) < timeout {
		select {
		case <-done:
			b, _ := os.ReadFile(p.log.Name())
			tb.Fatalf("patchbay xds exited before ready:\n%s", b)
		default:
		}
		resp, err := client.Get("http://" + p.Admin + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				p.Ready = time.Since(p.Started)
				return
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	tb.Fatalf("patchbay xds not ready within %v", timeout)
}

// stop signals the process and waits for it (SIGKILL after 10 s).
func (p *Proc) stop(sig syscall.Signal) {
	if p.Cmd == nil || p.Cmd.Process == nil {
		return
	}
	p.Cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.Cmd.Process.Kill()
		<-p.done
	}
}

// Kill kills the process (SIGKILL: no graceful stream close) and waits for it to exit.
func (p *Proc) Kill() { p.stop(syscall.SIGKILL) }

// Restart starts the process again with the same arguments (same ports, same rollout
// directory) and waits until /readyz answers 200.
func (p *Proc) Restart(tb testing.TB, timeout time.Duration) { p.launch(tb, timeout) }

// Mem is a process's resident set (VmRSS) and its peak (VmHWM), in bytes.
type Mem struct{ RSS, HWM float64 }

// ReadMem reads /proc/<pid>/status.
func ReadMem(pid int) (Mem, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return Mem{}, err
	}
	var m Mem
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		kb, err := strconv.ParseFloat(f[1], 64)
		if err != nil {
			continue
		}
		switch f[0] {
		case "VmRSS:":
			m.RSS = kb * 1024
		case "VmHWM:":
			m.HWM = kb * 1024
		}
	}
	return m, nil
}

// CPU is a process's user+system CPU time so far, from /proc/<pid>/stat.
func CPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	// Fields after the command name (which may hold spaces) in parentheses.
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	if len(f) < 13 {
		return 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	const hz = 100 // USER_HZ on Linux
	return time.Duration(ut+st) * time.Second / hz, nil
}

// Threads is a process's thread count (/proc/<pid>/status Threads).
func Threads(pid int) int {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Threads:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	return 0
}

// WaitCtx is a context bounded by d, cancelled when the test ends.
func WaitCtx(tb testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	tb.Cleanup(cancel)
	return ctx
}
