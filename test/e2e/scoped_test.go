package e2e

import (
	"context"
	"net/http"
	"strconv"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"

	"github.com/patchbay-io/patchbay/api/headers"
)

// TestScopedRoutesThroughTheChain: with one route table per model (Scoped RDS), each model's
// calls reach that model through the chain; a client's own x-patchbay-route-key is
// replaced by Envoy's early header mutation, so it cannot pick another model's table; and
// a request whose key selects no scope gets Envoy's 404 rewritten into an OIP error, over
// REST as JSON and over gRPC as a trailers-only UNIMPLEMENTED carrying it.
func TestScopedRoutesThroughTheChain(t *testing.T) {
	c := startClosedChain(t)
	base := "http://" + c.edge
	req, _ := http.NewRequest(http.MethodPost, base+"/v2/models/ranker/infer", strings.NewReader(features))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(headers.RouteKey, "/inference.GRPCInferenceService/ModelInfer/churn/churn/")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get(headers.ServedBy) != "ranker/v7" {
		t.Fatalf("REST ranker with a forged route key: %d served by %q", resp.StatusCode, resp.Header.Get(headers.ServedBy))
	}
	ctx := metadata.AppendToOutgoingContext(context.Background(), headers.Model, "churn", headers.RouteKey, "/v2/models/ranker/infer//")
	if r, err := churnInfer(ctx, grpcClient(t, c.edge)); err != nil || r.GetModelName() != "churn" {
		t.Fatalf("gRPC churn with a forged route key: %v %v", r, err)
	}
	// ranker is a known model (ext_proc passes it on) but /explain is no scope's key.
	if code, hdr, body := httpCall(t, http.MethodPost, base+"/v2/models/ranker/explain", ""); code != 404 ||
		hdr.Get("Content-Type") != "application/json" || !strings.HasPrefix(body, `{"error":"not found: `) {
		t.Errorf("no scope over REST: %d %q %s", code, hdr.Get("Content-Type"), body)
	}
	// The same request as gRPC (Envoy decides by content-type: Grpc::Common::hasGrpcContentType):
	// trailers-only, :status 200, UNIMPLEMENTED (Envoy's map of 404) and the OIP error as
	// grpc-message.
	req, _ = http.NewRequest(http.MethodPost, base+"/v2/models/ranker/explain", nil)
	req.Header.Set("Content-Type", "application/grpc")
	resp, err = client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Grpc-Status") != strconv.Itoa(int(codes.Unimplemented)) ||
		!strings.HasPrefix(resp.Header.Get("Grpc-Message"), `{"error":"not found: `) {
		t.Errorf("no scope over gRPC: %d %v", resp.StatusCode, resp.Header)
	}
}
