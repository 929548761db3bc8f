package xds

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	earlymutationv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/http/early_header_mutation/header_mutation/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/patchbay-io/patchbay/api/headers"
	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
	"github.com/patchbay-io/patchbay/internal/envoyvalidate"
	"github.com/patchbay-io/patchbay/test/harness"
	"github.com/patchbay-io/patchbay/xds/translate"
)

func adsStream(t *testing.T, c *cp) discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesClient {
	t.Helper()
	conn, err := grpc.NewClient(c.grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	s, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// deltaStream opens an incremental ADS stream to c, closed when the test ends.
func deltaStream(t *testing.T, c *cp) discoveryv3.AggregatedDiscoveryService_DeltaAggregatedResourcesClient {
	t.Helper()
	conn, err := grpc.NewClient(c.grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	s, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func envoyNode(role string) *corev3.Node {
	n := &corev3.Node{Id: "envoy-" + role, Cluster: "patchbay-" + role, UserAgentName: "envoy"}
	if role == "sidecar" {
		n.Metadata, _ = structpb.NewStruct(map[string]any{RoleMetadataKey: "sidecar"})
	}
	return n
}

func recv(t *testing.T, s discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesClient) *discoveryv3.DiscoveryResponse {
	t.Helper()
	type res struct {
		r   *discoveryv3.DiscoveryResponse
		err error
	}
	ch := make(chan res, 1)
	go func() { r, err := s.Recv(); ch <- res{r, err} }()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatal(r.err)
		}
		return r.r
	case <-time.After(5 * time.Second):
		t.Fatal("no xDS response within 5s")
	}
	return nil
}

// fetch sends one request of a type and returns the response, ACKing nothing.
func fetch(t *testing.T, s discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesClient, n *corev3.Node, typeURL string, names ...string) *discoveryv3.DiscoveryResponse {
	t.Helper()
	if err := s.Send(&discoveryv3.DiscoveryRequest{Node: n, TypeUrl: typeURL, ResourceNames: names}); err != nil {
		t.Fatal(err)
	}
	return recv(t, s)
}

// TestEnvoyNodeGetsValidConfig acts as an Envoy edge node on a real ADS stream: every
// resource it receives passes Envoy's validation rules inside every Any, and its listener
// strips client routing headers before route selection, then runs ext_proc (headers only,
// failing open), then the router.
func TestEnvoyNodeGetsValidConfig(t *testing.T) {
	dir := t.TempDir()
	fakeDNS.set("ranker-v2.models.svc", "10.9.0.2")
	writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", map[string]string{"v1": "127.0.0.1:9001", "v2": "ranker-v2.models.svc:9002"},
		"{v1: 90, v2: 10}", "shadow: [{version: v2, percent: 5}]\n"))
	c := startCP(t, dir)
	for _, role := range []string{"edge", "sidecar"} {
		t.Run(role, func(t *testing.T) {
			s := adsStream(t, c)
			n := envoyNode(role)
			var all []proto.Message
			cds := fetch(t, s, n, resource.ClusterType)
			lds := fetch(t, s, n, resource.ListenerType)
			// Scoped RDS: every scope (wildcard), then the route tables they name.
			srds := fetch(t, s, n, resource.ScopedRouteType)
			var tables []string
			for _, a := range srds.GetResources() {
				sc := &routev3.ScopedRouteConfiguration{}
				if err := a.UnmarshalTo(sc); err != nil {
					t.Fatal(err)
				}
				if !slices.Contains(tables, sc.GetRouteConfigurationName()) {
					tables = append(tables, sc.GetRouteConfigurationName())
				}
				all = append(all, sc)
			}
			slices.Sort(tables)
			if fmt.Sprint(tables) != "["+translate.FallbackRouteName+" "+translate.ModelRouteName("ranker")+"]" {
				t.Fatalf("scopes name route tables %v", tables)
			}
			rds := fetch(t, s, n, resource.RouteType, tables...)
			var clusterNames []string
			for _, a := range cds.GetResources() {
				cl := &clusterv3.Cluster{}
				if err := a.UnmarshalTo(cl); err != nil {
					t.Fatal(err)
				}
				clusterNames = append(clusterNames, cl.GetName())
				all = append(all, cl)
			}
			eds := fetch(t, s, n, resource.EndpointType, clusterNames...)
			if len(clusterNames) != 2 || len(eds.GetResources()) != 2 || len(lds.GetResources()) != 1 || len(rds.GetResources()) != 2 {
				t.Fatalf("got %d clusters, %d endpoints, %d listeners, %d routes", len(clusterNames), len(eds.GetResources()), len(lds.GetResources()), len(rds.GetResources()))
			}
			lis := &listenerv3.Listener{}
			if err := lds.GetResources()[0].UnmarshalTo(lis); err != nil {
				t.Fatal(err)
			}
			all = append(all, lis)
			for _, a := range rds.GetResources() {
				rc := &routev3.RouteConfiguration{}
				if err := a.UnmarshalTo(rc); err != nil {
					t.Fatal(err)
				}
				all = append(all, rc)
			}
			for _, a := range eds.GetResources() {
				cla := &endpointv3.ClusterLoadAssignment{}
				if err := a.UnmarshalTo(cla); err != nil {
					t.Fatal(err)
				}
				if cla.GetClusterName() == "ranker_v2_grpc" && cla.GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress().GetAddress() != "10.9.0.2" {
					t.Errorf("DNS name not resolved into EDS: %v", cla)
				}
				all = append(all, cla)
			}
			for _, m := range all {
				if err := envoyvalidate.Validate(m); err != nil {
					t.Errorf("%T fails Envoy's rules: %v", m, err)
				}
			}
			wantName := map[string]string{"edge": "patchbay_edge", "sidecar": "patchbay_sidecar"}[role]
			if lis.GetName() != wantName {
				t.Fatalf("listener %q, want %q", lis.GetName(), wantName)
			}
			hcm := &hcmv3.HttpConnectionManager{}
			if err := lis.GetFilterChains()[0].GetFilters()[0].GetTypedConfig().UnmarshalTo(hcm); err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, f := range hcm.GetHttpFilters() {
				names = append(names, f.GetName())
			}
			want := []string{"envoy.filters.http.ext_proc", "envoy.filters.http.router"}
			if len(names) != 2 || names[0] != want[0] || names[1] != want[1] {
				t.Fatalf("filters %v, want %v", names, want)
			}
			// Client routing headers go before route selection: an early header mutation.
			early := hcm.GetEarlyHeaderMutationExtensions()
			if len(early) != 1 {
				t.Fatalf("early header mutations: %v", early)
			}
			em := &earlymutationv3.HeaderMutation{}
			if err := early[0].GetTypedConfig().UnmarshalTo(em); err != nil {
				t.Fatal(err)
			}
			removed := map[string]bool{}
			for _, m := range em.GetMutations() {
				removed[m.GetRemove()] = true
			}
			for _, h := range headers.Stripped {
				if !removed[h] {
					t.Errorf("%s is not stripped before routing", h)
				}
			}
			if removed[headers.Model] {
				t.Errorf("%s must reach ext_proc and the routes", headers.Model)
			}
			ep := &extprocv3.ExternalProcessor{}
			if err := hcm.GetHttpFilters()[0].GetTypedConfig().UnmarshalTo(ep); err != nil {
				t.Fatal(err)
			}
			pm := ep.GetProcessingMode()
			if !ep.GetFailureModeAllow() || pm.GetRequestHeaderMode() != extprocv3.ProcessingMode_SEND ||
				pm.GetResponseHeaderMode() != extprocv3.ProcessingMode_SKIP || pm.GetRequestBodyMode() != extprocv3.ProcessingMode_NONE ||
				ep.GetMessageTimeout().AsDuration() <= 0 || ep.GetGrpcService().GetEnvoyGrpc().GetClusterName() != "patchbay_extproc" {
				t.Fatalf("ext_proc config: %v", ep)
			}
			if v := cds.GetVersionInfo(); ConfigVersionOf(v) != c.srv.Version() || v == "" {
				t.Fatalf("CDS version %q, server version %q", v, c.srv.Version())
			}
		})
	}
}

// TestNACKDoesNotStorm: a client that rejects every response gets the rejected version
// once, not again and again; the next real change still reaches it. The same client against
// the same server with the guard unwrapped (go-control-plane's caches alone) is measured too,
// so the test shows what the guard prevents: a resend storm at least 100x the guarded rate.
func TestNACKDoesNotStorm(t *testing.T) {
	const window = time.Second
	for _, typ := range []string{resource.ClusterType, policyv1.TypeURL} {
		t.Run(typ, func(t *testing.T) {
			dir := t.TempDir()
			writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", map[string]string{"v1": "127.0.0.1:9001"}, "{v1: 100}", ""))
			guarded := startCP(t, dir)
			unguarded := &cp{t: t, dir: t.TempDir(), grpcAddr: "127.0.0.1:0", adminAddr: "127.0.0.1:0", logs: &harness.Buffer{},
				beforeRun: func(s *Server) { s.cache = s.cache.(*nackGuard).Cache }}
			writeFile(t, unguarded.dir, "ranker.yaml", rolloutDoc("ranker", map[string]string{"v1": "127.0.0.1:9001"}, "{v1: 100}", ""))
			unguarded.start()
			t.Cleanup(unguarded.stop)

			withGuard, got, first := nackStorm(t, guarded, typ, window)
			without, _, _ := nackStorm(t, unguarded, typ, window)
			unguarded.stop() // end its storm before the rest of the test
			rate := func(n int) float64 { return float64(n) / window.Seconds() }
			t.Logf("always-NACKing client: %.0f responses/s with the NACK guard, %.0f responses/s without it", rate(withGuard), rate(without))
			if withGuard > 1 {
				t.Fatalf("%d responses in %s to an always-NACKing client with the guard, want at most 1", withGuard, window)
			}
			if without < 100*max(withGuard, 1) {
				t.Fatalf("without the guard only %d responses in %s (with it %d): the test no longer shows a storm to guard against", without, window, withGuard)
			}
			// A real change of that type is still delivered: a new version (a new cluster,
			// and a new policy version). Resources are versioned one by one, so an edit that
			// changes no cluster sends a CDS client nothing.
			writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002"}, "{v1: 100}", ""))
			select {
			case r := <-got:
				if r.GetVersionInfo() == first.GetVersionInfo() && typ != policyv1.TypeURL {
					t.Fatalf("after a change got the old version %s again", r.GetVersionInfo())
				}
			case <-time.After(5 * time.Second):
				t.Fatal("the next config never came after a NACK")
			}
		})
	}
}

// nackStorm opens an ADS stream to c, fetches typ and NACKs every response for window. It
// returns how many responses came in the window, the channel later responses arrive on (each
// still NACKed) and the first response.
func nackStorm(t *testing.T, c *cp, typ string, window time.Duration) (int, <-chan *discoveryv3.DiscoveryResponse, *discoveryv3.DiscoveryResponse) {
	t.Helper()
	s := adsStream(t, c)
	n := envoyNode("edge")
	if typ == policyv1.TypeURL {
		n = &corev3.Node{Id: "extproc-1", UserAgentName: policyv1.ExtprocUserAgent}
	}
	first := fetch(t, s, n, typ)
	nack := func(r *discoveryv3.DiscoveryResponse) {
		_ = s.Send(&discoveryv3.DiscoveryRequest{Node: n, TypeUrl: typ, ResponseNonce: r.GetNonce(),
			ErrorDetail: &statuspb.Status{Code: 3, Message: "test client rejects everything"}})
	}
	var mu sync.Mutex
	counting, responses := true, 0
	got := make(chan *discoveryv3.DiscoveryResponse, 16)
	go func() {
		defer close(got)
		for {
			r, err := s.Recv()
			if err != nil {
				return
			}
			nack(r) // keep rejecting whatever arrives
			mu.Lock()
			c := counting
			if c {
				responses++
			}
			mu.Unlock()
			if !c {
				select {
				case got <- r:
				default: // nobody reads a storm after the window
				}
			}
		}
	}()
	nack(first)
	time.Sleep(window)
	mu.Lock()
	counting = false
	n2 := responses
	mu.Unlock()
	return n2, got, first
}

// TestExtprocGetsPolicyInSync: the policy resource carries the same version as the Envoy
// snapshot built from the same files.
func TestExtprocGetsPolicyInSync(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002"}, "{v1: 50, v2: 50}",
		"experiments:\n  - {name: e1, layer: l1, allocation: 30, arms: [{name: a, version: v1, weight: 1}, {name: b, version: v2, weight: 1}]}\n"))
	c := startCP(t, dir)
	s := adsStream(t, c)
	r := fetch(t, s, &corev3.Node{Id: "x", UserAgentName: policyv1.ExtprocUserAgent}, policyv1.TypeURL, policyv1.ResourceName)
	if len(r.GetResources()) != 1 {
		t.Fatalf("%d policy resources", len(r.GetResources()))
	}
	p := &policyv1.Policy{}
	if err := r.GetResources()[0].UnmarshalTo(p); err != nil {
		t.Fatal(err)
	}
	if p.GetConfigVersion() != c.srv.Version() || len(p.GetModels()) != 1 || p.GetModels()[0].GetExperiments()[0].GetSlotEnd() != 3000 {
		t.Fatalf("policy %v, server version %s", p, c.srv.Version())
	}
}

// TestDeltaADS: an incremental xDS client gets the same clusters, and after an edit that
// keeps v1, drops v2 and adds v3 it is sent only the change: v3's cluster, and v2's removal.
func TestDeltaADS(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002"}, "{v1: 50, v2: 50}", ""))
	c := startCP(t, dir)
	s := deltaStream(t, c)
	if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{Node: envoyNode("edge"), TypeUrl: resource.ClusterType}); err != nil {
		t.Fatal(err)
	}
	r, err := s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	names := func(r *discoveryv3.DeltaDiscoveryResponse) []string {
		var out []string
		for _, res := range r.GetResources() {
			out = append(out, res.GetName())
		}
		sort.Strings(out)
		return out
	}
	first := names(r)
	if len(first) != 2 || len(r.GetRemovedResources()) != 0 {
		t.Fatalf("delta CDS gave %v (removed %v), want 2 clusters and no removals", first, r.GetRemovedResources())
	}
	var v1, v2 string
	for _, n := range first {
		switch {
		case strings.Contains(n, "_v1"):
			v1 = n
		case strings.Contains(n, "_v2"):
			v2 = n
		}
	}
	if v1 == "" || v2 == "" {
		t.Fatalf("clusters %v: want one for v1 and one for v2", first)
	}
	// ACK, then edit: v1 unchanged, v2 gone, v3 new.
	if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{Node: envoyNode("edge"), TypeUrl: resource.ClusterType, ResponseNonce: r.GetNonce()}); err != nil {
		t.Fatal(err)
	}
	writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", map[string]string{"v1": "127.0.0.1:9001", "v3": "127.0.0.1:9003"}, "{v1: 50, v3: 50}", ""))
	r, err = s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	// Make before break: the new cluster comes first, its removal of v2 only after the
	// routes that named v2 have been replaced (a later response).
	want := strings.Replace(v2, "_v2", "_v3", 1)
	if got := names(r); len(got) != 1 || got[0] != want || len(r.GetRemovedResources()) != 0 {
		t.Fatalf("after the edit delta CDS sent %v (removed %v), want only the new cluster %s (not the unchanged %s) and no removal yet", got, r.GetRemovedResources(), want, v1)
	}
	if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{Node: envoyNode("edge"), TypeUrl: resource.ClusterType, ResponseNonce: r.GetNonce()}); err != nil {
		t.Fatal(err)
	}
	r, err = s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if rm := r.GetRemovedResources(); len(rm) != 1 || rm[0] != v2 || len(r.GetResources()) != 0 {
		t.Fatalf("then delta CDS sent %v and removed %v, want only the removal of %s", names(r), rm, v2)
	}
}

// TestDNSNamesFollowAddressChanges: an endpoint given as a DNS name is served as EDS
// addresses, and when the name's addresses change the endpoints follow.
func TestDNSNamesFollowAddressChanges(t *testing.T) {
	fakeDNS.set("moving.models.svc", "10.7.0.1")
	dir := t.TempDir()
	writeFile(t, dir, "mover.yaml", rolloutDoc("mover", map[string]string{"v1": "moving.models.svc:8001"}, "{v1: 100}", ""))
	c := startCP(t, dir)
	addr := func() string {
		snap, err := c.srv.Served(FlavourGRPC)
		if err != nil {
			return ""
		}
		cla := snap.GetResources(resource.EndpointType)["mover_v1_grpc"].(*endpointv3.ClusterLoadAssignment)
		return cla.GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress().GetAddress()
	}
	if got := addr(); got != "10.7.0.1" {
		t.Fatalf("endpoint %q, want 10.7.0.1", got)
	}
	fakeDNS.set("moving.models.svc", "10.7.0.2")
	waitFor(t, 5*time.Second, "endpoint to follow DNS", func() bool { return addr() == "10.7.0.2" })
}
