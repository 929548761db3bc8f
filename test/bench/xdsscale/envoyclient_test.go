package xdsscale

import (
	"context"
	"net"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
)

// TestEnvoyClientSeesPartialConfigs: the checks the restart benchmark relies on catch what
// they must. A go-control-plane server (snapshot cache, real gRPC on loopback) serves two
// listeners, then one: the delta client records the removal and the SotW client the short
// LDS response; neither is recorded while the set only grows.
func TestEnvoyClientSeesPartialConfigs(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	snaps := cache.NewSnapshotCache(false, cache.IDHash{}, nil)
	gs := grpc.NewServer()
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(gs, serverv3.NewServer(ctx, snaps, nil))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go gs.Serve(l)
	defer gs.Stop()
	set := func(version string, listeners ...string) {
		var ls []types.Resource
		for _, n := range listeners {
			ls = append(ls, &listenerv3.Listener{Name: n})
		}
		s, err := cache.NewSnapshot(version, map[resource.Type][]types.Resource{
			resource.ListenerType: ls,
			resource.ClusterType:  {&clusterv3.Cluster{Name: "c", ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC}}},
		})
		if err != nil {
			t.Fatal(err)
		}
		for _, id := range []string{"delta", "sotw"} {
			if err := snaps.SetSnapshot(ctx, id, s); err != nil {
				t.Fatal(err)
			}
		}
	}
	set("1", "a", "b")
	clients := map[string]*Envoy{}
	for _, id := range []string{"delta", "sotw"} {
		e, err := DialEnvoy(ctx, l.Addr().String(), id, id == "delta")
		if err != nil {
			t.Fatal(err)
		}
		defer e.Close()
		if _, err := e.Wait(ctx, func(s Snapshot) bool { return s.Complete() && len(s.Res[resource.ListenerType]) == 2 }); err != nil {
			t.Fatalf("%s: %v", id, err)
		}
		clients[id] = e
	}
	set("2", "a", "b", "c")
	for id, e := range clients {
		s, err := e.Wait(ctx, func(s Snapshot) bool { return len(s.Res[resource.ListenerType]) == 3 })
		if err != nil {
			t.Fatalf("%s: %v", id, err)
		}
		if len(s.Stats.Removed) > 0 || len(s.Stats.SotWShort) > 0 {
			t.Fatalf("%s: a growing set recorded as partial: %v %v", id, s.Stats.Removed, s.Stats.SotWShort)
		}
	}
	set("3", "a")
	if _, err := clients["delta"].Wait(ctx, func(s Snapshot) bool { return len(s.Stats.Removed) == 2 }); err != nil {
		t.Errorf("delta client did not record the two removals: %v", err)
	}
	if _, err := clients["sotw"].Wait(ctx, func(s Snapshot) bool { return len(s.Stats.SotWShort) == 1 }); err != nil {
		t.Errorf("SotW client did not record the short LDS response: %v", err)
	}
}
