package modelhost_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	shadowv1 "github.com/patchbay-io/patchbay/api/shadow/v1"
	"github.com/patchbay-io/patchbay/internal/tlsfiles"
	"github.com/patchbay-io/patchbay/modelhost"
)

// collector is a Records server keeping what it receives (and the sender's certificate
// identity), served over real gRPC on a loopback port.
type collector struct {
	shadowv1.UnimplementedRecordsServer
	mu    sync.Mutex
	recs  []*shadowv1.Record
	peers []string
}

func (c *collector) Send(st grpc.ClientStreamingServer[shadowv1.Record, shadowv1.Summary]) error {
	uri := ""
	if p, ok := peer.FromContext(st.Context()); ok {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok {
			uri = tlsfiles.PeerURI(&ti.State)
		}
	}
	var n uint64
	for {
		r, err := st.Recv()
		if err == io.EOF {
			return st.SendAndClose(&shadowv1.Summary{Received: n})
		}
		if err != nil {
			return err
		}
		n++
		c.mu.Lock()
		c.recs = append(c.recs, r)
		c.peers = append(c.peers, uri)
		c.mu.Unlock()
	}
}

func (c *collector) serve(t *testing.T, l net.Listener, opts ...grpc.ServerOption) {
	g := grpc.NewServer(opts...)
	shadowv1.RegisterRecordsServer(g, c)
	go func() { _ = g.Serve(l) }()
	t.Cleanup(g.Stop)
}

// waitRecords waits (bounded) until the collector holds n records.
func (c *collector) waitRecords(t *testing.T, n int) []*shadowv1.Record {
	t.Helper()
	for range 300 { // the sender's reconnect backoff is at most 5 s
		c.mu.Lock()
		got := append([]*shadowv1.Record(nil), c.recs...)
		c.mu.Unlock()
		if len(got) >= n {
			return got
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("collector holds fewer than %d records", n)
	return nil
}

func inferWithID(t *testing.T, h *host, id string, x string) {
	t.Helper()
	hdr := map[string]string{}
	if id != "" {
		hdr["X-Request-Id"] = id
	}
	if r := h.do(t, "POST", "/v2/models/idm/versions/v1/infer", `{"inputs":[{"name":"x","datatype":"FP32","shape":[2,1],"data":[`+x+`]}]}`, hdr, nil); r.StatusCode != 200 {
		t.Fatalf("infer: %d", r.StatusCode)
	}
}

// TestShadowRecordsBoundedAndReconnect: while the control plane is unreachable the
// host keeps --shadow-queue records and drops (and counts) the rest without slowing
// requests; once the control plane listens, the stream reconnects and the queued records
// arrive, carrying request id, model, version, traffic, values and latency. Requests
// without x-request-id send nothing (they could not be paired).
func TestShadowRecordsBoundedAndReconnect(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens there yet
	h := startHost(t, identityRepo(t), func(c *modelhost.Config) {
		c.ShadowRecords, c.ShadowSample, c.ShadowQueue = addr, 1, 2
	})
	inferWithID(t, h, "", "9, 9")
	for _, id := range []string{"a", "b", "c", "d", "e"} {
		inferWithID(t, h, id, "0.25, 0.75")
	}
	if text := scrape(t, h.url); !strings.Contains(text, "\npatchbay_modelhost_shadow_records_dropped_total 3\n") {
		t.Errorf("want 3 records dropped (queue 2, 5 sampled requests):\n%s", grepLines(text, "shadow"))
	}
	l, err = net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("port %s taken meanwhile: %v", addr, err)
	}
	var c collector
	c.serve(t, l)
	got := c.waitRecords(t, 2)
	inferWithID(t, h, "f", "1, 2")
	got = c.waitRecords(t, 3)
	if len(got) != 3 || got[0].GetRequestId() != "a" || got[1].GetRequestId() != "b" || got[2].GetRequestId() != "f" {
		t.Fatalf("records %v, want a, b (queued) and f", got)
	}
	r := got[2]
	if r.GetModel() != "idm" || r.GetVersion() != "v1" || r.GetTraffic() != shadowv1.Traffic_TRAFFIC_LIVE || r.GetLatencySeconds() <= 0 || r.GetUnixNanos() == 0 ||
		len(r.GetOutputs()) != 1 || r.GetOutputs()[0].GetName() != "y" || len(r.GetOutputs()[0].GetValues()) != 2 ||
		r.GetOutputs()[0].GetValues()[0] != 1 || r.GetOutputs()[0].GetValues()[1] != 2 || r.GetOutputs()[0].GetHasClass() {
		t.Errorf("record %v", r)
	}
	if text := scrape(t, h.url); !strings.Contains(text, "\npatchbay_modelhost_shadow_records_sent_total 3\n") {
		t.Errorf("want 3 records sent:\n%s", grepLines(text, "shadow"))
	}
}

func grepLines(text, sub string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestShadowRecordsOverTLS: with --tls-cert/--tls-key/--client-ca the host sends its
// records over TLS, presenting its own certificate (the control plane sees its modelhost
// identity) and verifying the control plane's against the CA. A shadow request (Host
// with -shadow) is sent as traffic shadow.
func TestShadowRecordsOverTLS(t *testing.T) {
	dir := t.TempDir()
	ca, err := tlsfiles.NewCA("shadow-test-ca", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	hostFiles, err := ca.WriteLeaf(dir, "host", tlsfiles.Leaf{Name: "modelhost", Hosts: []string{"127.0.0.1"}, URI: "spiffe://patchbay.local/role/modelhost"})
	if err != nil {
		t.Fatal(err)
	}
	cpFiles, err := ca.WriteLeaf(dir, "cp", tlsfiles.Leaf{Name: "xds", Hosts: []string{"127.0.0.1"}, URI: "spiffe://patchbay.local/role/xds"})
	if err != nil {
		t.Fatal(err)
	}
	cpSrc, err := tlsfiles.Load(cpFiles, tlsfiles.Options{})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var c collector
	c.serve(t, l, grpc.Creds(credentials.NewTLS(cpSrc.ServerConfig("h2"))))
	hostSrc, err := tlsfiles.Load(hostFiles, tlsfiles.Options{})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := modelhost.New(modelhost.Config{Repository: identityRepo(t), Logger: zerolog.Nop(), TLS: hostSrc,
		ShadowRecords: l.Addr().String(), ShadowSample: 1})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.ServeAll(ctx, modelhost.Listeners{}) }()
	// Requests in process (the transport under test is the records stream).
	req := httptest.NewRequest("POST", "/v2/models/idm/versions/v1/infer", strings.NewReader(`{"inputs":[{"name":"x","datatype":"FP32","shape":[1,1],"data":[0.5]}]}`))
	req.Host = "idm-shadow:8000"
	req.Header.Set("X-Request-Id", "tls-1")
	w := httptest.NewRecorder()
	srv.Handler().ServeHTTP(w, req)
	if w.Code != http.StatusOK {
		t.Fatalf("infer: %d %s", w.Code, w.Body)
	}
	got := c.waitRecords(t, 1)
	cancel()
	if err := <-done; err != nil {
		t.Errorf("ServeAll: %v", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if got[0].GetRequestId() != "tls-1" || got[0].GetTraffic() != shadowv1.Traffic_TRAFFIC_SHADOW || c.peers[0] != "spiffe://patchbay.local/role/modelhost" {
		t.Errorf("record %v from %q, want tls-1, shadow, from the modelhost identity", got[0], c.peers[0])
	}
}
