package xds

import (
	"context"
	"sort"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

// TestClustersOutliveTheRoutesThatNamedThem walks the proxyless test's sequence (split, file
// edits, rollback to the last known-good split, rollback to a named version, release, file
// edit releasing a rollback) on the server itself and checks, for every flavour, that each
// snapshot still has every cluster the previous snapshot's routes named (every version
// stays in the spec throughout). A client applies a new snapshot resource by resource, and
// grpc-go's config selector keeps routing RPCs to the clusters of the route it held: a
// cluster deleted under them fails those RPCs ("unknown cluster selected for RPC"), and a
// WaitForReady RPC waits for its deadline ("failed to push new configuration ... to
// child"); Envoy answers 503 "unknown cluster". That was TestProxylessGRPC's flake (its
// rollback steps timed out in about 1 run in 3 under load). Before versions left at zero
// by a rollback were Closed rather than removed (commit 3bf1980), the three rollback
// steps failed here in every run, for every flavour.
func TestClustersOutliveTheRoutesThatNamedThem(t *testing.T) {
	eps := map[string]string{"v1": "127.0.0.1:1", "v2": "127.0.0.1:2"}
	dir := t.TempDir()
	writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", eps, "{v1: 80, v2: 20}", ""))
	c := startCP(t, dir)
	ctx := context.Background()

	prev := servedClusters(t, c.srv)
	step := func(name string, change func()) {
		t.Helper()
		before := c.srv.Version()
		change()
		waitFor(t, 5*time.Second, name+" applied", func() bool { return c.srv.Version() != before })
		next := servedClusters(t, c.srv)
		for f, p := range prev {
			for cl := range p.routed {
				if !next[f].clusters[cl] {
					t.Errorf("%s: the %s snapshot dropped cluster %s, which the previous one routed to (clusters now %v)",
						name, f, cl, keys(next[f].clusters))
				}
			}
		}
		for f, n := range next {
			for cl := range n.routed {
				if !n.clusters[cl] {
					t.Errorf("%s: the %s snapshot routes to cluster %s, which it does not have", name, f, cl)
				}
				// grpc-go builds a cluster's balancer only once a route names it: a split
				// that starts naming a cluster no route named before races that build
				// ("unknown cluster selected for RPC"). Every version's route names its
				// cluster, so the set a model's routes name does not change.
				if f == FlavourGRPC && !prev[f].routed[cl] {
					t.Errorf("%s: the grpc snapshot routes to cluster %s, which the previous one's routes did not name", name, cl)
				}
			}
		}
		prev = next
	}
	edit := func(traffic, extra string) func() {
		return func() { writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", eps, traffic, extra)) }
	}
	rollback := func(version string) func() {
		return func() {
			if _, code, err := c.srv.Rollback(ctx, "ranker", version); err != nil {
				t.Fatalf("rollback %q: %d %v", version, code, err)
			}
		}
	}
	step("file edit to v1: 100", edit("{v1: 100, v2: 0}", ""))
	step("file edit to v2: 100", edit("{v1: 0, v2: 100}", ""))
	step("rollback to the last known-good split", rollback(""))
	step("rollback to v2", rollback("v2"))
	step("release through the API", func() {
		if _, code, err := c.srv.Release(ctx, "ranker"); err != nil {
			t.Fatalf("release: %d %v", code, err)
		}
	})
	step("rollback to v1", rollback("v1"))
	step("file edit releasing the rollback", edit("{v1: 20, v2: 80}", "timeout: 3s\n"))
}

type flavourClusters struct {
	clusters map[string]bool // the snapshot's clusters
	routed   map[string]bool // the clusters its routes name (route, split, mirror)
}

// servedClusters reads, per Envoy and proxyless flavour, the clusters served and those
// their routes (route configurations and the proxyless api_listeners' inline ones) name.
func servedClusters(t *testing.T, s *Server) map[Flavour]flavourClusters {
	t.Helper()
	out := map[Flavour]flavourClusters{}
	for _, f := range []Flavour{FlavourEdge, FlavourSidecar, FlavourGRPC} {
		snap, err := s.Served(f)
		if err != nil {
			t.Fatal(err)
		}
		fc := flavourClusters{clusters: map[string]bool{}, routed: map[string]bool{}}
		for _, r := range snap.GetResources(resource.ClusterType) {
			fc.clusters[r.(*clusterv3.Cluster).GetName()] = true
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
					a := r.GetRoute()
					if cl := a.GetCluster(); cl != "" {
						fc.routed[cl] = true
					}
					for _, cw := range a.GetWeightedClusters().GetClusters() {
						fc.routed[cw.GetName()] = true
					}
					for _, m := range a.GetRequestMirrorPolicies() {
						fc.routed[m.GetCluster()] = true
					}
				}
			}
		}
		out[f] = fc
	}
	return out
}

func keys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
