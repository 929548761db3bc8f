package modelhost_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/patchbay-io/patchbay/api/oip"
)

// TestPerVersionGRPCHealth: the gRPC port's grpc.health.v1 answers for every model
// version under oip.HealthService(model, version) (the name Envoy's gRPC health check of
// that version's cluster sends): SERVING while loaded and ready, NOT_SERVING for a version
// that failed to load, and in step with unload and load through the admin repository API
// (Check and Watch over real gRPC). The admin listener's health service says the same.
func TestPerVersionGRPCHealth(t *testing.T) {
	repo := testRepo(t)
	writeFile(t, filepath.Join(repo, "ranker", "v9", "model.yaml"), "runtime: xgboost\nartifact: model.json\ninputz: []\n")
	h := startHost(t, repo, nil)
	hc := healthpb.NewHealthClient(h.conn)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	check := func(c healthpb.HealthClient, model, version string) healthpb.HealthCheckResponse_ServingStatus {
		t.Helper()
		r, err := c.Check(ctx, &healthpb.HealthCheckRequest{Service: oip.HealthService(model, version)})
		if err != nil {
			t.Fatalf("Check %s/%s: %v", model, version, err)
		}
		return r.GetStatus()
	}
	const serving, notServing = healthpb.HealthCheckResponse_SERVING, healthpb.HealthCheckResponse_NOT_SERVING
	for _, c := range []struct {
		client         healthpb.HealthClient
		model, version string
		want           healthpb.HealthCheckResponse_ServingStatus
	}{
		{hc, "ranker", "v7", serving}, {hc, "ranker", "v8", serving}, {hc, "ranker", "v9", notServing},
		{hc, "churn", "v1", serving}, {healthpb.NewHealthClient(h.adminConn), "ranker", "v8", serving},
	} {
		if got := check(c.client, c.model, c.version); got != c.want {
			t.Errorf("%s/%s: %v, want %v", c.model, c.version, got, c.want)
		}
	}
	if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: oip.HealthService("ranker", "v99")}); status.Code(err) != codes.NotFound {
		t.Errorf("never-loaded version: %v, want NotFound", err)
	}

	w, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{Service: oip.HealthService("ranker", "v7")})
	if err != nil {
		t.Fatal(err)
	}
	next := func() healthpb.HealthCheckResponse_ServingStatus {
		t.Helper()
		r, err := w.Recv()
		if err != nil {
			t.Fatalf("Watch: %v", err)
		}
		return r.GetStatus()
	}
	if got := next(); got != serving {
		t.Fatalf("Watch ranker/v7 first: %v", got)
	}
	if r := h.adminDo(t, "POST", "/v2/repository/models/ranker/unload", "", nil); r.StatusCode != 200 {
		t.Fatalf("unload: %d", r.StatusCode)
	}
	if got := next(); got != notServing {
		t.Errorf("Watch ranker/v7 after unload: %v, want NOT_SERVING", got)
	}
	for _, v := range []string{"v7", "v8", "v9"} {
		if got := check(hc, "ranker", v); got != notServing {
			t.Errorf("after unload ranker/%s: %v", v, got)
		}
	}
	if got := check(hc, "churn", "v1"); got != serving {
		t.Errorf("unloading ranker changed churn/v1: %v", got)
	}
	// Load again (the broken v9 stays NOT_SERVING; the load itself succeeds).
	if r := h.adminDo(t, "POST", "/v2/repository/models/ranker/load", "", nil); r.StatusCode != 200 {
		t.Fatalf("load: %d", r.StatusCode)
	}
	if got := next(); got != serving {
		t.Errorf("Watch ranker/v7 after load: %v, want SERVING", got)
	}
	if got := check(hc, "ranker", "v9"); got != notServing {
		t.Errorf("after load ranker/v9: %v", got)
	}
	// A version whose directory is removed leaves at the next load.
	if err := os.RemoveAll(filepath.Join(repo, "ranker", "v8")); err != nil {
		t.Fatal(err)
	}
	h.adminDo(t, "POST", "/v2/repository/models/ranker/load", "", nil)
	if got := check(hc, "ranker", "v8"); got != notServing {
		t.Errorf("ranker/v8 gone from the repository: %v", got)
	}
}
