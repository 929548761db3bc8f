package xds

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	xdsresolver "google.golang.org/grpc/xds"

	"github.com/patchbay-io/patchbay/api/oip"
	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
	"github.com/patchbay-io/patchbay/internal/tlsfiles"
)

// pki is a throwaway CA with a server certificate and one client certificate per identity.
type pki struct {
	server  tlsfiles.Files
	clients map[string]tlsfiles.Files // by short name
}

const mappedURI = "spiffe://corp.example/ns/gateway/sa/edge-envoy"

func newPKI(t *testing.T) *pki {
	t.Helper()
	dir := t.TempDir()
	ca, err := tlsfiles.NewCA("patchbay test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	p := &pki{clients: map[string]tlsfiles.Files{}}
	if p.server, err = ca.WriteLeaf(dir, "server", tlsfiles.Leaf{Name: "xds", Hosts: []string{"127.0.0.1", "localhost"}}); err != nil {
		t.Fatal(err)
	}
	for name, uri := range map[string]string{
		"edge": SPIFFEPrefix + "edge", "sidecar": SPIFFEPrefix + "sidecar", "grpc": SPIFFEPrefix + "grpc",
		"extproc": SPIFFEPrefix + "extproc", "operator": SPIFFEPrefix + "operator", "modelhost": SPIFFEPrefix + "modelhost",
		"unknown": SPIFFEPrefix + "nobody", "foreign": "spiffe://elsewhere.example/role/edge", "none": "",
		"mapped": mappedURI,
	} {
		if p.clients[name], err = ca.WriteLeaf(dir, "client-"+name, tlsfiles.Leaf{Name: name, URI: uri}); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

func startTLSCP(t *testing.T, dir string, p *pki) *cp {
	return startCPWith(t, dir, func(cfg *Config) {
		cfg.TLS = p.server
		cfg.PeerRoles = map[string]string{mappedURI: RoleEdge}
	})
}

func clientTLS(t *testing.T, f tlsfiles.Files) *tls.Config {
	t.Helper()
	src, err := tlsfiles.Load(f, tlsfiles.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return src.ClientConfig("127.0.0.1")
}

func adsStreamTLS(t *testing.T, c *cp, f tlsfiles.Files) discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesClient {
	t.Helper()
	conn, err := grpc.NewClient(c.grpcAddr, grpc.WithTransportCredentials(credentials.NewTLS(clientTLS(t, f))))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	s, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// refused sends one request and expects the stream to end with PermissionDenied.
func refused(t *testing.T, s discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesClient, n *corev3.Node, typeURL string) {
	t.Helper()
	// A stream refused when it opens may be closed before the send: Send then reports
	// io.EOF and Recv the stream's status (grpc-go's ClientStream.SendMsg contract).
	if err := s.Send(&discoveryv3.DiscoveryRequest{Node: n, TypeUrl: typeURL}); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	r, err := s.Recv()
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("got %v (%d resources), want PermissionDenied", err, len(r.GetResources()))
	}
}

func listenerName(t *testing.T, r *discoveryv3.DiscoveryResponse) string {
	t.Helper()
	if len(r.GetResources()) != 1 {
		t.Fatalf("%d listeners", len(r.GetResources()))
	}
	l := &listenerv3.Listener{}
	if err := r.GetResources()[0].UnmarshalTo(l); err != nil {
		t.Fatal(err)
	}
	return l.GetName()
}

// TestMTLSRolesFollowCertificates: with client certificates required, a client's flavour
// follows its certificate's URI SAN (or the configured mapping), not its node: a sidecar
// certificate claiming to be an edge Envoy gets the sidecar listener, a gRPC certificate
// cannot read the ext_proc policy, an unknown identity gets nothing, and no certificate
// no connection.
func TestMTLSRolesFollowCertificates(t *testing.T) {
	p := newPKI(t)
	dir := t.TempDir()
	writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", map[string]string{"v1": "127.0.0.1:9001"}, "{v1: 100}", ""))
	c := startTLSCP(t, dir, p)
	extprocNode := &corev3.Node{Id: "x", UserAgentName: policyv1.ExtprocUserAgent}

	t.Run("sidecar certificate claiming edge gets the sidecar listener", func(t *testing.T) {
		s := adsStreamTLS(t, c, p.clients["sidecar"])
		if got := listenerName(t, fetch(t, s, envoyNode("edge"), resource.ListenerType)); got != "patchbay_sidecar" {
			t.Fatalf("listener %q, want patchbay_sidecar", got)
		}
	})
	t.Run("delta: sidecar certificate claiming edge gets the sidecar listener", func(t *testing.T) {
		conn, err := grpc.NewClient(c.grpcAddr, grpc.WithTransportCredentials(credentials.NewTLS(clientTLS(t, p.clients["sidecar"]))))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{Node: envoyNode("edge"), TypeUrl: resource.ListenerType}); err != nil {
			t.Fatal(err)
		}
		r, err := s.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if len(r.GetResources()) != 1 || r.GetResources()[0].GetName() != "patchbay_sidecar" {
			t.Fatalf("delta listeners %v, want patchbay_sidecar", r.GetResources())
		}
	})
	t.Run("mapped URI is an edge even when it claims sidecar", func(t *testing.T) {
		s := adsStreamTLS(t, c, p.clients["mapped"])
		if got := listenerName(t, fetch(t, s, envoyNode("sidecar"), resource.ListenerType)); got != "patchbay_edge" {
			t.Fatalf("listener %q, want patchbay_edge", got)
		}
	})
	t.Run("grpc certificate cannot read the policy, even claiming to be ext_proc", func(t *testing.T) {
		refused(t, adsStreamTLS(t, c, p.clients["grpc"]), extprocNode, policyv1.TypeURL)
	})
	t.Run("edge certificate cannot read the policy", func(t *testing.T) {
		refused(t, adsStreamTLS(t, c, p.clients["edge"]), envoyNode("edge"), policyv1.TypeURL)
	})
	t.Run("extproc certificate reads the policy and nothing else", func(t *testing.T) {
		r := fetch(t, adsStreamTLS(t, c, p.clients["extproc"]), extprocNode, policyv1.TypeURL)
		if len(r.GetResources()) != 1 {
			t.Fatalf("%d policy resources", len(r.GetResources()))
		}
		refused(t, adsStreamTLS(t, c, p.clients["extproc"]), envoyNode("edge"), resource.ClusterType)
	})
	for _, who := range []string{"unknown", "foreign", "none", "operator"} {
		t.Run(who+" identity gets nothing", func(t *testing.T) {
			refused(t, adsStreamTLS(t, c, p.clients[who]), envoyNode("edge"), resource.ListenerType)
		})
	}
	t.Run("no client certificate, no stream", func(t *testing.T) {
		cfg := clientTLS(t, tlsfiles.Files{CA: p.server.CA})
		conn, err := grpc.NewClient(c.grpcAddr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
		if err == nil {
			if err = s.Send(&discoveryv3.DiscoveryRequest{Node: envoyNode("edge"), TypeUrl: resource.ListenerType}); err == nil {
				_, err = s.Recv()
			}
		}
		if err == nil || status.Code(err) == codes.DeadlineExceeded {
			t.Fatalf("a client without a certificate: %v, want a failed handshake", err)
		}
	})
	t.Run("plaintext client, no stream", func(t *testing.T) {
		conn, err := grpc.NewClient(c.grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
		if err == nil {
			if err = s.Send(&discoveryv3.DiscoveryRequest{Node: envoyNode("edge"), TypeUrl: resource.ListenerType}); err == nil {
				_, err = s.Recv()
			}
		}
		if err == nil || status.Code(err) == codes.DeadlineExceeded {
			t.Fatalf("a plaintext client: %v, want a failed connection", err)
		}
	})
}

// TestMTLSProxylessGRPC: grpc-go's own xDS client, with TLS channel credentials in its
// bootstrap and a grpc certificate, gets its routes over mutual TLS.
func TestMTLSProxylessGRPC(t *testing.T) {
	p := newPKI(t)
	v1 := startBackend(t, "v1")
	dir := t.TempDir()
	writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", map[string]string{"v1": v1.addr}, "{v1: 100}", ""))
	c := startTLSCP(t, dir, p)
	f := p.clients["grpc"]
	bootstrap := fmt.Sprintf(`{
		"xds_servers": [{"server_uri": %q, "server_features": ["xds_v3"],
			"channel_creds": [{"type": "tls", "config": {"ca_certificate_file": %q, "certificate_file": %q, "private_key_file": %q}}]}],
		"node": {"id": "proxyless-mtls-%d", "locality": {"region": "patchbay"}}
	}`, c.grpcAddr, f.CA, f.Cert, f.Key, time.Now().UnixNano())
	rb, err := xdsresolver.NewXDSResolverWithConfigForTesting([]byte(bootstrap))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("xds:///ranker", grpc.WithResolvers(rb), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if got := countCalls(t, oip.NewGRPCInferenceServiceClient(conn), 20); got["v1"] != 20 {
		t.Fatalf("proxyless over mTLS: %v", got)
	}
	if n := c.srv.Status().Clients[FlavourGRPC]; n < 1 {
		t.Fatalf("clients %v: the proxyless client is not counted as grpc", c.srv.Status().Clients)
	}
}

// TestMTLSAdmin: over TLS the admin mutations take a client certificate with role operator
// instead of the token; any other identity still needs the token; no certificate, no
// connection.
func TestMTLSAdmin(t *testing.T) {
	p := newPKI(t)
	dir := t.TempDir()
	writeFile(t, dir, "m.yaml", rolloutDoc("m", map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002"}, "{v1: 50, v2: 50}", ""))
	c := startTLSCP(t, dir, p)
	url := "https://" + c.adminAddr + "/v1/models/m/rollback"
	do := func(who, token string) (int, error) {
		f := p.clients[who]
		if who == "" {
			f = tlsfiles.Files{CA: p.server.CA}
		}
		cl := &http.Client{Transport: &http.Transport{TLSClientConfig: clientTLS(t, f), ForceAttemptHTTP2: true}, Timeout: 5 * time.Second}
		req, _ := http.NewRequest(http.MethodPost, url, strings.NewReader(`{"version":"v1"}`))
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := cl.Do(req)
		if err != nil {
			return 0, err
		}
		resp.Body.Close()
		if resp.ProtoMajor != 2 {
			t.Errorf("admin over TLS answered %s, want HTTP/2 (ALPN h2)", resp.Proto)
		}
		return resp.StatusCode, nil
	}
	for _, tc := range []struct {
		who, token string
		want       int
	}{
		{"operator", "", http.StatusOK},
		{"edge", "", http.StatusUnauthorized},
		{"unknown", "", http.StatusUnauthorized},
		{"edge", testToken, http.StatusOK},
	} {
		if code, err := do(tc.who, tc.token); err != nil || code != tc.want {
			t.Errorf("%s with token %v: %d %v, want %d", tc.who, tc.token != "", code, err, tc.want)
		}
	}
	if _, err := do("", testToken); err == nil {
		t.Error("a client without a certificate reached the admin API")
	}
}
