package xds

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/patchbay-io/patchbay/api/headers"
)

// TestRollbackClosesEveryDoor: a rollback leaves nothing in any flavour or in the ext_proc
// policy that can reach a version it leaves at zero — no cluster, no endpoints, no pinned
// path, no x-patchbay-version route (Envoy and proxyless), no mirror, no experiment arm, no
// pin in the policy — and a grpc-go xDS client naming the rolled-away version (its own pin)
// reaches only the target: counted at the rolled-away backend. Release opens them again.
func TestRollbackClosesEveryDoor(t *testing.T) {
	v1, v2 := startBackend(t, "v1"), startBackend(t, "v2")
	eps := map[string]string{"v1": v1.addr, "v2": v2.addr}
	dir := t.TempDir()
	writeFile(t, dir, "r.yaml", rolloutDoc("r", eps, "{v1: 100, v2: 0}", "pinning: true\n"))
	c := startCP(t, dir)
	waitFor(t, 5*time.Second, "first config", func() bool { return c.srv.Version() != "" })
	extra := "pinning: true\n" +
		"experiments: [{name: e, layer: l, allocation: 100, arms: [{name: a, version: v2, weight: 1}]}]\n" +
		"shadow: [{version: v2, percent: 100}]\n"
	before := c.srv.Version()
	writeFile(t, dir, "r.yaml", rolloutDoc("r", eps, "{v1: 50, v2: 50}", extra))
	waitFor(t, 5*time.Second, "50/50 applied", func() bool { return c.srv.Version() != before })
	client := xdsClient(t, c, "r")
	allGoTo(t, client, "v2", headers.Version, "v2")
	doorsOpen(t, c.srv, "r", "v2")

	for _, tc := range []struct{ name, version string }{{"last known-good split", ""}, {"named version", "v1"}} {
		t.Run(tc.name, func(t *testing.T) {
			res, code, err := c.srv.Rollback(context.Background(), "r", tc.version)
			if err != nil || code != http.StatusOK || res.Traffic["v1"] != 100 {
				t.Fatalf("rollback: %+v %d %v, want all traffic on v1", res, code, err)
			}
			doorsClosed(t, c.srv, "r", "v2")
			// grpc-go follows: the split is all v1, and the caller's own pin on v2 is refused
			// at the client (FAILED_PRECONDITION, nothing sent).
			allGoTo(t, client, "v1")
			waitFor(t, 5*time.Second, "a pin on v2 refused", func() bool {
				_, err := call(context.Background(), client, headers.Version, "v2")
				return status.Code(err) == codes.FailedPrecondition
			})
			v2.calls.Store(0)
			for range 100 {
				if _, err := call(context.Background(), client, headers.Version, "v2"); status.Code(err) != codes.FailedPrecondition {
					t.Fatalf("a pin on the rolled-back version: %v, want FAILED_PRECONDITION", err)
				}
				if _, err := call(context.Background(), client); err != nil {
					t.Fatal(err)
				}
			}
			if n := v2.calls.Load(); n != 0 {
				t.Fatalf("the rolled-away version's host answered %d calls after the rollback", n)
			}
			code, body := httpDo(t, http.MethodDelete, "http://"+c.adminAddr+"/v1/models/r/rollback", testToken, "")
			if code != http.StatusOK {
				t.Fatalf("release: %d %s", code, body)
			}
			doorsOpen(t, c.srv, "r", "v2")
			allGoTo(t, client, "v2", headers.Version, "v2")
		})
	}
}

// doors lists every way the served config can send a request of model to version.
func doors(t *testing.T, s *Server, model, version string) []string {
	t.Helper()
	var out []string
	cl := strings.ToLower(model + "_" + version)
	hit := func(name string) bool { return name == cl || name == cl+"_grpc" }
	for _, f := range []Flavour{FlavourEdge, FlavourSidecar, FlavourGRPC} {
		snap, err := s.Served(f)
		if err != nil {
			t.Fatal(err)
		}
		// The version's clusters and endpoints stay (see closeDoors): a door is a route,
		// mirror, pin or arm that names them, checked below. They must still be there, so
		// that a route an Envoy holds mid-update never names a cluster it lost.
		if err == nil && version != "" {
			have := 0
			for _, r := range snap.GetResources(resource.ClusterType) {
				if hit(r.(*clusterv3.Cluster).GetName()) {
					have++
				}
			}
			for _, r := range snap.GetResources(resource.EndpointType) {
				if hit(r.(*endpointv3.ClusterLoadAssignment).GetClusterName()) {
					have++
				}
			}
			if have == 0 {
				t.Errorf("%s: the clusters of %s are gone: a route still held by a client would name a missing cluster", f, version)
			}
		}
		var rcs []*routev3.RouteConfiguration
		for _, r := range snap.GetResources(resource.RouteType) {
			rcs = append(rcs, r.(*routev3.RouteConfiguration))
		}
		for _, l := range snap.GetResources(resource.ListenerType) {
			if al := l.(*listenerv3.Listener).GetApiListener(); al != nil {
				hcm := &hcmv3.HttpConnectionManager{}
				if err := al.GetApiListener().UnmarshalTo(hcm); err != nil {
					t.Fatal(err)
				}
				rcs = append(rcs, hcm.GetRouteConfig())
			}
		}
		for _, rc := range rcs {
			for _, vh := range rc.GetVirtualHosts() {
				for _, r := range vh.GetRoutes() {
					where := string(f) + " route " + r.GetName()
					for _, h := range r.GetMatch().GetHeaders() {
						if h.GetName() == headers.Version && h.GetStringMatch().GetExact() == version && !strings.HasSuffix(r.GetName(), "-refused") {
							out = append(out, where+" matches "+headers.Version)
						}
					}
					if p := r.GetMatch().GetPath() + r.GetMatch().GetPrefix() + r.GetMatch().GetPathSeparatedPrefix(); strings.Contains(p, "/versions/"+version) &&
						r.GetDirectResponse() == nil {
						out = append(out, where+" pins "+p)
					}
					a := r.GetRoute()
					if hit(a.GetCluster()) && !strings.HasSuffix(r.GetName(), "-refused") && !strings.HasSuffix(r.GetName(), "/not-inference") {
						out = append(out, where+" routes to "+a.GetCluster())
					}
					for _, cw := range a.GetWeightedClusters().GetClusters() {
						if hit(cw.GetName()) {
							out = append(out, where+" splits to "+cw.GetName())
						}
					}
					for _, m := range a.GetRequestMirrorPolicies() {
						if hit(m.GetCluster()) {
							out = append(out, where+" mirrors to "+m.GetCluster())
						}
					}
				}
			}
		}
	}
	s.mu.Lock()
	policy := s.state.built.Policy
	s.mu.Unlock()
	for _, m := range policy.GetModels() {
		if m.GetName() != model {
			continue
		}
		for _, v := range m.GetVersions() {
			if v == version {
				out = append(out, "ext_proc policy knows (pins to) "+version)
			}
		}
		for _, e := range m.GetExperiments() {
			for _, a := range e.GetArms() {
				if a.GetVersion() == version && e.GetSlotEnd() > e.GetSlotStart() {
					out = append(out, "ext_proc policy arm "+e.GetName()+"/"+a.GetName())
				}
			}
		}
	}
	return out
}

func doorsClosed(t *testing.T, s *Server, model, version string) {
	t.Helper()
	if open := doors(t, s, model, version); len(open) > 0 {
		t.Fatalf("after the rollback, %d ways to %s/%s are still served:\n%s", len(open), model, version, strings.Join(open, "\n"))
	}
}

func doorsOpen(t *testing.T, s *Server, model, version string) {
	t.Helper()
	if open := doors(t, s, model, version); len(open) == 0 {
		t.Fatalf("no way to %s/%s is served (the check finds nothing)", model, version)
	}
}
