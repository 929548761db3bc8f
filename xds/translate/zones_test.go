package translate

import (
	"testing"

	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

// TestZonesBecomeLocalities: endpoints whose addresses have a zone (Kubernetes
// EndpointSlices) are served in one EDS locality per zone, weighted by its endpoint count,
// in every flavour; endpoints without one keep the version's own locality; without any
// zone the assignment is as before (one locality, weight 1). Build validates the result by
// Envoy's rules.
func TestZonesBecomeLocalities(t *testing.T) {
	in := loadInput(t, "testdata/pinning.yaml")
	in.Resolved["thumbs-v1.models.svc"] = []string{"10.1.0.9", "10.1.0.10", "10.1.0.11", "10.1.0.12"}
	plain, err := Build(in, testOpts)
	if err != nil {
		t.Fatal(err)
	}
	cla := plain.Edge.GetResources(resource.EndpointType)["thumbs_v1_grpc"].(*endpointv3.ClusterLoadAssignment)
	if n := len(cla.GetEndpoints()); n != 1 || cla.GetEndpoints()[0].GetLoadBalancingWeight().GetValue() != 1 {
		t.Fatalf("without zones: %d localities, want 1 of weight 1: %v", n, cla)
	}

	in.Zones = map[string]string{"10.1.0.9": "zone-a", "10.1.0.10": "zone-a", "10.1.0.11": "zone-b"}
	zoned, err := Build(in, testOpts)
	if err != nil {
		t.Fatal(err)
	}
	if zoned.Version == plain.Version {
		t.Fatal("zones did not change the config version")
	}
	for name, snap := range map[string]*cachev3.Snapshot{"edge": zoned.Edge, "sidecar": zoned.Sidecar, "grpc": zoned.GRPC} {
		r, ok := snap.GetResources(resource.EndpointType)["thumbs_v1_grpc"]
		if !ok {
			t.Fatalf("%s: no EDS for thumbs_v1_grpc", name)
		}
		got := map[string][2]int{} // zone -> endpoints, weight
		for _, l := range r.(*endpointv3.ClusterLoadAssignment).GetEndpoints() {
			got[l.GetLocality().GetZone()] = [2]int{len(l.GetLbEndpoints()), int(l.GetLoadBalancingWeight().GetValue())}
		}
		want := map[string][2]int{"zone-a": {2, 2}, "zone-b": {1, 1}, "thumbs": {1, 1}}
		if len(got) != len(want) {
			t.Fatalf("%s: localities %v, want %v", name, got, want)
		}
		for z, w := range want {
			if got[z] != w {
				t.Errorf("%s: locality %q has %v (endpoints, weight), want %v", name, z, got[z], w)
			}
		}
	}
}
