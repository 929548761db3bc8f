package xds

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	xdsresolver "google.golang.org/grpc/xds"

	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/test/harness"
	"github.com/patchbay-io/patchbay/xds/translate"
)

const testToken = "s3cret-token-of-at-least-32-bytes-for-tests"

// cp is a control plane under test, restartable on the same ports.
type cp struct {
	t         testing.TB
	dir       string
	grpcAddr  string
	adminAddr string
	srv       *Server
	cancel    context.CancelFunc
	done      chan error
	logs      *harness.Buffer
	stateFile string
	configure func(*Config) // optional: adjust the config before New
	beforeRun func(*Server) // optional: adjust the server between New and Run
}

func startCP(t testing.TB, dir string) *cp { return startCPWith(t, dir, nil) }

// startCPWith starts a control plane whose config configure adjusts (nil: as startCP).
func startCPWith(t testing.TB, dir string, configure func(*Config)) *cp {
	c := &cp{t: t, dir: dir, grpcAddr: "127.0.0.1:0", adminAddr: "127.0.0.1:0", logs: &harness.Buffer{}, configure: configure}
	c.start()
	t.Cleanup(func() {
		c.stop()
		if t.Failed() {
			t.Logf("control plane logs:\n%s", c.logs.String())
		}
	})
	return c
}

func (c *cp) start() {
	c.t.Helper()
	var gl, al net.Listener
	var err error
	// On restart the old port may linger briefly: retry for a bounded time.
	for i := 0; i < 50; i++ {
		if gl, err = net.Listen("tcp", c.grpcAddr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		c.t.Fatal(err)
	}
	if al, err = net.Listen("tcp", c.adminAddr); err != nil {
		c.t.Fatal(err)
	}
	c.grpcAddr, c.adminAddr = gl.Addr().String(), al.Addr().String()
	cfg := Config{
		RolloutsDir: c.dir,
		Translate:   translate.Options{EdgeAddress: "127.0.0.1:10000", SidecarAddress: "127.0.0.1:15001", AccessLog: true},
		AdminToken:  testToken,
		Debounce:    5 * time.Millisecond,
		DNSRefresh:  50 * time.Millisecond,
		LookupHost:  fakeDNS.lookup,
		StateFile:   c.stateFile,
		Logger:      zerolog.New(c.logs),
	}
	if c.configure != nil {
		c.configure(&cfg)
	}
	srv, err := New(cfg)
	if err != nil {
		c.t.Fatal(err)
	}
	if c.beforeRun != nil {
		c.beforeRun(srv)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c.srv, c.cancel, c.done = srv, cancel, make(chan error, 1)
	go func() { c.done <- srv.Run(ctx, gl, al) }()
	waitFor(c.t, 5*time.Second, "control plane ready", func() bool {
		if cfg.TLS.Enabled() { // the admin port speaks TLS: wait for a config instead
			return srv.Version() != ""
		}
		resp, err := http.Get("http://" + c.adminAddr + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return true
	})
}

func (c *cp) stop() {
	if c.cancel == nil {
		return
	}
	c.cancel()
	select {
	case err := <-c.done:
		if err != nil {
			c.t.Errorf("control plane Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		c.t.Error("control plane did not stop within 10s")
	}
	c.cancel = nil
}

// dnsTable is a test resolver whose answers the test changes.
type dnsTable struct {
	mu sync.Mutex
	m  map[string][]string
}

var fakeDNS = &dnsTable{m: map[string][]string{}}

func (d *dnsTable) set(host string, ips ...string) {
	d.mu.Lock()
	d.m[host] = ips
	d.mu.Unlock()
}

func (d *dnsTable) lookup(_ context.Context, host string) ([]string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if ips, ok := d.m[host]; ok {
		return append([]string(nil), ips...), nil
	}
	return nil, fmt.Errorf("no such host %s", host)
}

func waitFor(t testing.TB, d time.Duration, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// backend is a gRPC server that answers OIP ModelInfer with its name as model_version
// (proxyless routes carry only the OIP inference methods).
type backend struct {
	oip.UnimplementedGRPCInferenceServiceServer
	name string
	addr string
	// calls counts the ModelInfer calls this backend answered (at the host, whatever route
	// brought them).
	calls atomic.Int64
}

func (b *backend) ModelInfer(context.Context, *oip.ModelInferRequest) (*oip.ModelInferResponse, error) {
	b.calls.Add(1)
	return &oip.ModelInferResponse{ModelVersion: b.name}, nil
}

func startBackend(t testing.TB, name string) *backend {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &backend{name: name, addr: lis.Addr().String()}
	gs := grpc.NewServer()
	oip.RegisterGRPCInferenceServiceServer(gs, b)
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	return b
}

func writeFile(t testing.TB, dir, name, content string) {
	t.Helper()
	// Write then rename into place, as editors and kubectl do.
	tmp := filepath.Join(dir, "."+name+".tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		t.Fatal(err)
	}
}

func rolloutDoc(model string, endpoints map[string]string, traffic string, extra string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: %s\nversions:\n", model)
	for _, v := range []string{"v1", "v2", "v3"} {
		if ep, ok := endpoints[v]; ok {
			fmt.Fprintf(&b, "  - name: %s\n    endpoints: [%q]\n    protocol: grpc\n", v, ep)
		}
	}
	fmt.Fprintf(&b, "traffic: %s\n%s", traffic, extra)
	return b.String()
}

// xdsClient dials xds:///<model> with grpc-go's own xDS client and our server as its
// management server: the independent peer that NACKs what it dislikes.
func xdsClient(t testing.TB, c *cp, model string) oip.GRPCInferenceServiceClient {
	t.Helper()
	bootstrap := fmt.Sprintf(`{
		"xds_servers": [{"server_uri": %q, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
		"node": {"id": "proxyless-test-%d", "locality": {"region": "patchbay"}}
	}`, c.grpcAddr, time.Now().UnixNano())
	rb, err := xdsresolver.NewXDSResolverWithConfigForTesting([]byte(bootstrap))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("xds:///"+model, grpc.WithResolvers(rb), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return oip.NewGRPCInferenceServiceClient(conn)
}

// call makes one RPC and returns the name of the backend that answered.
func call(ctx context.Context, c oip.GRPCInferenceServiceClient, md ...string) (string, error) {
	if len(md) > 0 {
		ctx = metadata.AppendToOutgoingContext(ctx, md...)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	r, err := c.ModelInfer(ctx, &oip.ModelInferRequest{}, grpc.WaitForReady(true))
	if err != nil {
		return "", err
	}
	return r.GetModelVersion(), nil
}

func countCalls(t testing.TB, c oip.GRPCInferenceServiceClient, n int, md ...string) map[string]int {
	t.Helper()
	out := map[string]int{}
	for i := 0; i < n; i++ {
		name, err := call(context.Background(), c, md...)
		if err != nil {
			t.Fatalf("RPC %d: %v", i, err)
		}
		out[name]++
	}
	return out
}

// allGoToStreak is how many consecutive RPCs allGoTo needs from one version. A split that
// still sends another version a share passes it only by chance: for the 80/20 split the
// proxyless test starts from (want on the 80% side), the chance that some run of 150
// consecutive answers among at most allGoToMaxCalls is all want is below
// 20,000 × 0.8^150 ≈ 6e-11 (0.8^30, the old streak, is 1.2e-3 per try: a lost edit went
// unnoticed about once in a hundred runs).
const (
	allGoToStreak   = 150
	allGoToMaxCalls = 20_000
)

// allGoTo waits (bounded: 10 s and allGoToMaxCalls RPCs) until allGoToStreak consecutive
// RPCs are answered by want; an error or another version starts the count again.
func allGoTo(t testing.TB, c oip.GRPCInferenceServiceClient, want string, md ...string) {
	t.Helper()
	goTo(t, c, want, false, md...)
}

// allGoToWithoutErrors is allGoTo that also fails on any RPC error while the client
// follows: a change of split must move RPCs from one version to another, never fail them
// (an RPC routed to a cluster that a snapshot dropped fails, or waits for its deadline).
func allGoToWithoutErrors(t testing.TB, c oip.GRPCInferenceServiceClient, want string, md ...string) {
	t.Helper()
	goTo(t, c, want, true, md...)
}

func goTo(t testing.TB, c oip.GRPCInferenceServiceClient, want string, noErrors bool, md ...string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	streak, seen := 0, map[string]int{}
	for calls := 0; calls < allGoToMaxCalls && time.Now().Before(deadline); calls++ {
		name, err := call(context.Background(), c, md...)
		if err != nil {
			if noErrors {
				t.Fatalf("RPC %d while moving to %s failed: %v (answers before: %v)", calls, want, err, seen)
			}
			name = "error: " + status.Code(err).String()
		}
		if name != want {
			seen[name]++
			streak = 0
			continue
		}
		if streak++; streak == allGoToStreak {
			return
		}
	}
	t.Fatalf("no %d consecutive RPCs on %s within 10s (other answers seen: %v)", allGoToStreak, want, seen)
}

func httpDo(t testing.TB, method, url, token, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}
