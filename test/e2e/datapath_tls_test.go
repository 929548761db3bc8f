package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/internal/tlsfiles"
	"github.com/patchbay-io/patchbay/test/envoymodel"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// tlsREST is an OIP REST host that accepts only mutual TLS and records its last client.
type tlsREST struct {
	peerURI atomic.Value
	addr    string
}

func startTLSREST(t *testing.T, files tlsfiles.Files, model, version string) *tlsREST {
	t.Helper()
	src, err := tlsfiles.Load(files, tlsfiles.Options{})
	if err != nil {
		t.Fatal(err)
	}
	h := &tlsREST{}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v2/models/"+model+"/infer", func(w http.ResponseWriter, r *http.Request) {
		h.peerURI.Store(tlsfiles.PeerURI(r.TLS))
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]string{"model_name": model, "model_version": version})
	})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: mux, TLSConfig: src.ServerConfig("h2", "http/1.1")}
	go srv.ServeTLS(lis, "", "")
	t.Cleanup(func() { srv.Close() })
	h.addr = lis.Addr().String()
	return h
}

// TestEnvoyUpstreamTLS: with --upstream-tls and the upstream CA and client certificate,
// the Envoy resources (fed to the Envoy model, which reads the ADS-served SDS secrets and
// the files they name) reach mutual-TLS-only model hosts over REST (ALPN http/1.1) and gRPC
// (ALPN h2), presenting Envoy's certificate; a host whose certificate lacks the model-host
// identity is refused.
func TestEnvoyUpstreamTLS(t *testing.T) {
	ca, err := tlsfiles.NewCA("e2e", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	leaf := func(name, uri string) tlsfiles.Files {
		f, err := ca.WriteLeaf(dir, name, tlsfiles.Leaf{Name: name, Hosts: []string{"127.0.0.1"}, URI: uri})
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	hostFiles := leaf("modelhost", translate.ModelhostIdentity)
	edgeFiles := leaf("edge", "spiffe://patchbay.local/role/edge")
	wrongFiles := leaf("impostor", "spiffe://patchbay.local/role/extproc")

	rest := startTLSREST(t, hostFiles, "ranker", "v7")
	impostor := startTLSREST(t, wrongFiles, "recs", "v1")
	src, err := tlsfiles.Load(hostFiles, tlsfiles.Options{})
	if err != nil {
		t.Fatal(err)
	}
	gb := &tlsBackend{}
	gl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(src.ServerConfig("h2"))))
	oip.RegisterGRPCInferenceServiceServer(gs, gb)
	go gs.Serve(gl)
	t.Cleanup(gs.Stop)

	rollouts := t.TempDir()
	writeRollout(t, rollouts, "ranker.yaml", fmt.Sprintf("apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: ranker\n"+
		"versions:\n  - {name: v7, endpoints: [%q]}\ntraffic: {v7: 100}\nretries: 0\n", rest.addr))
	writeRollout(t, rollouts, "recs.yaml", fmt.Sprintf("apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: recs\n"+
		"versions:\n  - {name: v1, endpoints: [%q]}\ntraffic: {v1: 100}\nretries: 0\n", impostor.addr))
	writeRollout(t, rollouts, "churn.yaml", fmt.Sprintf("apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: churn\n"+
		"versions:\n  - {name: v1, endpoints: [%q], protocol: grpc}\ntraffic: {v1: 100}\n", gl.Addr().String()))
	xdsAddr, xdsAdmin := freeAddr(t), freeAddr(t)
	startProc(t, "xds", "http://"+xdsAdmin+"/readyz", "xds", "--rollouts", rollouts, "--listen", xdsAddr, "--admin", xdsAdmin,
		"--upstream-tls", "--upstream-tls-ca", hostFiles.CA, "--upstream-tls-cert", edgeFiles.Cert, "--upstream-tls-key", edgeFiles.Key,
		"--log-level", "warn")

	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	// No ext_proc: the filter fails open, which is all this test needs.
	edge, err := envoymodel.Start(ctx, envoymodel.Config{XDSAddr: xdsAddr, ExtprocAddr: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := edge.Server()
	go srv.Serve(lis)
	t.Cleanup(func() { srv.Close() })
	waitFor(t, 10*time.Second, "edge config", func() bool { return edge.Ready() && edge.Endpoints("churn_v1_grpc") > 0 })
	base := "http://" + lis.Addr().String()

	var code int
	var body string
	waitFor(t, 5*time.Second, "REST infer over TLS", func() bool {
		code, _, body = httpCall(t, http.MethodPost, base+"/v2/models/ranker/infer", features)
		return code == 200
	})
	if got, _ := rest.peerURI.Load().(string); got != "spiffe://patchbay.local/role/edge" {
		t.Fatalf("REST host saw client %q, want Envoy's certificate", got)
	}
	gctx := metadata.AppendToOutgoingContext(context.Background(), "x-patchbay-model", "churn")
	if r, err := churnInfer(gctx, grpcClient(t, lis.Addr().String())); err != nil || r.GetModelVersion() != "v1" {
		t.Fatalf("gRPC ModelInfer over TLS: %v %v", r, err)
	}
	if got, _ := gb.peerURI.Load().(string); got != "spiffe://patchbay.local/role/edge" {
		t.Fatalf("gRPC host saw client %q, want Envoy's certificate", got)
	}
	if code, _, body = httpCall(t, http.MethodPost, base+"/v2/models/recs/infer", features); code != http.StatusServiceUnavailable {
		t.Fatalf("infer on a host without the model-host identity: %d %s, want 503", code, body)
	}
	if impostor.peerURI.Load() != nil {
		t.Fatal("a request reached the host with the wrong identity")
	}
}

// TestEdgeTLS: with --edge-tls-cert/--edge-tls-key/--edge-client-ca the edge listener (in
// the Envoy model, from the listener's DownstreamTlsContext and the ADS-served secrets)
// serves REST and gRPC only over TLS, to clients with a certificate from the client CA.
func TestEdgeTLS(t *testing.T) {
	ca, err := tlsfiles.NewCA("e2e", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	clientCA, err := tlsfiles.NewCA("e2e-clients", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	edgeFiles, err := ca.WriteLeaf(t.TempDir(), "edge", tlsfiles.Leaf{Name: "edge", Hosts: []string{"127.0.0.1"}, URI: "spiffe://patchbay.local/role/edge"})
	if err != nil {
		t.Fatal(err)
	}
	userFiles, err := clientCA.WriteLeaf(t.TempDir(), "user", tlsfiles.Leaf{Name: "user"})
	if err != nil {
		t.Fatal(err)
	}
	h := startHost(t, "host", "ranker/v7", "churn/v1")
	rollouts := t.TempDir()
	writeRollout(t, rollouts, "ranker.yaml", fmt.Sprintf("apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: ranker\n"+
		"versions:\n  - {name: v7, endpoints: [%q]}\ntraffic: {v7: 100}\n", h.http))
	writeRollout(t, rollouts, "churn.yaml", fmt.Sprintf("apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: churn\n"+
		"versions:\n  - {name: v1, endpoints: [%q], protocol: grpc}\ntraffic: {v1: 100}\n", h.grpc))
	xdsAddr, xdsAdmin := freeAddr(t), freeAddr(t)
	startProc(t, "xds", "http://"+xdsAdmin+"/readyz", "xds", "--rollouts", rollouts, "--listen", xdsAddr, "--admin", xdsAdmin,
		"--edge-tls-cert", edgeFiles.Cert, "--edge-tls-key", edgeFiles.Key, "--edge-client-ca", userFiles.CA, "--log-level", "warn")
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	edge, err := envoymodel.Start(ctx, envoymodel.Config{XDSAddr: xdsAddr, ExtprocAddr: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := edge.Server()
	go srv.Serve(edge.Listener(lis))
	t.Cleanup(func() { srv.Close() })
	waitFor(t, 10*time.Second, "edge config", edge.Ready)
	addr := lis.Addr().String()

	// The client trusts the edge's CA and presents a certificate from the client CA.
	userSrc, err := tlsfiles.Load(tlsfiles.Files{Cert: userFiles.Cert, Key: userFiles.Key, CA: edgeFiles.CA}, tlsfiles.Options{})
	if err != nil {
		t.Fatal(err)
	}
	withCert := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: userSrc.ClientConfig("127.0.0.1")}}
	var resp *http.Response
	waitFor(t, 5*time.Second, "REST over edge TLS", func() bool {
		resp, err = withCert.Post("https://"+addr+"/v2/models/ranker/infer", "application/json", strings.NewReader(features))
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	if resp.TLS == nil {
		t.Fatal("answer did not come over TLS")
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(userSrc.ClientConfig("127.0.0.1"))))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	gctx := metadata.AppendToOutgoingContext(context.Background(), "x-patchbay-model", "churn")
	if _, err := churnInfer(gctx, oip.NewGRPCInferenceServiceClient(conn)); err != nil {
		t.Fatalf("gRPC over edge TLS: %v", err)
	}

	// Without a client certificate, and in plaintext: refused.
	noCertSrc, err := tlsfiles.Load(tlsfiles.Files{CA: edgeFiles.CA}, tlsfiles.Options{})
	if err != nil {
		t.Fatal(err)
	}
	noCert := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: noCertSrc.ClientConfig("127.0.0.1")}}
	if resp, err := noCert.Post("https://"+addr+"/v2/models/ranker/infer", "application/json", strings.NewReader(features)); err == nil {
		resp.Body.Close()
		t.Fatalf("a client without a certificate got %d", resp.StatusCode)
	}
	if resp, err := client.Post("http://"+addr+"/v2/models/ranker/infer", "application/json", strings.NewReader(features)); err == nil && resp.StatusCode == 200 {
		resp.Body.Close()
		t.Fatal("plaintext infer succeeded on a TLS edge")
	}
}
