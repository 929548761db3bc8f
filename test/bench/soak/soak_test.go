// Package soak runs the chain for a bounded time under steady load with a rollout edit
// every few seconds, sampling every process, and reports whether memory, threads and
// open file descriptors stay flat and errors stay at zero. `make soak`; not in CI.
package soak

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/patchbay-io/patchbay/test/bench/xdsscale"
	"github.com/patchbay-io/patchbay/test/envoymodel"
	"github.com/patchbay-io/patchbay/test/harness"
)

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// proc is one part of the chain as its own process.
type proc struct {
	name  string
	cmd   *exec.Cmd
	admin string // host:port serving /metrics
}

func start(t *testing.T, name, ready, admin string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(xdsscale.Binary(t), args...)
	logf, err := os.Create(filepath.Join(t.TempDir(), name+".log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		logf.Close()
	})
	for t0 := time.Now(); ; time.Sleep(50 * time.Millisecond) {
		if resp, err := http.Get(ready); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Since(t0) > time.Minute {
			t.Fatalf("%s not ready", name)
		}
	}
	return &proc{name: name, cmd: cmd, admin: admin}
}

// sample is one reading of a process.
type sample struct {
	rss, threads, fds float64
	metrics           map[string]float64 // Go runtime gauges /metrics exposes, if any
}

// runtimeGauges are the Prometheus Go-collector names read from /metrics when present.
var runtimeGauges = []string{"go_goroutines", "go_memstats_heap_alloc_bytes", "process_open_fds"}

func read(pid int, admin string) sample {
	s := sample{metrics: map[string]float64{}}
	if m, err := xdsscale.ReadMem(pid); err == nil {
		s.rss = m.RSS
	}
	s.threads = float64(xdsscale.Threads(pid))
	if ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid)); err == nil {
		s.fds = float64(len(ents))
	}
	if admin != "" {
		if resp, err := http.Get("http://" + admin + "/metrics"); err == nil {
			sc := bufio.NewScanner(resp.Body)
			sc.Buffer(make([]byte, 1<<20), 1<<20)
			for sc.Scan() {
				for _, g := range runtimeGauges {
					if rest, ok := strings.CutPrefix(sc.Text(), g+" "); ok {
						if v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64); err == nil {
							s.metrics[g] = v
						}
					}
				}
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}
	return s
}

func rollout(a, b string, v7 int) string {
	return fmt.Sprintf("apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: ranker\nversions:\n  - {name: v7, endpoints: [%q]}\n  - {name: v8, endpoints: [%q]}\ntraffic: {v7: %d, v8: %d}\n", a, b, v7, 100-v7)
}

const features = `{"inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8]}]}`

// TestSoak: PATCHBAY_SOAK=1 (make soak). The real control plane, ext_proc and a model host
// (the shipped binary, each its own process) with the test model of Envoy in this process
// (test/envoymodel: no Envoy binary here) in front; 8 workers send REST infer requests
// through the edge for PATCHBAY_SOAK_DURATION (default 10m) while the rollout's split
// moves every 3 s. Every 5 s each process's RSS, threads and open fds (/proc) and the Go
// runtime gauges its /metrics exposes are sampled. It reports the mean of the first and
// the last third of each series, fails on any request error, and fails when a series
// grows by more than half between the thirds (a leak at this length shows as steady
// growth, not noise). The envoymodel's own goroutines are in this test process, not
// sampled.
func TestSoak(t *testing.T) {
	if os.Getenv("PATCHBAY_SOAK") != "1" {
		t.Skip("set PATCHBAY_SOAK=1 (make soak): a bounded 10-minute run, not part of CI")
	}
	dur := 10 * time.Minute
	if v := os.Getenv("PATCHBAY_SOAK_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 30*time.Second {
			t.Fatalf("PATCHBAY_SOAK_DURATION=%q: want a Go duration of at least 30s", v)
		}
		dur = d
	}
	hostHTTP, hostGRPC, hostAdmin := freeAddr(t), freeAddr(t), freeAddr(t)
	host := start(t, "modelhost", "http://"+hostHTTP+"/v2/health/ready", hostAdmin, "modelhost",
		"--repository", harness.RepoWith(t, "ranker/v7", "ranker/v8"), "--http", hostHTTP, "--grpc", hostGRPC, "--admin", hostAdmin, "--log-level", "warn")
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "ranker.yaml"), []byte(rollout(hostHTTP, hostHTTP, 90)), 0o644); err != nil {
		t.Fatal(err)
	}
	ads, xdsAdmin := freeAddr(t), freeAddr(t)
	cp := start(t, "xds", "http://"+xdsAdmin+"/readyz", xdsAdmin, "xds", "--rollouts", dir, "--listen", ads, "--admin", xdsAdmin, "--log-level", "warn")
	epAddr, epAdmin := freeAddr(t), freeAddr(t)
	ep := start(t, "extproc", "http://"+epAdmin+"/readyz", epAdmin, "extproc", "--listen", epAddr, "--xds", ads, "--admin", epAdmin, "--log-level", "warn")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	edge, err := envoymodel.Start(ctx, envoymodel.Config{XDSAddr: ads, ExtprocAddr: epAddr})
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := edge.Server()
	go srv.Serve(lis)
	defer srv.Close()
	for t0 := time.Now(); !edge.Ready(); time.Sleep(20 * time.Millisecond) {
		if time.Since(t0) > 30*time.Second {
			t.Fatal("the edge never got its config")
		}
	}
	url := "http://" + lis.Addr().String() + "/v2/models/ranker/infer"
	procs := []*proc{cp, ep, host}

	var ok, failed atomic.Int64
	var firstErr atomic.Value
	end := time.Now().Add(dur)
	var wg sync.WaitGroup
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; time.Now().Before(end); i++ {
				req, _ := http.NewRequest(http.MethodPost, url, strings.NewReader(features))
				req.Header.Set("Content-Type", "application/json")
				req.Header.Set("x-user-id", fmt.Sprintf("u%d-%d", w, i))
				resp, err := client.Do(req)
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
				}
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				ok.Add(1)
			}
		}(w)
	}
	// Edits: the split moves every 3 s (atomic rename, as a ConfigMap update does).
	edits := 0
	series := map[string][]float64{}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for n := 0; time.Now().Before(end); n++ {
		<-tick.C
		if n%3 == 0 {
			edits++
			harness.WriteRollout(t, dir, "ranker.yaml", rollout(hostHTTP, hostHTTP, 10+(edits*17)%81))
		}
		if n%5 == 0 {
			for _, p := range procs {
				s := read(p.cmd.Process.Pid, p.admin)
				series[p.name+" rss-MiB"] = append(series[p.name+" rss-MiB"], s.rss/(1<<20))
				series[p.name+" threads"] = append(series[p.name+" threads"], s.threads)
				series[p.name+" fds"] = append(series[p.name+" fds"], s.fds)
				for g, v := range s.metrics {
					series[p.name+" "+g] = append(series[p.name+" "+g], v)
				}
			}
		}
	}
	wg.Wait()
	t.Logf("%v: %d requests ok, %d failed (first error: %v), %d rollout edits", dur, ok.Load(), failed.Load(), firstErr.Load(), edits)
	var grew []string
	for _, k := range sortedKeys(series) {
		v := series[k]
		third := len(v) / 3
		if third == 0 {
			continue
		}
		first, last := mean(v[:third]), mean(v[len(v)-third:])
		t.Logf("%-34s first third %10.1f  last third %10.1f  (x%.2f)", k, first, last, last/max(first, 1e-9))
		if last > 1.5*first && last-first > 8 {
			grew = append(grew, k)
		}
	}
	if ok.Load() == 0 {
		t.Fatal("no request succeeded")
	}
	if failed.Load() > 0 {
		t.Errorf("%d requests failed (first: %v)", failed.Load(), firstErr.Load())
	}
	if len(grew) > 0 {
		t.Errorf("grew by more than half between the first and the last third: %v", grew)
	}
}

func mean(v []float64) float64 {
	s := 0.0
	for _, x := range v {
		s += x
	}
	return s / float64(len(v))
}

func sortedKeys(m map[string][]float64) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	for i := range keys {
		for j := i + 1; j < len(keys); j++ {
			if keys[j] < keys[i] {
				keys[i], keys[j] = keys[j], keys[i]
			}
		}
	}
	return keys
}
