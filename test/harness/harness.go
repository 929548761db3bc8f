// Package harness starts the real patchbay binary's parts (and a real Envoy) on
// 127.0.0.1 with free ports for end-to-end tests: each helper waits for the part's
// readiness endpoint, keeps its output and shows it only if the test fails, and
// registers a t.Cleanup that stops it (SIGTERM, then SIGKILL after a grace period).
//
// A test package using it builds the binary once:
//
//	func TestMain(m *testing.M) { os.Exit(harness.Main(m)) }
package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// ReadyTimeout bounds how long a part may take to become ready.
const ReadyTimeout = 30 * time.Second

// stopGrace is how long a part may take to exit after SIGTERM.
const stopGrace = 5 * time.Second

var (
	binary     string // $PATCHBAY_BIN, or the build in buildDir
	buildDir   string // set by Main
	buildOnce  sync.Once
	buildError error
)

// Main runs the tests and then removes the patchbay binary they built, if any: the
// build happens on the first Binary call, so a package whose tests all skip builds
// nothing. Use it from TestMain. $PATCHBAY_BIN, when set, is used instead of a build.
func Main(m *testing.M) int {
	if b := os.Getenv("PATCHBAY_BIN"); b != "" {
		binary = b
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "patchbay-harness-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "harness:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	buildDir = dir
	return m.Run()
}

// Binary returns the patchbay binary, building it once per test process.
func Binary(t testing.TB) string {
	t.Helper()
	if buildDir == "" { // $PATCHBAY_BIN, set before any test ran
		if binary == "" {
			t.Fatal("harness: call harness.Main from TestMain")
		}
		return binary
	}
	buildOnce.Do(func() {
		root, err := RepoRoot()
		if err != nil {
			buildError = err
			return
		}
		out := filepath.Join(buildDir, "patchbay")
		build := exec.Command("go", "build", "-o", out, "./cmd/patchbay")
		build.Dir = root
		if b, err := build.CombinedOutput(); err != nil {
			buildError = fmt.Errorf("build patchbay: %v\n%s", err, b)
			return
		}
		binary = out
	})
	if buildError != nil {
		t.Fatal("harness:", buildError)
	}
	return binary
}

// RepoRoot finds the repository root (the directory holding go.mod) from the
// working directory upwards.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// FreeAddr returns a loopback address that was free a moment ago.
func FreeAddr(t testing.TB) string {
	t.Helper()
	freeMu.Lock()
	defer freeMu.Unlock()
	// A port picked by listening on :0 comes from the ephemeral range, where any outgoing
	// connection of any test process may take it before the child binds it (seen as a child
	// failing to bind while another process's listener answered its readiness probe). Ports
	// below the ephemeral range are never handed out for outgoing connections; pick one at
	// random there, check it is free, and never hand it out twice in this process.
	lo, hi := belowEphemeral()
	for i := 0; i < 200 && hi > lo; i++ {
		port := lo + freeRand.IntN(hi-lo)
		if freeUsed[port] {
			continue
		}
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			continue
		}
		l.Close()
		freeUsed[port] = true
		return l.Addr().String()
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

var (
	freeMu   sync.Mutex
	freeUsed = map[int]bool{}
	freeRand = rand.New(rand.NewPCG(uint64(os.Getpid()), uint64(time.Now().UnixNano())))
)

// belowEphemeral is the port range FreeAddr draws from: from 10000 up to the start of the
// kernel's ephemeral range (/proc/sys/net/ipv4/ip_local_port_range; 32768 when unknown).
func belowEphemeral() (lo, hi int) {
	lo, hi = 10000, 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		var a, z int
		if n, _ := fmt.Sscan(string(b), &a, &z); n == 2 && a > lo {
			hi = a
		}
	}
	return lo, hi
}

// Process is one running child process.
type Process struct {
	Name string
	cmd  *exec.Cmd
	out  *Buffer
	done chan struct{}
}

// Buffer is a bytes.Buffer that many goroutines may write to (a child's stdout and
// stderr, a logger) while a test reads it.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *Buffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *Buffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Start runs bin with args, waits until ready (a URL that answers 200) and registers
// its stop. Its output is logged only if the test fails.
func Start(t testing.TB, name, ready, bin string, args ...string) *Process {
	t.Helper()
	p := &Process{Name: name, out: &Buffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		_ = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.Stop()
		if t.Failed() {
			t.Logf("---- %s (%s %s) output ----\n%s", name, filepath.Base(bin), strings.Join(args, " "), p.out.String())
		}
	})
	if err := p.waitReady(ready, ReadyTimeout); err != nil {
		t.Fatal(err)
	}
	return p
}

func (p *Process) waitReady(url string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if OK(url) {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("%s exited before it was ready (%v)", p.Name, p.cmd.ProcessState)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %v: %s", p.Name, timeout, url)
		}
	}
}

// Logs returns what the process printed so far.
func (p *Process) Logs() string { return p.out.String() }

// Exited reports whether the process has ended.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Kill ends the process at once (SIGKILL), like a crash, and waits for it.
func (p *Process) Kill() {
	if !p.Exited() {
		_ = p.cmd.Process.Kill()
	}
	<-p.done
}

// Stop ends the process with SIGTERM, then SIGKILL after a grace period.
func (p *Process) Stop() {
	if p.Exited() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(stopGrace):
		p.Kill()
	}
}

// OK reports whether GET url answers 200 within a second.
func OK(url string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return false
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return false
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// Eventually polls ok every 20ms until it is true or d passes.
func Eventually(t testing.TB, d time.Duration, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
