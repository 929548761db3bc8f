package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	xdsresolver "google.golang.org/grpc/xds"

	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/test/envoymodel"
)

// closedChain is one model host serving ranker (called over REST) and churn (called over
// gRPC), the control plane, ext_proc, and the Envoy model serving HTTP/1.1 and h2c.
type closedChain struct {
	host    *host
	xdsAddr string
	edge    string // host:port
}

func startClosedChain(t *testing.T) *closedChain {
	t.Helper()
	c := &closedChain{host: startHost(t, "host", "ranker/v7", "churn/v1")}
	dir := t.TempDir()
	writeRollout(t, dir, "ranker.yaml", fmt.Sprintf("apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: ranker\n"+
		"versions:\n  - {name: v7, endpoints: [%q], protocol: http}\ntraffic: {v7: 100}\n", c.host.http))
	writeRollout(t, dir, "churn.yaml", fmt.Sprintf("apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: churn\n"+
		"versions:\n  - {name: v1, endpoints: [%q], protocol: grpc}\ntraffic: {v1: 100}\n", c.host.grpc))
	c.xdsAddr = freeAddr(t)
	xdsAdmin, epAddr, epAdmin := freeAddr(t), freeAddr(t), freeAddr(t)
	startProc(t, "xds", "http://"+xdsAdmin+"/readyz", "xds", "--rollouts", dir, "--listen", c.xdsAddr,
		"--admin", xdsAdmin, "--log-level", "warn")
	startProc(t, "extproc", "http://"+epAdmin+"/readyz", "extproc", "--listen", epAddr, "--xds", c.xdsAddr,
		"--admin", epAdmin, "--log-level", "warn")
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	edge, err := envoymodel.Start(ctx, envoymodel.Config{XDSAddr: c.xdsAddr, ExtprocAddr: epAddr})
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
	c.edge = lis.Addr().String()
	waitFor(t, 10*time.Second, "edge config", edge.Ready)
	return c
}

func httpCall(t *testing.T, method, url, body string) (int, http.Header, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, string(b)
}

func grpcClient(t *testing.T, addr string) oip.GRPCInferenceServiceClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return oip.NewGRPCInferenceServiceClient(conn)
}

func churnInfer(ctx context.Context, c oip.GRPCInferenceServiceClient) (*oip.ModelInferResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return c.ModelInfer(ctx, &oip.ModelInferRequest{
		ModelName: "churn",
		Inputs: []*oip.ModelInferRequest_InferInputTensor{{
			Name: "features", Datatype: "FP32", Shape: []int64{1, 4},
			Contents: &oip.InferTensorContents{Fp32Contents: []float32{0.1, 0.2, 0.3, 0.4}},
		}},
	})
}

// TestRepositoryNeverThroughEnvoy: through Envoy (its model, fed by the real control plane)
// a REST unload and a gRPC RepositoryModelUnload/Load/Index are answered by Envoy itself —
// REST 404 with the OIP error JSON, gRPC PERMISSION_DENIED — and never reach the host: the
// model stays loaded and keeps answering inference through the same proxy.
func TestRepositoryNeverThroughEnvoy(t *testing.T) {
	c := startClosedChain(t)
	base := "http://" + c.edge

	// REST.
	for _, path := range []string{"/v2/repository/models/ranker/unload", "/v2/repository/models/ranker/load", "/v2/repository/index"} {
		code, hdr, body := httpCall(t, http.MethodPost, base+path, "")
		var oipErr struct {
			Error string `json:"error"`
		}
		if code != http.StatusNotFound || hdr.Get("Content-Type") != "application/json" ||
			json.Unmarshal([]byte(body), &oipErr) != nil || !strings.Contains(oipErr.Error, "repository extension") {
			t.Fatalf("POST %s through Envoy: %d %q %s, want 404 application/json with the OIP error from Envoy", path, code, hdr.Get("Content-Type"), body)
		}
	}
	for _, tc := range []struct{ method, path string }{
		{http.MethodGet, "/v2/models/ranker/infer"},
		{http.MethodPost, "/v2/models/ranker/explain"},
		{http.MethodGet, "/metrics"},
		{http.MethodGet, "/v2/health/ready"}, // no x-patchbay-model
	} {
		if code, hdr, body := httpCall(t, tc.method, base+tc.path, ""); code != http.StatusNotFound ||
			hdr.Get("Content-Type") != "application/json" || !strings.HasPrefix(body, `{"error":`) {
			t.Errorf("%s %s through Envoy: %d %s, want Envoy's 404 OIP error", tc.method, tc.path, code, body)
		}
	}
	// The host still has ranker: asked directly, and through Envoy.
	if code, _, body := httpCall(t, http.MethodGet, "http://"+c.host.http+"/v2/models/ranker/ready", ""); code != 200 {
		t.Fatalf("ranker not ready on the host after the refused unload: %d %s", code, body)
	}
	if code, _, body := httpCall(t, http.MethodPost, base+"/v2/models/ranker/infer", features); code != 200 || !strings.Contains(body, `"model_version":"v7"`) {
		t.Fatalf("infer through Envoy after the refused unload: %d %s", code, body)
	}
	for _, path := range []string{"/v2/models/ranker", "/v2/models/ranker/ready"} {
		if code, _, body := httpCall(t, http.MethodGet, base+path, ""); code != 200 {
			t.Errorf("GET %s through Envoy: %d %s", path, code, body)
		}
	}

	// gRPC.
	edge := grpcClient(t, c.edge)
	ctx := metadata.AppendToOutgoingContext(context.Background(), "x-patchbay-model", "churn")
	if _, err := churnInfer(ctx, edge); err != nil {
		t.Fatalf("ModelInfer through Envoy before the unload attempt: %v", err)
	}
	deadline, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	for name, call := range map[string]func() error{
		"RepositoryModelUnload": func() error {
			_, err := edge.RepositoryModelUnload(deadline, &oip.RepositoryModelUnloadRequest{ModelName: "churn"})
			return err
		},
		"RepositoryModelLoad": func() error {
			_, err := edge.RepositoryModelLoad(deadline, &oip.RepositoryModelLoadRequest{ModelName: "churn"})
			return err
		},
		"RepositoryIndex (no model header)": func() error {
			_, err := edge.RepositoryIndex(context.Background(), &oip.RepositoryIndexRequest{})
			return err
		},
	} {
		err := call()
		if st := status.Convert(err); st.Code() != codes.PermissionDenied || !strings.Contains(st.Message(), "repository extension") {
			t.Errorf("%s through Envoy: %v, want PERMISSION_DENIED from Envoy", name, err)
		}
	}
	direct := grpcClient(t, c.host.grpc)
	if r, err := direct.ModelReady(deadline, &oip.ModelReadyRequest{Name: "churn"}); err != nil || !r.GetReady() {
		t.Fatalf("churn not ready on the host after the refused unload: %v %v", r, err)
	}
	for i := 0; i < 20; i++ {
		if r, err := churnInfer(ctx, edge); err != nil || r.GetModelName() != "churn" {
			t.Fatalf("ModelInfer %d through Envoy after the refused unload: %v %v", i, r, err)
		}
	}
	for name, call := range map[string]func() error{
		"ModelReady": func() error { _, err := edge.ModelReady(deadline, &oip.ModelReadyRequest{Name: "churn"}); return err },
		"ModelMetadata": func() error {
			_, err := edge.ModelMetadata(deadline, &oip.ModelMetadataRequest{Name: "churn"})
			return err
		},
		"ServerLive":     func() error { _, err := edge.ServerLive(deadline, &oip.ServerLiveRequest{}); return err },
		"ServerReady":    func() error { _, err := edge.ServerReady(deadline, &oip.ServerReadyRequest{}); return err },
		"ServerMetadata": func() error { _, err := edge.ServerMetadata(deadline, &oip.ServerMetadataRequest{}); return err },
	} {
		if err := call(); err != nil {
			t.Errorf("%s through Envoy: %v", name, err)
		}
	}
	// A gRPC call for a model served over REST is refused by Envoy (UNIMPLEMENTED), never
	// sent to a cluster of the other protocol. A repeated model header matches no model
	// route (Envoy joins the values with ','), whether or not ext_proc refuses it first
	// (INVALID_ARGUMENT).
	ctx = metadata.AppendToOutgoingContext(context.Background(), "x-patchbay-model", "ranker")
	if _, err := churnInfer(ctx, edge); status.Code(err) != codes.Unimplemented {
		t.Errorf("ModelInfer for a REST model: %v, want UNIMPLEMENTED from Envoy", err)
	}
	ctx = metadata.AppendToOutgoingContext(context.Background(), "x-patchbay-model", "churn", "x-patchbay-model", "churn")
	if _, err := churnInfer(ctx, edge); status.Code(err) != codes.Unimplemented && status.Code(err) != codes.InvalidArgument {
		t.Errorf("ModelInfer with x-patchbay-model twice: %v, want UNIMPLEMENTED (Envoy) or INVALID_ARGUMENT (ext_proc)", err)
	}
}

// TestProxylessRepositoryRefused: grpc-go's own xDS client dialing xds:///churn at the real
// control plane fails a repository RPC at the client (PERMISSION_DENIED) without sending
// it, and an unknown method with UNIMPLEMENTED, while ModelInfer works.
func TestProxylessRepositoryRefused(t *testing.T) {
	c := startClosedChain(t)
	bootstrap := fmt.Sprintf(`{"xds_servers": [{"server_uri": %q, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
		"node": {"id": "e2e-proxyless-closed"}}`, c.xdsAddr)
	rb, err := xdsresolver.NewXDSResolverWithConfigForTesting([]byte(bootstrap))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("xds:///churn", grpc.WithResolvers(rb), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := oip.NewGRPCInferenceServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := client.ModelInfer(ctx, &oip.ModelInferRequest{
		ModelName: "churn",
		Inputs: []*oip.ModelInferRequest_InferInputTensor{{
			Name: "features", Datatype: "FP32", Shape: []int64{1, 4},
			Contents: &oip.InferTensorContents{Fp32Contents: []float32{0.1, 0.2, 0.3, 0.4}},
		}},
	}, grpc.WaitForReady(true)); err != nil {
		t.Fatalf("ModelInfer via xds:///churn: %v", err)
	}
	_, err = client.RepositoryModelUnload(ctx, &oip.RepositoryModelUnloadRequest{ModelName: "churn"}, grpc.WaitForReady(true))
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("RepositoryModelUnload via xds:///churn: %v, want PERMISSION_DENIED at the client", err)
	}
	_, err = client.RepositoryIndex(ctx, &oip.RepositoryIndexRequest{}, grpc.WaitForReady(true))
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("RepositoryIndex via xds:///churn: %v, want PERMISSION_DENIED at the client", err)
	}
	if err := conn.Invoke(ctx, "/inference.GRPCInferenceService/ModelStreamInfer", &oip.ModelInferRequest{}, &oip.ModelInferResponse{}); status.Code(err) != codes.Unimplemented {
		t.Fatalf("unknown method via xds:///churn: %v, want UNIMPLEMENTED at the client", err)
	}
	direct := grpcClient(t, c.host.grpc)
	if r, err := direct.ModelReady(ctx, &oip.ModelReadyRequest{Name: "churn"}); err != nil || !r.GetReady() {
		t.Fatalf("churn not ready on the host after the refused unload: %v %v", r, err)
	}
	for i := 0; i < 20; i++ {
		if _, err := churnInfer(context.Background(), client); err != nil {
			t.Fatalf("ModelInfer %d via xds:///churn after the refused unload: %v", i, err)
		}
	}
}
