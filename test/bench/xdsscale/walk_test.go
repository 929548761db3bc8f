package xdsscale

import (
	"testing"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// edgeRoutes translates n of the benchmark's models into the edge route table.
func edgeRoutes(t *testing.T, n int) *routev3.RouteConfiguration {
	t.Helper()
	dir := t.TempDir()
	WriteModels(t, dir, n)
	set, err := rollout.LoadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	in := &translate.Input{Set: set, Slots: translate.SlotMaps(set, nil)}
	res, err := translate.Envoy(in, translate.Options{EdgeAddress: "127.0.0.1:10000", SidecarAddress: "127.0.0.1:15001"}, translate.Edge)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range res[resource.RouteType] {
		if rc := r.(*routev3.RouteConfiguration); rc.GetName() == translate.RouteConfigName {
			return rc
		}
	}
	t.Fatal("no edge route table")
	return nil
}

// TestWalkMatchesLikeEnvoy: on the real translated table, each request lands on the route
// Envoy's first-match rule gives it, and the count grows with the model's position.
func TestWalkMatchesLikeEnvoy(t *testing.T) {
	rc := edgeRoutes(t, 3)
	cases := []struct {
		req      Request
		wantName string
	}{
		{Request{Method: "POST", Path: "/v2/models/model-00002/infer"}, "model-00002/infer/split"},
		{Request{Method: "POST", Path: "/v2/models/model-00000/infer", Headers: map[string]string{"x-patchbay-version": "v3"}}, "model-00000/infer/version/v3"},
		{Request{Method: "GET", Path: "/v2/models/model-00001/ready"}, "model-00001/ready/split"},
		{Request{Method: "GET", Path: "/v2/models/nope"}, "unknown-model"},
		{Request{Method: "GET", Path: "/elsewhere"}, "not-inference"},
	}
	for _, c := range cases {
		_, name, err := Walk(rc, c.req)
		if err != nil {
			t.Fatal(err)
		}
		if name != c.wantName {
			t.Errorf("%s %s %v matched %q, want %q", c.req.Method, c.req.Path, c.req.Headers, name, c.wantName)
		}
	}
	first, _, _ := Walk(rc, Request{Method: "POST", Path: "/v2/models/model-00000/infer"})
	last, _, _ := Walk(rc, Request{Method: "POST", Path: "/v2/models/model-00002/infer"})
	perModel := (last - first) / 2
	if perModel < 5 || last != first+2*perModel {
		t.Errorf("matchers: first model %d, last %d: want the same number of routes per model before each", first, last)
	}
}
