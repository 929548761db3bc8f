package xdsscale

import (
	"context"
	"fmt"
	"sort"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"

	"github.com/patchbay-io/patchbay/xds/translate"
)

// EdgeNode is an edge Envoy's node as the control plane classifies it (xds.FlavourOf:
// user agent "envoy", no sidecar role: the edge flavour).
func EdgeNode(id string) *corev3.Node {
	return &corev3.Node{Id: id, Cluster: "patchbay-edge", UserAgentName: "envoy"}
}

// deltaRDS is an Envoy-flavour delta ADS stream subscribed to the edge route table.
type deltaRDS struct {
	s    discoveryv3.AggregatedDiscoveryService_DeltaAggregatedResourcesClient
	node *corev3.Node
}

func newDeltaRDS(tb testing.TB, ctx context.Context, addr string) *deltaRDS {
	tb.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<30)))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { conn.Close() })
	s, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		tb.Fatal(err)
	}
	d := &deltaRDS{s: s, node: EdgeNode("envoy-edge-xdsscale")}
	if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{Node: d.node, TypeUrl: resource.RouteType,
		ResourceNamesSubscribe: []string{translate.RouteConfigName}}); err != nil {
		tb.Fatal(err)
	}
	return d
}

// recv returns the next response's route table, the bytes of its route resources (the
// Resource messages as sent: name, version, Any), and ACKs it as Envoy does.
func (d *deltaRDS) recv(tb testing.TB) (*routev3.RouteConfiguration, int, string) {
	tb.Helper()
	r, err := d.s.Recv()
	if err != nil {
		tb.Fatal(err)
	}
	var rc *routev3.RouteConfiguration
	n, version := 0, ""
	for _, res := range r.GetResources() {
		n += proto.Size(res)
		if res.GetName() == translate.RouteConfigName {
			rc = &routev3.RouteConfiguration{}
			if err := res.GetResource().UnmarshalTo(rc); err != nil {
				tb.Fatal(err)
			}
			version = res.GetVersion()
		}
	}
	if err := d.s.Send(&discoveryv3.DeltaDiscoveryRequest{Node: d.node, TypeUrl: resource.RouteType, ResponseNonce: r.GetNonce()}); err != nil {
		tb.Fatal(err)
	}
	return rc, n, version
}

// Requests for the last model (REST: the models serve REST only, as in the issue's
// figures: 13 routes per model of 5 versions), as they reach Envoy's router (ext_proc has set the bucket).
func lastModelRequests(models int) map[string]Request {
	m := ModelName(models - 1)
	return map[string]Request{
		"rest": {Method: "POST", Path: "/v2/models/" + m + "/infer", Headers: map[string]string{"x-patchbay-bucket": "42"}},
	}
}

// BenchmarkXDSScale runs the shipped control plane (a separate process) on 100 and 1,000
// models (10,000 with PATCHBAY_BENCH_LARGE=1), one file per model, 5 versions each, and
// reports per size: time to ready, RSS and its peak, the time from a one-model edit
// (renamed into place) to an Envoy delta client receiving the new route table and the
// route bytes it received, and the route matchers a request for the last model walks.
// 100 models is the same-run baseline: the last size prints each figure over it.
func BenchmarkXDSScale(b *testing.B) {
	sizes := []int{100, 1000}
	if Large() {
		sizes = append(sizes, 10000)
	}
	bin := Binary(b)
	base := map[string]float64{}
	for _, models := range sizes {
		b.Run(fmt.Sprintf("models=%d", models), func(b *testing.B) {
			for n := 0; n < b.N; n++ {
				got := scaleOnce(b, bin, models)
				if models == sizes[0] {
					base = got
				}
				for _, k := range []string{"ready-s", "rss-MiB", "edit-p50-ms", "route-bytes/edit", "rest-matchers"} {
					if base[k] > 0 {
						got[k+"-x-baseline"] = got[k] / base[k]
					}
				}
				keys := make([]string, 0, len(got))
				for k := range got {
					keys = append(keys, k)
				}
				sort.Strings(keys)
				for _, k := range keys {
					b.ReportMetric(got[k], k)
				}
			}
		})
	}
}

func scaleOnce(b *testing.B, bin string, models int) map[string]float64 {
	b.StopTimer()
	dir := b.TempDir()
	WriteModels(b, dir, models)
	b.StartTimer()
	p := Start(b, bin, dir, 10*time.Minute, HealthOff)
	out := map[string]float64{"models": float64(models), "ready-s": p.Ready.Seconds()}
	ctx := WaitCtx(b, 30*time.Minute)
	d := newDeltaRDS(b, ctx, p.ADS)
	rc, full, version := d.recv(b)
	if rc == nil {
		b.Fatal("first delta response has no route table")
	}
	out["full-route-bytes"] = float64(full)
	out["route-bytes/model"] = float64(full) / float64(models)
	for kind, req := range lastModelRequests(models) {
		n, name, err := Walk(rc, req)
		if err != nil {
			b.Fatal(err)
		}
		if want := ModelName(models - 1); len(name) < len(want) || name[:len(want)] != want {
			b.Fatalf("%s request for %s matched route %q", kind, want, name)
		}
		out[kind+"-matchers"] = float64(n)
	}
	out["routes"] = float64(len(rc.GetVirtualHosts()[0].GetRoutes()))
	mem, err := ReadMem(p.Cmd.Process.Pid)
	if err != nil {
		b.Fatal(err)
	}
	out["rss-MiB"], out["hwm-MiB"] = mem.RSS/(1<<20), mem.HWM/(1<<20)
	out["rss-KiB/model"] = mem.RSS / 1024 / float64(models)
	// One-model edits of the last model: time until the delta client holds a route table
	// with a new version, and the route bytes that carried it.
	edits := 3
	if models >= 10000 {
		edits = 2
	}
	var lat []time.Duration
	var bytes []int
	for e := 1; e <= edits; e++ {
		start := time.Now()
		EditModel(b, dir, models-1, e, false)
		for {
			rc2, n, v := d.recv(b)
			if rc2 != nil && v != version {
				lat = append(lat, time.Since(start))
				bytes = append(bytes, n)
				version = v
				break
			}
		}
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	sort.Ints(bytes)
	out["edit-p50-ms"] = float64(lat[len(lat)/2].Microseconds()) / 1000
	out["edit-max-ms"] = float64(lat[len(lat)-1].Microseconds()) / 1000
	out["route-bytes/edit"] = float64(bytes[len(bytes)/2])
	mem, _ = ReadMem(p.Cmd.Process.Pid)
	out["hwm-after-edits-MiB"] = mem.HWM / (1 << 20)
	return out
}
