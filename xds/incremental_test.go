package xds

import (
	"fmt"
	"slices"
	"testing"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/patchbay-io/patchbay/xds/translate"
)

// TestNoConfigBeforeTheFirstGoodOne: a control plane that starts on a rollout it refuses
// answers no one — an Envoy reconnecting to it keeps what it has instead of being sent an
// empty config — and answers as soon as a good rollout is in place.
func TestNoConfigBeforeTheFirstGoodOne(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "ranker.yaml", "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: ranker\nversions: [\n")
	c := startCP(t, dir)
	sotw, delta := adsStream(t, c), deltaStream(t, c)
	if err := sotw.Send(&discoveryv3.DiscoveryRequest{Node: envoyNode("edge"), TypeUrl: resource.ListenerType}); err != nil {
		t.Fatal(err)
	}
	if err := delta.Send(&discoveryv3.DeltaDiscoveryRequest{Node: envoyNode("edge"), TypeUrl: resource.ClusterType}); err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 2)
	go func() {
		if r, err := sotw.Recv(); err == nil {
			got <- fmt.Sprintf("SotW LDS with %d listeners", len(r.GetResources()))
		}
	}()
	go func() {
		if r, err := delta.Recv(); err == nil {
			got <- fmt.Sprintf("delta CDS with %d clusters", len(r.GetResources()))
		}
	}()
	select {
	case r := <-got:
		t.Fatalf("before any good config the client was answered: %s", r)
	case <-time.After(time.Second):
	}
	writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", map[string]string{"v1": "127.0.0.1:9001"}, "{v1: 100}", ""))
	for range 2 {
		select {
		case r := <-got:
			t.Logf("after the fix: %s", r)
		case <-time.After(10 * time.Second):
			t.Fatal("the first good config never reached the held watches")
		}
	}
}

// deltaEnvoy is a delta ADS client subscribing as Envoy does for the Scoped RDS shape:
// listeners, clusters and scopes by wildcard, then the route configuration every scope
// names. It ACKs every response and records what each carried.
type deltaEnvoy struct {
	t      *testing.T
	stream discoveryv3.AggregatedDiscoveryService_DeltaAggregatedResourcesClient
	routes map[string]bool // route configurations subscribed to
	got    chan *discoveryv3.DeltaDiscoveryResponse
}

func newDeltaEnvoy(t *testing.T, c *cp) *deltaEnvoy {
	s := deltaStream(t, c)
	e := &deltaEnvoy{t: t, stream: s, routes: map[string]bool{}, got: make(chan *discoveryv3.DeltaDiscoveryResponse, 1024)}
	for _, typ := range []string{resource.ClusterType, resource.ListenerType, resource.ScopedRouteType} {
		if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{Node: envoyNode("edge"), TypeUrl: typ}); err != nil {
			t.Fatal(err)
		}
	}
	go func() {
		for {
			r, err := s.Recv()
			if err != nil {
				close(e.got)
				return
			}
			var subscribe []string
			if r.GetTypeUrl() == resource.ScopedRouteType {
				for _, res := range r.GetResources() {
					sc := &routev3.ScopedRouteConfiguration{}
					if err := res.GetResource().UnmarshalTo(sc); err == nil && !e.routes[sc.GetRouteConfigurationName()] {
						e.routes[sc.GetRouteConfigurationName()] = true
						subscribe = append(subscribe, sc.GetRouteConfigurationName())
					}
				}
			}
			_ = s.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: r.GetTypeUrl(), ResponseNonce: r.GetNonce()})
			if len(subscribe) > 0 {
				_ = s.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: resource.RouteType, ResourceNamesSubscribe: subscribe})
			}
			e.got <- r
		}
	}()
	return e
}

// drain collects responses until none has come for quiet.
func (e *deltaEnvoy) drain(quiet time.Duration) []*discoveryv3.DeltaDiscoveryResponse {
	var out []*discoveryv3.DeltaDiscoveryResponse
	for {
		select {
		case r, ok := <-e.got:
			if !ok {
				return out
			}
			out = append(out, r)
		case <-time.After(quiet):
			return out
		}
	}
}

// TestOneModelEditSendsOnlyThatModelsRoutes: with 30 models served, a delta client that
// holds the whole config is sent, for a weight edit of one model, that model's route
// configuration and nothing else: no other model's routes, no cluster, scope or listener.
func TestOneModelEditSendsOnlyThatModelsRoutes(t *testing.T) {
	dir := t.TempDir()
	for i := range 30 {
		writeFile(t, dir, fmt.Sprintf("m%02d.yaml", i), rolloutDoc(fmt.Sprintf("m%02d", i),
			map[string]string{"v1": fmt.Sprintf("127.0.0.1:%d", 21000+i), "v2": fmt.Sprintf("127.0.0.1:%d", 22000+i)}, "{v1: 90, v2: 10}", ""))
	}
	c := startCP(t, dir)
	e := newDeltaEnvoy(t, c)
	initial := e.drain(time.Second)
	count := map[string]int{}
	for _, r := range initial {
		count[r.GetTypeUrl()] += len(r.GetResources())
	}
	if count[resource.RouteType] < 30 || count[resource.ClusterType] < 60 {
		t.Fatalf("initial config: %v resources by type, want at least 30 route configurations and 60 clusters", count)
	}
	writeFile(t, dir, "m07.yaml", rolloutDoc("m07", map[string]string{"v1": "127.0.0.1:21007", "v2": "127.0.0.1:22007"}, "{v1: 50, v2: 50}", ""))
	after := e.drain(time.Second)
	var sent []string
	bytes := 0
	for _, r := range after {
		for _, res := range r.GetResources() {
			sent = append(sent, res.GetName())
			bytes += len(res.GetResource().GetValue())
		}
		for _, name := range r.GetRemovedResources() {
			sent = append(sent, "removed "+name)
		}
	}
	t.Logf("the edit sent %v (%d bytes of resources)", sent, bytes)
	if !slices.Equal(sent, []string{translate.ModelRouteName("m07")}) {
		t.Fatalf("a weight edit of m07 sent %v, want only %s", sent, translate.ModelRouteName("m07"))
	}
}

// TestSotWScopesAreTheWholeSet: a SotW client is sent every scope in every SRDS response,
// also when one model is added: Envoy removes the scopes a SotW SRDS update does not carry
// (source/common/router/scoped_rds.cc), so an update with only the new model's scopes would
// take every other model off the data path.
func TestSotWScopesAreTheWholeSet(t *testing.T) {
	dir := t.TempDir()
	for i := range 5 {
		writeFile(t, dir, fmt.Sprintf("m%d.yaml", i), rolloutDoc(fmt.Sprintf("m%d", i), map[string]string{"v1": fmt.Sprintf("127.0.0.1:%d", 23000+i)}, "{v1: 100}", ""))
	}
	c := startCP(t, dir)
	s := adsStream(t, c)
	r := fetch(t, s, envoyNode("edge"), resource.ScopedRouteType)
	first := len(r.GetResources())
	if first < 5 {
		t.Fatalf("first SRDS response has %d scopes, want every model's", first)
	}
	if err := s.Send(&discoveryv3.DiscoveryRequest{TypeUrl: resource.ScopedRouteType, VersionInfo: r.GetVersionInfo(), ResponseNonce: r.GetNonce()}); err != nil {
		t.Fatal(err)
	}
	writeFile(t, dir, "m5.yaml", rolloutDoc("m5", map[string]string{"v1": "127.0.0.1:23005"}, "{v1: 100}", ""))
	r = recv(t, s)
	if got, want := len(r.GetResources()), first+len(translate.ModelScopes("m5")); got != want {
		t.Fatalf("after adding a model the SRDS response has %d scopes, want all %d (%d before)", got, want, first)
	}
}
