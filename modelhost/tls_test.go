package modelhost_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/internal/tlsfiles"
	"github.com/patchbay-io/patchbay/modelhost"
)

// tlsHost is a model host serving REST, gRPC and admin over TLS with client certificates
// required, from files in dir.
type tlsHost struct {
	rest, grpc, admin string // host:port
	dir               string
	ca                *tlsfiles.CA
	server            tlsfiles.Files
}

func startTLSHost(t *testing.T) *tlsHost {
	t.Helper()
	dir := t.TempDir()
	ca, err := tlsfiles.NewCA("modelhost-test-ca", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	files, err := ca.WriteLeaf(dir, "server", tlsfiles.Leaf{Name: "modelhost", Hosts: []string{"127.0.0.1"}, URI: "spiffe://patchbay.local/role/modelhost"})
	if err != nil {
		t.Fatal(err)
	}
	src, err := tlsfiles.Load(files, tlsfiles.Options{CheckInterval: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	tokenFile := filepath.Join(dir, "token")
	writeFile(t, tokenFile, testToken)
	srv, err := modelhost.New(modelhost.Config{Repository: testRepo(t), Logger: zerolog.Nop(), TLS: src, AdminTokenFile: tokenFile})
	if err != nil {
		t.Fatal(err)
	}
	var ls [3]net.Listener
	for i := range ls {
		if ls[i], err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.ServeAll(ctx, modelhost.Listeners{HTTP: ls[0], GRPC: ls[1], Admin: ls[2]}) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("ServeAll: %v", err)
		}
	})
	return &tlsHost{rest: ls[0].Addr().String(), grpc: ls[1].Addr().String(), admin: ls[2].Addr().String(), dir: dir, ca: ca, server: files}
}

// clientTLS trusts the host's CA and presents a certificate issued by issuer (none if nil).
func (h *tlsHost) clientTLS(t *testing.T, issuer *tlsfiles.CA, name string) *tls.Config {
	t.Helper()
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(h.ca.CertPEM())
	cfg := &tls.Config{RootCAs: roots, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12}
	if issuer != nil {
		certPEM, keyPEM, err := issuer.Issue(tlsfiles.Leaf{Name: name, URI: "spiffe://patchbay.local/role/operator"})
		if err != nil {
			t.Fatal(err)
		}
		c, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{c}
	}
	return cfg
}

func httpsClient(cfg *tls.Config) *http.Client {
	return &http.Client{Transport: &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: true}, Timeout: 10 * time.Second}
}

// get answers the status (or -1 and the error) of a request, and the protocol it used.
func get(c *http.Client, method, url, body, token string) (int, int, error) {
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		return -1, 0, err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := c.Do(req)
	if err != nil {
		return -1, 0, err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, resp.ProtoMajor, nil
}

func grpcTLS(t *testing.T, addr string, cfg *tls.Config) oip.GRPCInferenceServiceClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return oip.NewGRPCInferenceServiceClient(conn)
}

// TestMutualTLSOnEveryListener: with --tls-cert/--tls-key/--client-ca, the REST (h2 by
// ALPN), gRPC and admin listeners (REST and gRPC) serve a client that presents a
// certificate from the client CA, and refuse one without a certificate or with one from
// another CA.
func TestMutualTLSOnEveryListener(t *testing.T) {
	h := startTLSHost(t)
	good := h.clientTLS(t, h.ca, "client")
	other, err := tlsfiles.NewCA("other", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	infer := "https://" + h.rest + "/v2/models/ranker/infer"
	if code, proto, err := get(httpsClient(good), "POST", infer, rankerBody, ""); code != 200 || proto != 2 {
		t.Errorf("REST with a client certificate: %d HTTP/%d %v, want 200 over HTTP/2", code, proto, err)
	}
	h1 := good.Clone()
	h1.NextProtos = []string{"http/1.1"}
	if code, proto, err := get(&http.Client{Transport: &http.Transport{TLSClientConfig: h1}}, "POST", infer, rankerBody, ""); code != 200 || proto != 1 {
		t.Errorf("REST over HTTP/1.1 with a client certificate: %d HTTP/%d %v", code, proto, err)
	}
	for name, cfg := range map[string]*tls.Config{"no certificate": h.clientTLS(t, nil, ""), "certificate from another CA": h.clientTLS(t, other, "intruder")} {
		if code, _, err := get(httpsClient(cfg), "POST", infer, rankerBody, ""); err == nil {
			t.Errorf("REST with %s: %d, want a refused handshake", name, code)
		}
		if _, err := grpcTLS(t, h.grpc, cfg).ServerLive(context.Background(), &oip.ServerLiveRequest{}); err == nil {
			t.Errorf("gRPC with %s: served", name)
		}
		if code, _, err := get(httpsClient(cfg), "POST", "https://"+h.admin+"/v2/repository/index", "", testToken); err == nil {
			t.Errorf("admin with %s: %d, want a refused handshake", name, code)
		}
	}
	if _, err := grpcTLS(t, h.grpc, good).ModelInfer(context.Background(), &oip.ModelInferRequest{ModelName: "ranker",
		Inputs: []*oip.ModelInferRequest_InferInputTensor{{Name: "features", Datatype: "FP32", Shape: []int64{1, 8}, Contents: &oip.InferTensorContents{Fp32Contents: make([]float32, 8)}}}}); err != nil {
		t.Errorf("gRPC with a client certificate: %v", err)
	}
	if code, _, err := get(httpsClient(good), "POST", "https://"+h.admin+"/v2/repository/index", "", testToken); code != 200 {
		t.Errorf("admin REST with a client certificate and the token: %d %v", code, err)
	}
	if code, _, _ := get(httpsClient(good), "POST", "https://"+h.admin+"/v2/repository/index", "", ""); code != 401 {
		t.Errorf("admin REST with a client certificate but no token: %d, want 401 (the certificate alone is not enough)", code)
	}
	ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+testToken)
	if idx, err := grpcTLS(t, h.admin, good).RepositoryIndex(ctx, &oip.RepositoryIndexRequest{}); err != nil || len(idx.Models) == 0 {
		t.Errorf("admin gRPC over TLS: %v %v", idx, err)
	}
}

// TestTLSRotation: a new server certificate and a new client CA written over the files are
// used by the next handshakes, without a restart.
func TestTLSRotation(t *testing.T) {
	h := startTLSHost(t)
	serial := func(cfg *tls.Config, addr string) (*big.Int, error) {
		cfg = cfg.Clone()
		cfg.NextProtos = []string{"h2"} // grpc-go refuses a connection without ALPN h2
		c, err := tls.Dial("tcp", addr, cfg)
		if err != nil {
			return nil, err
		}
		defer c.Close()
		if err := c.Handshake(); err != nil {
			return nil, err
		}
		// With TLS 1.3 a refused client certificate shows on the first read.
		_ = c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); err != nil && !isTimeout(err) {
			return nil, err
		}
		return c.ConnectionState().PeerCertificates[0].SerialNumber, nil
	}
	oldClient := h.clientTLS(t, h.ca, "client")
	before, err := serial(oldClient, h.rest)
	if err != nil {
		t.Fatal(err)
	}
	// Rotate: a new CA; the server's certificate and the client CA bundle both come from it.
	ca2, err := tlsfiles.NewCA("rotated-ca", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ca2.WriteLeaf(h.dir, "server", tlsfiles.Leaf{Name: "modelhost", Hosts: []string{"127.0.0.1"}}); err != nil {
		t.Fatal(err)
	}
	future := time.Now().Add(time.Minute)
	for _, f := range []string{h.server.Cert, h.server.Key, h.server.CA} {
		if err := os.Chtimes(f, future, future); err != nil {
			t.Fatal(err)
		}
	}
	newClient := h.clientTLS(t, ca2, "client")
	newClient.RootCAs = x509.NewCertPool()
	newClient.RootCAs.AppendCertsFromPEM(ca2.CertPEM())
	var after *big.Int
	waitFor(t, func() bool { after, err = serial(newClient, h.rest); return err == nil })
	if after.Cmp(before) == 0 {
		t.Error("the server still presents the old certificate")
	}
	for _, addr := range []string{h.rest, h.grpc, h.admin} {
		if _, err := serial(newClient, addr); err != nil {
			t.Errorf("%s after rotation with the new client certificate: %v", addr, err)
		}
		stale := newClient.Clone()
		stale.Certificates = oldClient.Certificates // issued by the CA that was rotated out
		if _, err := serial(stale, addr); err == nil {
			t.Errorf("%s after rotation accepted a client certificate from the old CA", addr)
		}
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errorsAs(err, &ne) && ne.Timeout()
}

func errorsAs(err error, target *net.Error) bool {
	for err != nil {
		if ne, ok := err.(net.Error); ok {
			*target = ne
			return true
		}
		u, ok := err.(interface{ Unwrap() error })
		if !ok {
			return false
		}
		err = u.Unwrap()
	}
	return false
}
