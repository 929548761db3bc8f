// Package extprocdown measures what a dead or black-holed ext_proc costs each request
// once Envoy has noticed, against the same requests with ext_proc healthy in the same
// run, through the test model of Envoy (test/envoymodel) configured by the real control
// plane and honouring the bootstrap's patchbay_extproc cluster (gRPC health check,
// outlier detection, no panic routing; envoymodel/extproc_cluster.go). Run:
//
//	go test ./test/bench/extprocdown -run '^$' -bench . -benchtime 1x
//
// The real-Envoy variant is test/envoy's BenchmarkEnvoyExtprocDown.
package extprocdown

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	"github.com/rs/zerolog"
	"google.golang.org/protobuf/proto"

	"github.com/patchbay-io/patchbay/envoy"
	"github.com/patchbay-io/patchbay/extproc"
	"github.com/patchbay-io/patchbay/test/envoymodel"
	"github.com/patchbay-io/patchbay/xds"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// gate is a TCP forwarder in front of ext_proc that can stop forwarding: "refuse"
// closes every connection (ext_proc killed: Envoy sees the connection fail) and
// "blackhole" accepts and never answers (a dead node or a dropped route).
type gate struct {
	lis    net.Listener
	target string
	mu     sync.Mutex
	mode   string
	conns  map[net.Conn]struct{}
}

func startGate(t testing.TB, target string) *gate {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := &gate{lis: lis, target: target, mode: "forward", conns: map[net.Conn]struct{}{}}
	t.Cleanup(func() { lis.Close(); g.set("refuse") })
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			go g.serve(c)
		}
	}()
	return g
}

func (g *gate) addr() string { return g.lis.Addr().String() }

// set changes the mode and drops every open connection.
func (g *gate) set(mode string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.mode = mode
	for c := range g.conns {
		c.Close()
	}
	clear(g.conns)
}

func (g *gate) serve(c net.Conn) {
	g.mu.Lock()
	mode := g.mode
	if mode != "refuse" {
		g.conns[c] = struct{}{}
	}
	g.mu.Unlock()
	switch mode {
	case "refuse":
		c.Close()
	case "blackhole":
		_, _ = io.Copy(io.Discard, c) // read and never answer, until the gate drops it
	default:
		up, err := net.Dial("tcp", g.target)
		if err != nil {
			c.Close()
			return
		}
		go func() { _, _ = io.Copy(up, c); up.Close() }()
		_, _ = io.Copy(c, up)
		c.Close()
	}
}

type chain struct {
	edge  *envoymodel.Proxy
	url   string
	gate  *gate
	epCtl context.CancelFunc
}

// extprocCluster is the bootstrap's patchbay_extproc cluster; bare strips what makes
// Envoy skip a dead ext_proc (the bootstraps before issue 10).
func extprocCluster(t testing.TB, bare bool) *clusterv3.Cluster {
	data, err := envoy.File(envoy.Edge)
	if err != nil {
		t.Fatal(err)
	}
	b, err := envoy.Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range b.GetStaticResources().GetClusters() {
		if c.GetName() == envoy.ClusterExtProc {
			c = proto.Clone(c).(*clusterv3.Cluster)
			if bare {
				c.HealthChecks, c.OutlierDetection, c.CommonLbConfig = nil, nil, nil
			}
			return c
		}
	}
	t.Fatal("no ext_proc cluster in the edge bootstrap")
	return nil
}

func free(t testing.TB) net.Listener {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return lis
}

// startChain runs a bare OIP backend, the control plane, ext_proc behind a gate and the
// Envoy model with the given ext_proc cluster, and waits until ext_proc decides requests.
func startChain(t testing.TB, cluster *clusterv3.Cluster) *chain {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("content-type", "application/json")
		_, _ = io.WriteString(w, `{"model_name":"ranker","outputs":[]}`)
	}))
	t.Cleanup(backend.Close)
	dir := t.TempDir()
	host := strings.TrimPrefix(backend.URL, "http://")
	rollout := fmt.Sprintf("apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: ranker\nversions:\n  - {name: v7, endpoints: [%q]}\ntraffic: {v7: 100}\n", host)
	if err := os.WriteFile(filepath.Join(dir, "ranker.yaml"), []byte(rollout), 0o600); err != nil {
		t.Fatal(err)
	}
	cp, err := xds.New(xds.Config{RolloutsDir: dir, Settle: -1, Translate: translate.Options{EdgeAddress: "127.0.0.1:10000", SidecarAddress: "127.0.0.1:15001"}, Logger: zerolog.New(os.Stderr).Level(zerolog.WarnLevel)})
	if err != nil {
		t.Fatal(err)
	}
	xdsLis := free(t)
	go func() {
		if err := cp.Run(ctx, xdsLis, free(t)); err != nil && ctx.Err() == nil {
			fmt.Fprintln(os.Stderr, "xds:", err)
		}
	}()

	ep, err := extproc.New(extproc.Config{XDSAddress: xdsLis.Addr().String()})
	if err != nil {
		t.Fatal(err)
	}
	epCtx, epCancel := context.WithCancel(ctx)
	epLis := free(t)
	go func() { _ = ep.Serve(epCtx, epLis) }()
	g := startGate(t, epLis.Addr().String())

	edge, err := envoymodel.Start(ctx, envoymodel.Config{XDSAddr: xdsLis.Addr().String(), ExtprocAddr: g.addr(), ExtprocCluster: cluster})
	if err != nil {
		t.Fatal(err)
	}
	edgeLis := free(t)
	srv := edge.Server()
	go func() { _ = srv.Serve(edgeLis) }()
	t.Cleanup(func() { srv.Close() })
	c := &chain{edge: edge, url: "http://" + edgeLis.Addr().String() + "/v2/models/ranker/infer", gate: g, epCtl: epCancel}
	var last string
	eventually(t, 20*time.Second, "ext_proc deciding through the Envoy model", func() bool {
		if !edge.Ready() || !ep.Ready() || !edge.ExtprocUsable() {
			last = fmt.Sprintf("edge ready %v, ext_proc ready %v, ext_proc usable %v", edge.Ready(), ep.Ready(), edge.ExtprocUsable())
			return false
		}
		_, decided, err := c.call("warmup")
		last = fmt.Sprintf("call: decided %v, %v", decided, err)
		return err == nil && decided
	}, &last)
	return c
}

var client = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 4}}

// call sends one prediction and says whether ext_proc decided it (the bucket header
// reached the host's answer path: the backend does not echo it, so the model's access
// to the decision is the x-patchbay-bucket the edge echoes, if any; fall back to 200).
func (c *chain) call(user string) (time.Duration, bool, error) {
	req, _ := http.NewRequest(http.MethodPost, c.url, strings.NewReader(`{"inputs":[]}`))
	req.Header.Set("content-type", "application/json")
	req.Header.Set("x-user-id", user)
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return 0, false, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	d := time.Since(start)
	if resp.StatusCode != http.StatusOK {
		return d, false, fmt.Errorf("status %d", resp.StatusCode)
	}
	return d, c.edge.ExtprocFailures.Load() == 0, nil
}

func eventually(t testing.TB, within time.Duration, what string, ok func() bool, last ...*string) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !ok() {
		if time.Now().After(deadline) {
			why := ""
			if len(last) > 0 {
				why = ": " + *last[0]
			}
			t.Fatalf("timed out after %v waiting for %s%s", within, what, why)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// breakExtproc makes ext_proc dead ("refuse": the process is gone, connections fail)
// or black-holed (connections hang).
func (c *chain) breakExtproc(how string) {
	if how == "refuse" {
		c.epCtl()
	}
	c.gate.set(how)
}

// TestDeadExtprocIsSkipped: with the bootstrap's ext_proc cluster, a killed or
// black-holed ext_proc is taken out of the Envoy model's load balancing (health check /
// outlier detection), after which requests fail open without opening an ext_proc
// stream at all, and every request succeeds throughout.
func TestDeadExtprocIsSkipped(t *testing.T) {
	for _, how := range []string{"refuse", "blackhole"} {
		t.Run(how, func(t *testing.T) {
			c := startChain(t, extprocCluster(t, false))
			c.breakExtproc(how)
			eventually(t, 15*time.Second, "the dead ext_proc to be taken out", func() bool {
				if _, _, err := c.call("during"); err != nil {
					t.Fatalf("request failed while ext_proc was going away: %v", err)
				}
				return !c.edge.ExtprocUsable()
			})
			before := c.edge.ExtprocSkipped()
			for i := range 20 {
				if _, _, err := c.call(fmt.Sprintf("u%d", i)); err != nil {
					t.Fatalf("request %d with ext_proc down: %v", i, err)
				}
			}
			if got := c.edge.ExtprocSkipped() - before; got != 20 {
				t.Fatalf("%d of 20 requests skipped ext_proc at once, want all", got)
			}
		})
	}
}

func percentile(ds []time.Duration, p float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

func measure(b *testing.B, c *chain, n int) []time.Duration {
	out := make([]time.Duration, 0, n)
	for i := range n {
		d, _, err := c.call(fmt.Sprintf("user-%d", i))
		if err != nil {
			b.Fatalf("request %d: %v", i, err)
		}
		out = append(out, d)
	}
	return out
}

// BenchmarkExtprocDown reports, per way of dying, the p50/p99 latency of the same
// requests with ext_proc healthy and with it down after detection, the added p99, their
// ratio, how long detection took and the worst request while it did. "bare" runs the
// black-holed case with the pre-issue-10 cluster (no health check, outlier detection or
// panic threshold): every request pays message_timeout.
func BenchmarkExtprocDown(b *testing.B) {
	for _, tc := range []struct {
		name, how string
		bare      bool
		n         int
	}{
		{"killed", "refuse", false, 500},
		{"blackholed", "blackhole", false, 500},
		{"blackholed-bare", "blackhole", true, 20},
	} {
		b.Run(tc.name, func(b *testing.B) {
			for range b.N {
				b.StopTimer()
				c := startChain(b, extprocCluster(b, tc.bare))
				measure(b, c, 50) // warm connections
				healthy := measure(b, c, tc.n)
				c.breakExtproc(tc.how)
				start := time.Now()
				var worst time.Duration
				for !tc.bare && c.edge.ExtprocUsable() && time.Since(start) < 15*time.Second {
					d, _, err := c.call("detecting")
					if err != nil {
						b.Fatalf("request during detection: %v", err)
					}
					worst = max(worst, d)
				}
				detect := time.Since(start)
				down := measure(b, c, tc.n)
				h99, d99 := percentile(healthy, 0.99), percentile(down, 0.99)
				b.ReportMetric(float64(percentile(healthy, 0.5).Microseconds()), "healthy-p50-µs")
				b.ReportMetric(float64(h99.Microseconds()), "healthy-p99-µs")
				b.ReportMetric(float64(percentile(down, 0.5).Microseconds()), "down-p50-µs")
				b.ReportMetric(float64(d99.Microseconds()), "down-p99-µs")
				b.ReportMetric(float64((d99 - h99).Microseconds()), "added-p99-µs")
				b.ReportMetric(float64(d99)/float64(h99), "down/healthy-p99")
				if !tc.bare {
					b.ReportMetric(float64(detect.Milliseconds()), "detect-ms")
					b.ReportMetric(float64(worst.Milliseconds()), "worst-during-detect-ms")
				}
				b.Logf("%s: healthy p99 %v, down p99 %v (added %v), detection %v (worst request %v), skipped %d",
					tc.name, h99, d99, d99-h99, detect, worst, c.edge.ExtprocSkipped())
			}
		})
	}
}
