package extproc

import (
	"context"
	"crypto/tls"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/testing/protocmp"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"

	"github.com/patchbay-io/patchbay/api/headers"
	"github.com/patchbay-io/patchbay/internal/tlsfiles"
)

// pki is a throwaway CA with certificates for the tests, written to a temp directory.
type pki struct {
	ca  *tlsfiles.CA
	dir string
}

func newPKI(t testing.TB) *pki {
	t.Helper()
	ca, err := tlsfiles.NewCA("extproc-test-ca", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return &pki{ca: ca, dir: t.TempDir()}
}

// leaf writes <base>.crt/.key for 127.0.0.1 with the role's SPIFFE URI.
func (p *pki) leaf(t testing.TB, base, role string) tlsfiles.Files {
	t.Helper()
	f, err := p.ca.WriteLeaf(p.dir, base, tlsfiles.Leaf{Name: role, Hosts: []string{"127.0.0.1"}, URI: "spiffe://patchbay.local/role/" + role})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func load(t testing.TB, f tlsfiles.Files, interval time.Duration) *tlsfiles.Source {
	t.Helper()
	src, err := tlsfiles.Load(f, tlsfiles.Options{CheckInterval: interval})
	if err != nil {
		t.Fatal(err)
	}
	return src
}

// tlsServer is a Server serving ext_proc and the admin listener with TLS from src.
type tlsServer struct {
	srv              *Server
	addr, adminAddr  string
	serverSrc        *tlsfiles.Source
	grpcCfg, httpCfg *tls.Config
}

func startTLSServer(t testing.TB, src *tlsfiles.Source) *tlsServer {
	t.Helper()
	ts := &tlsServer{serverSrc: src, grpcCfg: src.ServerConfig("h2"), httpCfg: src.ServerConfig("h2", "http/1.1")}
	h := startServer(t, Config{TLS: ts.grpcCfg, AdminTLS: ts.httpCfg}, testPolicy("c1"))
	ts.srv, ts.addr = h.srv, h.addr
	lis := newLocalListener(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.srv.ServeAdmin(ctx, lis, nil) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("ServeAdmin: %v", err)
		}
	})
	ts.adminAddr = lis.Addr().String()
	return ts
}

// dialTLS is a real ext_proc client (as Envoy's cluster to ext_proc) over TLS from cfg.
func dialTLS(t testing.TB, addr string, creds credentials.TransportCredentials) *harness {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &harness{client: extprocv3.NewExternalProcessorClient(conn), conn: conn, addr: addr}
}

// decide sends one routed request on a new stream and returns the stream's error.
func (h *harness) decide(t testing.TB) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := h.client.Process(ctx)
	if err != nil {
		return err
	}
	if err := s.Send(reqHeaders(true, ":path", "/v2/models/ranker/infer", headers.UserID, "u1")); err != nil {
		return err
	}
	got, err := s.Recv()
	if err != nil {
		return err
	}
	want := routed(nil, set(headers.Model, "ranker"), bucketOf("ranker-salt", "u1"))
	if diff := cmp.Diff(want, got, protocmp.Transform()); diff != "" {
		t.Errorf("answer over TLS (-want +got):\n%s", diff)
	}
	return s.CloseSend()
}

func TestMutualTLS(t *testing.T) {
	t.Parallel()
	p := newPKI(t)
	serverFiles := p.leaf(t, "extproc", "extproc")
	edge := p.leaf(t, "edge", "edge")
	ts := startTLSServer(t, load(t, serverFiles, 0))

	rogue := newPKI(t)
	rogueEdge := rogue.leaf(t, "edge", "edge")
	// A client that trusts our CA but presents a certificate from another one.
	rogueClient := tlsfiles.Files{Cert: rogueEdge.Cert, Key: rogueEdge.Key, CA: serverFiles.CA}

	clients := []struct {
		name  string
		creds credentials.TransportCredentials
		ok    bool
	}{
		{"client certificate from the CA", credentials.NewTLS(load(t, edge, 0).ClientConfig("127.0.0.1")), true},
		{"no client certificate", credentials.NewTLS(load(t, tlsfiles.Files{CA: serverFiles.CA}, 0).ClientConfig("127.0.0.1")), false},
		{"client certificate from another CA", credentials.NewTLS(load(t, rogueClient, 0).ClientConfig("127.0.0.1")), false},
		{"plaintext", insecure.NewCredentials(), false},
	}
	for _, c := range clients {
		t.Run("ext_proc/"+c.name, func(t *testing.T) {
			t.Parallel()
			err := dialTLS(t, ts.addr, c.creds).decide(t)
			if c.ok && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if !c.ok && status.Code(err) != codes.Unavailable {
				t.Fatalf("err = %v, want the connection refused (Unavailable)", err)
			}
		})
	}

	// The admin listener: the same certificate and client CA, over HTTPS.
	for _, c := range []struct {
		name string
		cfg  *tls.Config // nil: plain HTTP
		ok   bool
	}{
		{"client certificate from the CA", load(t, edge, 0).ClientConfig("127.0.0.1"), true},
		{"no client certificate", load(t, tlsfiles.Files{CA: serverFiles.CA}, 0).ClientConfig("127.0.0.1"), false},
		{"client certificate from another CA", load(t, rogueClient, 0).ClientConfig("127.0.0.1"), false},
	} {
		t.Run("admin/"+c.name, func(t *testing.T) {
			t.Parallel()
			hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: c.cfg, ForceAttemptHTTP2: true}}
			defer hc.CloseIdleConnections()
			resp, err := hc.Get("https://" + ts.adminAddr + "/readyz")
			if !c.ok {
				if err == nil {
					resp.Body.Close()
					t.Fatalf("admin answered %d without a valid client certificate", resp.StatusCode)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK || resp.ProtoMajor != 2 {
				t.Errorf("/readyz = %s %d %s, want HTTP/2 200", resp.Proto, resp.StatusCode, b)
			}
		})
	}
	t.Run("admin/plain HTTP", func(t *testing.T) {
		t.Parallel()
		hc := &http.Client{Timeout: 5 * time.Second}
		resp, err := hc.Get("http://" + ts.adminAddr + "/readyz")
		if err == nil {
			defer resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				t.Fatal("admin answered plain HTTP with 200")
			}
		}
	})
}

// servedSerial opens a new connection and returns the serial of the certificate the
// server presented on it.
func servedSerial(t testing.TB, addr string, creds credentials.TransportCredentials) string {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var pr peer.Peer
	if _, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.Peer(&pr)); err != nil {
		t.Fatalf("health over TLS: %v", err)
	}
	info, ok := pr.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.PeerCertificates) == 0 {
		t.Fatalf("no TLS peer info: %v", pr.AuthInfo)
	}
	return info.State.PeerCertificates[0].SerialNumber.String()
}

// TestCertificateRotation rewrites the server's certificate files in place with a new
// certificate from the same CA: new connections get it without a restart, and the
// connection opened before keeps working.
func TestCertificateRotation(t *testing.T) {
	t.Parallel()
	p := newPKI(t)
	serverFiles := p.leaf(t, "extproc", "extproc")
	edge := p.leaf(t, "edge", "edge")
	const interval = 20 * time.Millisecond
	ts := startTLSServer(t, load(t, serverFiles, interval))
	creds := credentials.NewTLS(load(t, edge, interval).ClientConfig("127.0.0.1"))

	before := servedSerial(t, ts.addr, creds)
	old := dialTLS(t, ts.addr, creds)
	if err := old.decide(t); err != nil {
		t.Fatal(err)
	}

	p.leaf(t, "extproc", "extproc") // rewrites extproc.crt and extproc.key (not atomically)
	deadline := time.Now().Add(10 * time.Second)
	after := before
	for after == before && time.Now().Before(deadline) {
		time.Sleep(interval)
		after = servedSerial(t, ts.addr, creds)
	}
	if after == before {
		t.Fatalf("new connections still get certificate %s 10 s after rotation", before)
	}
	if err := dialTLS(t, ts.addr, creds).decide(t); err != nil {
		t.Fatalf("decision over a connection with the new certificate: %v", err)
	}
	if err := old.decide(t); err != nil {
		t.Fatalf("connection from before the rotation: %v", err)
	}

	// The admin listener follows the same files.
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: load(t, edge, 0).ClientConfig("127.0.0.1")}}
	defer hc.CloseIdleConnections()
	resp, err := hc.Get("https://" + ts.adminAddr + "/livez")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if got := resp.TLS.PeerCertificates[0].SerialNumber.String(); got != after {
		t.Errorf("admin serves certificate %s, want the rotated %s", got, after)
	}
}
