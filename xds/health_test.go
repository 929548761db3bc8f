package xds

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// versionHost is one model version over both OIP protocols: a net/http server answering
// the version's ready path (200 or 503) and a grpc-go server with OIP ModelInfer (answering
// its version) and grpc-go's health server reporting oip.HealthService(model, version).
type versionHost struct {
	model, version     string
	restAddr, grpcAddr string
	restReady          atomic.Bool
	health             *health.Server
}

func startVersionHost(t *testing.T, model, version string) *versionHost {
	h := &versionHost{model: model, version: version, health: health.NewServer()}
	h.restReady.Store(true)
	rl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v2/models/"+model+"/versions/"+version+"/ready", func(w http.ResponseWriter, _ *http.Request) {
		if !h.restReady.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	})
	hs := &http.Server{Handler: mux}
	go hs.Serve(rl)
	t.Cleanup(func() { hs.Close() })
	gl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	oip.RegisterGRPCInferenceServiceServer(gs, &backend{name: version})
	healthpb.RegisterHealthServer(gs, h.health)
	h.health.SetServingStatus(oip.HealthService(model, version), healthpb.HealthCheckResponse_SERVING)
	go gs.Serve(gl)
	t.Cleanup(gs.Stop)
	h.restAddr, h.grpcAddr = rl.Addr().String(), gl.Addr().String()
	return h
}

// setREST and setGRPC make one protocol of the version ready or not.
func (h *versionHost) setREST(ok bool) { h.restReady.Store(ok) }
func (h *versionHost) setGRPC(ok bool) {
	st := healthpb.HealthCheckResponse_SERVING
	if !ok {
		st = healthpb.HealthCheckResponse_NOT_SERVING
	}
	h.health.SetServingStatus(oip.HealthService(h.model, h.version), st)
}

// servedSplit expands the edge snapshot's split route (name) into the version of each of
// the translate.Slots slots, as Envoy walks its weighted clusters.
func servedSplit(t *testing.T, c *cp, route string) []string {
	t.Helper()
	snap, err := c.srv.Served(FlavourEdge)
	if err != nil {
		t.Fatal(err)
	}
	model, _, _ := strings.Cut(route, "/")
	rc := snap.GetResources(resource.RouteType)[translate.ModelRouteName(model)].(*routev3.RouteConfiguration)
	for _, r := range rc.GetVirtualHosts()[0].GetRoutes() {
		if r.GetName() != route {
			continue
		}
		var out []string
		for _, cw := range r.GetRoute().GetWeightedClusters().GetClusters() {
			for range cw.GetWeight().GetValue() {
				out = append(out, cw.GetName())
			}
		}
		return out
	}
	return nil
}

func hasRoute(t *testing.T, c *cp, name string) bool {
	t.Helper()
	snap, err := c.srv.Served(FlavourEdge)
	if err != nil {
		t.Fatal(err)
	}
	for _, rc := range snap.GetResources(resource.RouteType) {
		for _, r := range rc.(*routev3.RouteConfiguration).GetVirtualHosts()[0].GetRoutes() {
			if r.GetName() == name {
				return true
			}
		}
	}
	return false
}

func healthOf(c *cp, model, version string) VersionHealth {
	for _, m := range c.srv.Status().Models {
		if m.Name == model {
			return m.Health[version]
		}
	}
	return VersionHealth{}
}

func persistedSlots(c *cp, model string) translate.SlotMap {
	c.srv.mu.Lock()
	defer c.srv.mu.Unlock()
	return append(translate.SlotMap(nil), c.srv.state.slots[model]...)
}

// TestUnhealthyVersionLeavesTheSplit: a version whose REST ready path fails (its gRPC
// health still SERVING) leaves the Envoy split within a few probe intervals: its slots go
// to the healthy versions (both of them), every user of a healthy version keeps its slot,
// its version routes go, the persisted slot map does not change, grpc-go's xDS client stops
// reaching it; on recovery the split and the config version are exactly as before. When
// every version with a share is unhealthy nothing changes.
func TestUnhealthyVersionLeavesTheSplit(t *testing.T) {
	hosts := map[string]*versionHost{}
	var doc strings.Builder
	doc.WriteString("apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: ranker\nversions:\n")
	for _, v := range []string{"v1", "v2", "v3"} {
		h := startVersionHost(t, "ranker", v)
		hosts[v] = h
		fmt.Fprintf(&doc, "  - {name: %s, endpoints: [%q], grpcEndpoints: [%q]}\n", v, h.restAddr, h.grpcAddr)
	}
	doc.WriteString("traffic: {v1: 50, v2: 30, v3: 20}\n")
	dir := t.TempDir()
	writeFile(t, dir, "ranker.yaml", doc.String())
	c := startCPWith(t, dir, func(cfg *Config) { cfg.VersionHealth = 50 * time.Millisecond })
	client := xdsClient(t, c, "ranker")

	waitFor(t, 5*time.Second, "v2 probed healthy", func() bool { return healthOf(c, "ranker", "v2").State == healthHealthy })
	before := servedSplit(t, c, "ranker/infer/split")
	beforeGRPC := servedSplit(t, c, "ranker/grpc/split")
	beforeVersion := c.srv.Version()
	slots := persistedSlots(c, "ranker")
	if len(before) != translate.Slots || !hasRoute(t, c, "ranker/infer/version/v2") {
		t.Fatalf("before: split %v, want %d slots and a v2 version route", before, translate.Slots)
	}
	if got := countCalls(t, client, 200); got["v2"] == 0 {
		t.Fatalf("before: grpc-go never reached v2 in 200 RPCs: %v", got)
	}

	hosts["v2"].setREST(false)
	waitFor(t, 10*time.Second, "v2 out of the REST split", func() bool {
		return !strings.Contains(strings.Join(servedSplit(t, c, "ranker/infer/split"), ","), "ranker_v2")
	})
	during := servedSplit(t, c, "ranker/infer/split")
	duringGRPC := servedSplit(t, c, "ranker/grpc/split")
	moved := map[string]int{}
	for i := range before {
		switch {
		case before[i] == "ranker_v2":
			moved[during[i]]++
		case during[i] != before[i]:
			t.Fatalf("slot %d of a healthy version moved: %s -> %s", i, before[i], during[i])
		}
		if duringGRPC[i] != during[i]+"_grpc" {
			t.Fatalf("slot %d: gRPC split %s, REST split %s: want the same version", i, duringGRPC[i], during[i])
		}
	}
	if moved["ranker_v1"] == 0 || moved["ranker_v3"] == 0 || moved["ranker_v1"]+moved["ranker_v3"] != 30 {
		t.Fatalf("v2's 30 slots went to %v, want spread over v1 and v3", moved)
	}
	if hasRoute(t, c, "ranker/infer/version/v2") || hasRoute(t, c, "ranker/grpc/version/v2") {
		t.Fatal("an unhealthy version's version routes are still emitted")
	}
	if !hasRoute(t, c, "ranker/infer/version/v1") {
		t.Fatal("a healthy version's version route is gone")
	}
	if got := persistedSlots(c, "ranker"); strings.Join(got, ",") != strings.Join(slots, ",") {
		t.Fatalf("the persisted slot map changed:\n%v\n%v", slots, got)
	}
	if h := healthOf(c, "ranker", "v2"); h.State != healthUnhealthy || !strings.Contains(h.Error, "HTTP 503") {
		t.Fatalf("/status health of v2: %+v", h)
	}
	if c.srv.Version() == beforeVersion {
		t.Fatal("the config version did not change")
	}
	code, body := httpDo(t, http.MethodGet, "http://"+c.adminAddr+"/metrics", "", "")
	if code != 200 || !strings.Contains(body, `patchbay_xds_version_healthy{model="ranker",version="v2"} 0`) ||
		!strings.Contains(body, `patchbay_xds_version_healthy{model="ranker",version="v1"} 1`) {
		t.Fatalf("metrics lack the version health gauge: %d\n%s", code, body)
	}
	// grpc-go's xDS client: bounded wait until 100 RPCs in a row never reach v2.
	waitFor(t, 10*time.Second, "grpc-go off v2", func() bool {
		got := countCalls(t, client, 100)
		return got["v2"] == 0
	})
	if !strings.Contains(c.logs.String(), "version health changed") {
		t.Fatal("the transition was not logged")
	}

	hosts["v2"].setREST(true)
	waitFor(t, 10*time.Second, "the split as before", func() bool {
		return strings.Join(servedSplit(t, c, "ranker/infer/split"), ",") == strings.Join(before, ",")
	})
	if got := servedSplit(t, c, "ranker/grpc/split"); strings.Join(got, ",") != strings.Join(beforeGRPC, ",") {
		t.Fatalf("gRPC split after recovery differs:\n%v\n%v", beforeGRPC, got)
	}
	if c.srv.Version() != beforeVersion || !hasRoute(t, c, "ranker/infer/version/v2") {
		t.Fatalf("after recovery: version %s (was %s), v2 route %v", c.srv.Version(), beforeVersion, hasRoute(t, c, "ranker/infer/version/v2"))
	}
	waitFor(t, 10*time.Second, "grpc-go back on v2", func() bool { return countCalls(t, client, 100)["v2"] > 0 })

	t.Run("every version unhealthy changes nothing", func(t *testing.T) {
		for _, h := range hosts {
			h.setGRPC(false)
		}
		waitFor(t, 10*time.Second, "every version unhealthy", func() bool {
			for _, v := range []string{"v1", "v2", "v3"} {
				if healthOf(c, "ranker", v).State != healthUnhealthy {
					return false
				}
			}
			return true
		})
		if c.srv.Version() != beforeVersion || strings.Join(servedSplit(t, c, "ranker/infer/split"), ",") != strings.Join(before, ",") {
			t.Fatal("all versions unhealthy changed the config (want fail static)")
		}
		for _, h := range hosts {
			h.setGRPC(true)
		}
	})
}

// TestVersionProbeTimesOut: an endpoint that accepts and never answers fails its probe
// (by its timeout): a round never hangs on it.
func TestVersionProbeTimesOut(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	p := &prober{timeout: 100 * time.Millisecond, plain: &http.Client{}}
	for _, proto := range []string{"http", "grpc"} {
		err := p.probe(context.Background(), probeTarget{probeKey: probeKey{"m", "v1", proto, l.Addr().String()}})
		if err == nil {
			t.Fatalf("%s probe of a silent endpoint succeeded", proto)
		}
	}
}
