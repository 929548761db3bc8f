package extproc

import (
	"bytes"
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/patchbay-io/patchbay/api/headers"
	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
	"github.com/patchbay-io/patchbay/internal/tlsfiles"
)

// controlPlane is go-control-plane's real ADS server over a LinearCache of the policy
// type, on a 127.0.0.1 port, recording every request it receives.
type controlPlane struct {
	cache *cachev3.LinearCache
	addr  string
	gs    *grpc.Server

	mu    sync.Mutex
	reqs  []*discoveryv3.DiscoveryRequest
	peers []string // verified client certificate URI of each stream ("" without one)
}

func startControlPlane(t testing.TB, addr string, p *policyv1.Policy) *controlPlane {
	t.Helper()
	return startControlPlaneWith(t, addr, p)
}

// startControlPlaneWith starts the control plane with extra gRPC server options (TLS).
func startControlPlaneWith(t testing.TB, addr string, p *policyv1.Policy, opts ...grpc.ServerOption) *controlPlane {
	t.Helper()
	cp := &controlPlane{cache: cachev3.NewLinearCache(policyv1.TypeURL)}
	if p != nil {
		if err := cp.cache.UpdateResource(policyv1.ResourceName, p); err != nil {
			t.Fatal(err)
		}
	}
	var lis net.Listener
	var err error
	for range 50 { // a restarted control plane rebinds the same port
		if lis, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	cp.addr = lis.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	srv := serverv3.NewServer(ctx, cp.cache, serverv3.CallbackFuncs{
		StreamOpenFunc: func(ctx context.Context, _ int64, _ string) error {
			uri := ""
			if pr, ok := peer.FromContext(ctx); ok {
				if info, ok := pr.AuthInfo.(credentials.TLSInfo); ok {
					uri = tlsfiles.PeerURI(&info.State)
				}
			}
			cp.mu.Lock()
			cp.peers = append(cp.peers, uri)
			cp.mu.Unlock()
			return nil
		},
		StreamRequestFunc: func(_ int64, r *discoveryv3.DiscoveryRequest) error {
			cp.mu.Lock()
			cp.reqs = append(cp.reqs, r)
			cp.mu.Unlock()
			return nil
		},
	})
	cp.gs = grpc.NewServer(opts...)
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(cp.gs, srv)
	go func() { _ = cp.gs.Serve(lis) }()
	t.Cleanup(func() { cp.gs.Stop(); cancel() })
	return cp
}

func (cp *controlPlane) requests() []*discoveryv3.DiscoveryRequest {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	return append([]*discoveryv3.DiscoveryRequest(nil), cp.reqs...)
}

func eventually(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s", within, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestPolicyOverXDS(t *testing.T) {
	t.Parallel()
	cp := startControlPlane(t, "127.0.0.1:0", testPolicy("c1"))
	h := startServer(t, Config{XDSAddress: cp.addr, NodeID: "ep-1", XDSMinBackoff: 20 * time.Millisecond, XDSMaxBackoff: 100 * time.Millisecond}, nil)

	eventually(t, 2*time.Second, "first policy", func() bool { return h.srv.ConfigVersion() == "c1" })
	first := cp.requests()[0]
	if first.GetNode().GetUserAgentName() != policyv1.ExtprocUserAgent || first.GetNode().GetId() != "ep-1" ||
		first.GetTypeUrl() != policyv1.TypeURL || len(first.GetResourceNames()) != 1 || first.GetResourceNames()[0] != policyv1.ResourceName ||
		first.GetVersionInfo() != "" || first.GetResponseNonce() != "" {
		t.Errorf("subscription = %v", first)
	}
	eventually(t, time.Second, "ACK of c1", func() bool {
		r := cp.requests()
		last := r[len(r)-1]
		return len(r) == 2 && last.GetResponseNonce() != "" && last.GetVersionInfo() != "" && last.GetErrorDetail() == nil
	})
	ackedVersion := cp.requests()[1].GetVersionInfo()

	// An update is followed within a second.
	start := time.Now()
	if err := cp.cache.UpdateResource(policyv1.ResourceName, testPolicy("c2")); err != nil {
		t.Fatal(err)
	}
	eventually(t, time.Second, "policy c2", func() bool { return h.srv.ConfigVersion() == "c2" })
	t.Logf("update applied in %v", time.Since(start))

	// An invalid policy is NACKed with the previous version; c2 stays in force.
	bad := testPolicy("c3")
	bad.Models[0].Experiments[0].Arms[0].Version = "v99"
	n := len(cp.requests())
	if err := cp.cache.UpdateResource(policyv1.ResourceName, bad); err != nil {
		t.Fatal(err)
	}
	eventually(t, time.Second, "NACK of c3", func() bool {
		r := cp.requests()
		return len(r) > n && r[len(r)-1].GetErrorDetail() != nil
	})
	nack := cp.requests()[len(cp.requests())-1]
	if nack.GetVersionInfo() == ackedVersion || nack.GetVersionInfo() == "" || nack.GetResponseNonce() == "" {
		t.Errorf("NACK must carry the last ACKed version and the nonce: %v", nack)
	}
	if h.srv.ConfigVersion() != "c2" {
		t.Errorf("config version %q after NACK, want c2", h.srv.ConfigVersion())
	}

	// Control plane down: the last good policy keeps deciding.
	addr := cp.addr
	cp.gs.Stop()
	got, err := h.exchange(t, reqHeaders(true, ":path", "/v2/models/ranker/infer", headers.UserID, "u1"))
	if err != nil || len(got) != 1 || len(got[0].GetRequestHeaders().GetResponse().GetHeaderMutation().GetSetHeaders()) == 0 {
		t.Fatalf("decision with the control plane down: %v %v", got, err)
	}
	time.Sleep(150 * time.Millisecond) // a few reconnect attempts fail meanwhile
	if !h.srv.Ready() || h.srv.ConfigVersion() != "c2" {
		t.Fatalf("lost the policy while the control plane was down")
	}

	// It comes back (fresh cache, whose version counter restarts): ext_proc resyncs.
	startControlPlane(t, addr, testPolicy("c4"))
	eventually(t, 3*time.Second, "resync to c4", func() bool { return h.srv.ConfigVersion() == "c4" })
}

func TestApplyResources(t *testing.T) {
	t.Parallel()
	srv, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.applyResources("1", nil); err != nil || srv.Ready() {
		t.Errorf("empty response: %v (ready %v)", err, srv.Ready())
	}
	good := mustAny(t, testPolicy("c1"))
	if err := srv.applyResources("1", []*anyT{good, good}); err == nil {
		t.Error("two resources accepted")
	}
	wrong := mustAny(t, &discoveryv3.DiscoveryRequest{})
	if err := srv.applyResources("1", []*anyT{wrong}); err == nil {
		t.Error("wrong type accepted")
	}
	garbage := &anyT{TypeUrl: policyv1.TypeURL, Value: []byte{0xff, 0xff}}
	if err := srv.applyResources("1", []*anyT{garbage}); err == nil {
		t.Error("undecodable policy accepted")
	}
	wrapped := mustAny(t, &discoveryv3.Resource{Name: policyv1.ResourceName, Resource: good})
	if err := srv.applyResources("2", []*anyT{wrapped}); err != nil || srv.ConfigVersion() != "c1" {
		t.Errorf("wrapped resource: %v", err)
	}
	misnamed := mustAny(t, &discoveryv3.Resource{Name: "other", Resource: good})
	if err := srv.applyResources("3", []*anyT{misnamed}); err == nil {
		t.Error("resource with another name accepted")
	}
}

// TestPolicyOverTLSXDS: ext_proc's xDS client verifies a TLS control plane that requires
// client certificates, presents its own (seen by the control plane as the extproc role),
// and gets its policy and updates; a client that cannot verify the control plane takes
// nothing from it.
func TestPolicyOverTLSXDS(t *testing.T) {
	t.Parallel()
	p := newPKI(t)
	cpFiles := p.leaf(t, "xds", "xds")
	epFiles := p.leaf(t, "extproc-client", "extproc")
	cpTLS := load(t, cpFiles, 0).ServerConfig("h2") // CA set: client certificates required
	cp := startControlPlaneWith(t, "127.0.0.1:0", testPolicy("c1"), grpc.Creds(credentials.NewTLS(cpTLS)))

	h := startServer(t, Config{
		XDSAddress: cp.addr, NodeID: "ep-tls", XDSMinBackoff: 20 * time.Millisecond, XDSMaxBackoff: 100 * time.Millisecond,
		XDSTLS: load(t, epFiles, 0).ClientConfig(tlsfiles.ServerNameOf(cp.addr)),
	}, nil)
	eventually(t, 5*time.Second, "policy over TLS", func() bool { return h.srv.ConfigVersion() == "c1" })
	cp.mu.Lock()
	peers := append([]string(nil), cp.peers...)
	cp.mu.Unlock()
	if len(peers) == 0 || peers[0] != "spiffe://patchbay.local/role/extproc" {
		t.Errorf("control plane saw client identities %q, want the extproc certificate's URI", peers)
	}
	if err := cp.cache.UpdateResource(policyv1.ResourceName, testPolicy("c2")); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Second, "update over TLS", func() bool { return h.srv.ConfigVersion() == "c2" })

	// A client that does not trust the control plane's CA never takes a policy from it:
	// the handshake fails on every attempt (bounded wait: it keeps retrying meanwhile).
	other := newPKI(t)
	var logs syncBuffer
	untrusting := startServer(t, Config{
		XDSAddress: cp.addr, XDSMinBackoff: 10 * time.Millisecond, XDSMaxBackoff: 20 * time.Millisecond,
		XDSTLS: load(t, tlsfiles.Files{Cert: epFiles.Cert, Key: epFiles.Key, CA: other.leaf(t, "x", "xds").CA}, 0).ClientConfig("127.0.0.1"),
		Logger: zerolog.New(&logs),
	}, nil)
	eventually(t, 5*time.Second, "a refused handshake", func() bool {
		return strings.Count(logs.String(), "verify server certificate") >= 3
	})
	if untrusting.srv.Ready() {
		t.Error("took a policy from a control plane whose certificate it cannot verify")
	}
}

// syncBuffer is a bytes.Buffer safe for a logger and a test reading it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
