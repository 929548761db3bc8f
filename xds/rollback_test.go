package xds

import (
	"context"
	"net/http"
	"testing"
	"time"

	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

// TestRollbackSemantics: a rollback takes the split from history and everything else from
// the current file, turns experiments and shadows off, a second rollback goes one step
// further back (never back to the split rolled back from), and a file edit releases it.
func TestRollbackSemantics(t *testing.T) {
	dir := t.TempDir()
	c := startCP(t, dir)
	extra := "experiments: [{name: e, layer: l, allocation: 50, arms: [{name: a, version: v2, weight: 1}]}]\nshadow: [{version: v2, percent: 10}]\n"
	apply := func(eps map[string]string, traffic, extra string) {
		t.Helper()
		before := c.srv.Version()
		writeFile(t, dir, "r.yaml", rolloutDoc("r", eps, traffic, extra))
		waitFor(t, 5*time.Second, "apply "+traffic, func() bool { return c.srv.Version() != before })
	}
	old := map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002"}
	moved := map[string]string{"v1": "127.0.0.1:9011", "v2": "127.0.0.1:9002"}
	apply(old, "{v1: 100, v2: 0}", "")
	apply(old, "{v1: 50, v2: 50}", "")
	apply(moved, "{v1: 20, v2: 80}", extra) // v1 moved hosts in the same edit

	res, code, err := c.srv.Rollback(context.Background(), "r", "")
	if err != nil || code != http.StatusOK || !sameSplit(res.Traffic, map[string]int{"v1": 50, "v2": 50}) {
		t.Fatalf("first rollback: %v %d %v, want the last known-good 50/50", res, code, err)
	}
	st := c.srv.Status().Models[0]
	if len(st.Experiments) != 0 || len(st.Shadows) != 0 || st.Rollback == nil {
		t.Fatalf("rollback kept experiments/shadows or is not shown: %+v", st)
	}
	snap, _ := c.srv.Served(FlavourGRPC)
	cla := snap.GetResources(resource.EndpointType)["r_v1_grpc"].(*endpointv3.ClusterLoadAssignment)
	if got := cla.GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress().GetPortValue(); got != 9011 {
		t.Fatalf("rollback brought back old endpoints: v1 on port %d, want the current file's 9011", got)
	}
	res, code, err = c.srv.Rollback(context.Background(), "r", "")
	if err != nil || !sameSplit(res.Traffic, map[string]int{"v1": 100, "v2": 0}) {
		t.Fatalf("second rollback: %v %d %v, want one step further back (100/0)", res, code, err)
	}
	if _, code, _ = c.srv.Rollback(context.Background(), "r", ""); code != http.StatusConflict {
		t.Fatalf("third rollback with nothing older: %d, want 409", code)
	}
	if _, code, _ = c.srv.Rollback(context.Background(), "r", "v9"); code != http.StatusBadRequest {
		t.Fatalf("rollback to an unknown version: %d, want 400", code)
	}
	// A file edit releases the hold; the new file is served as written.
	apply(moved, "{v1: 30, v2: 70}", "")
	if st := c.srv.Status().Models[0]; st.Rollback != nil || st.Traffic["v1"] != 30 {
		t.Fatalf("after a file edit: %+v", st)
	}
}
