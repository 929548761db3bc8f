package e2e

import (
	"context"
	"fmt"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	xdscreds "google.golang.org/grpc/credentials/xds"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	xdsresolver "google.golang.org/grpc/xds"

	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/internal/tlsfiles"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// tlsBackend is an OIP gRPC server that requires client certificates and records the
// identity of the last client that reached it.
type tlsBackend struct {
	oip.UnimplementedGRPCInferenceServiceServer
	infers  atomic.Int64
	unloads atomic.Int64
	peerURI atomic.Value
}

func (b *tlsBackend) ModelInfer(ctx context.Context, _ *oip.ModelInferRequest) (*oip.ModelInferResponse, error) {
	b.infers.Add(1)
	if p, ok := peer.FromContext(ctx); ok {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok {
			b.peerURI.Store(tlsfiles.PeerURI(&ti.State))
		}
	}
	return &oip.ModelInferResponse{ModelName: "churn", ModelVersion: "v1"}, nil
}

func (b *tlsBackend) RepositoryModelUnload(context.Context, *oip.RepositoryModelUnloadRequest) (*oip.RepositoryModelUnloadResponse, error) {
	b.unloads.Add(1)
	return &oip.RepositoryModelUnloadResponse{}, nil
}

// TestProxylessUpstreamTLS: with a version marked tls: true and the control plane given
// --upstream-tls-ca, grpc-go's own xDS client (dialing with xDS credentials and a bootstrap
// defining the "patchbay" certificate provider instance, gRFC A29) reaches a model host that
// accepts only mutual TLS, presenting its own certificate; the repository stays refused.
func TestProxylessUpstreamTLS(t *testing.T) {
	ca, err := tlsfiles.NewCA("e2e", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	hostFiles, err := ca.WriteLeaf(dir, "modelhost", tlsfiles.Leaf{Name: "modelhost", Hosts: []string{"127.0.0.1"}, URI: translate.ModelhostIdentity})
	if err != nil {
		t.Fatal(err)
	}
	clientFiles, err := ca.WriteLeaf(dir, "grpc", tlsfiles.Leaf{Name: "grpc", URI: "spiffe://patchbay.local/role/grpc"})
	if err != nil {
		t.Fatal(err)
	}
	src, err := tlsfiles.Load(hostFiles, tlsfiles.Options{})
	if err != nil {
		t.Fatal(err)
	}
	b := &tlsBackend{}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(src.ServerConfig("h2"))))
	oip.RegisterGRPCInferenceServiceServer(gs, b)
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)

	rollouts := t.TempDir()
	writeRollout(t, rollouts, "churn.yaml", fmt.Sprintf("apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: churn\n"+
		"versions:\n  - {name: v1, endpoints: [%q], protocol: grpc, tls: true}\ntraffic: {v1: 100}\n", lis.Addr().String()))
	xdsAddr, xdsAdmin := freeAddr(t), freeAddr(t)
	startProc(t, "xds", "http://"+xdsAdmin+"/readyz", "xds", "--rollouts", rollouts, "--listen", xdsAddr,
		"--admin", xdsAdmin, "--upstream-tls-ca", hostFiles.CA, "--log-level", "warn")

	bootstrap := fmt.Sprintf(`{
		"xds_servers": [{"server_uri": %q, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
		"node": {"id": "e2e-proxyless-tls"},
		"certificate_providers": {%q: {"plugin_name": "file_watcher", "config": {
			"certificate_file": %q, "private_key_file": %q, "ca_certificate_file": %q, "refresh_interval": "600s"}}}
	}`, xdsAddr, translate.CertProviderInstance, clientFiles.Cert, clientFiles.Key, clientFiles.CA)
	rb, err := xdsresolver.NewXDSResolverWithConfigForTesting([]byte(bootstrap))
	if err != nil {
		t.Fatal(err)
	}
	creds, err := xdscreds.NewClientCredentials(xdscreds.ClientOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("xds:///churn", grpc.WithResolvers(rb), grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := oip.NewGRPCInferenceServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i := 0; i < 5; i++ {
		r, err := client.ModelInfer(ctx, &oip.ModelInferRequest{ModelName: "churn"}, grpc.WaitForReady(true))
		if err != nil || r.GetModelVersion() != "v1" {
			t.Fatalf("ModelInfer %d over TLS via xds:///churn: %v %v", i, r, err)
		}
	}
	if got, _ := b.peerURI.Load().(string); got != "spiffe://patchbay.local/role/grpc" {
		t.Fatalf("the host saw client identity %q, want the proxyless client's certificate", got)
	}
	if _, err := client.RepositoryModelUnload(ctx, &oip.RepositoryModelUnloadRequest{ModelName: "churn"}); status.Code(err) != codes.PermissionDenied || b.unloads.Load() != 0 {
		t.Fatalf("RepositoryModelUnload over TLS: %v (host saw %d), want PERMISSION_DENIED at the client", err, b.unloads.Load())
	}
}
