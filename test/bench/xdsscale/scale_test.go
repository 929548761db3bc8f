package xdsscale

import (
	"context"
	"fmt"
	"sort"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// inferReq is a REST infer request for model i as it reaches Envoy's router (ext_proc has
// set the bucket; no x-patchbay-version: the split route).
func inferReq(i int) Request {
	return Request{Method: "POST", Path: "/v2/models/" + ModelName(i) + "/infer", Headers: map[string]string{"x-patchbay-bucket": "42"}}
}

// report prints got's metrics in name order, with each k-x-baseline over base.
func report(b *testing.B, got, base map[string]float64, ratios ...string) {
	for _, k := range ratios {
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

// BenchmarkXDSScale runs the shipped control plane (a separate process, default flags but
// the prober off) on 100 and 1,000 models (10,000 with PATCHBAY_BENCH_LARGE=1), one file
// per model, 5 versions each, with one Envoy-like delta ADS client (edge node: LDS, CDS,
// SRDS wildcard, RDS of every route config named, EDS of every cluster; see Envoy), and
// reports per size: process start → /readyz and → the client holding the full config,
// RSS and bytes per model, one-model edit → the client holding the new route table and
// the route bytes it received, and the matchers a request for the last model passes
// through now and in the flat table before Scoped RDS (OldFlatMatchers). 100 models is
// the same-run baseline: the other sizes print each figure over it.
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
				report(b, got, base, "ready-s", "full-start-s", "rss-MiB", "edit-p50-ms", "route-bytes/edit", "rest-matchers", "old-flat-matchers")
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
	e, err := DialEnvoy(ctx, p.ADS, "envoy-edge-xdsscale", true)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(e.Close)
	s, err := e.Wait(ctx, Snapshot.Complete)
	if err != nil {
		b.Fatal(err)
	}
	out["full-start-s"] = time.Since(p.Started).Seconds()
	out["full-config-bytes"] = float64(s.Stats.Bytes)
	out["full-route-bytes"] = float64(s.Stats.RouteBytes)
	out["route-bytes/model"] = float64(s.Stats.RouteBytes) / float64(models)
	out["config-bytes/model"] = float64(s.Stats.Bytes) / float64(models)
	for _, t := range []struct{ typ, unit string }{{resource.RouteType, "route-configs"}, {resource.ScopedRouteType, "scopes"},
		{resource.ClusterType, "clusters"}, {resource.EndpointType, "endpoint-sets"}} {
		out[t.unit] = float64(len(s.Res[t.typ]))
	}
	last := models - 1
	n, route, err := s.Matchers(inferReq(last))
	if err != nil {
		b.Fatal(err)
	}
	if route == "" {
		b.Fatalf("infer request for %s matched no route", ModelName(last))
	}
	out["rest-matchers"] = float64(n)
	rc, lookups, _ := s.RouteFor(inferReq(last))
	out["scope-lookups"] = float64(lookups)
	out["routes"] = float64(len(rc.GetVirtualHosts()[0].GetRoutes()))
	set, err := rollout.LoadDir(dir)
	if err != nil {
		b.Fatal(err)
	}
	old, err := OldFlatMatchers(set, ModelName(last))
	if err != nil {
		b.Fatal(err)
	}
	out["old-flat-matchers"] = float64(old)
	mem, err := ReadMem(p.Cmd.Process.Pid)
	if err != nil {
		b.Fatal(err)
	}
	out["rss-MiB"], out["hwm-MiB"] = mem.RSS/(1<<20), mem.HWM/(1<<20)
	out["rss-KiB/model"] = mem.RSS / 1024 / float64(models)
	// One-model edits of the last model: time until the client holds a new table for the
	// request, and the route bytes that arrived meanwhile.
	edits := 3
	if models >= 10000 {
		edits = 2
	}
	var lat []time.Duration
	var bytes []int
	for ed := 1; ed <= edits; ed++ {
		before, _, _ := s.RouteFor(inferReq(last))
		beforeName := before.GetName()
		held := s.Res[resource.RouteType][beforeName]
		rb := s.Stats.RouteBytes
		start := time.Now()
		EditModel(b, dir, last, ed, false)
		s, err = e.Wait(ctx, func(s Snapshot) bool {
			h := s.Res[resource.RouteType][beforeName]
			return h != nil && !Same(h, held) && s.Complete()
		})
		if err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
		bytes = append(bytes, s.Stats.RouteBytes-rb)
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	sort.Ints(bytes)
	out["edit-p50-ms"] = float64(lat[len(lat)/2].Microseconds()) / 1000
	out["edit-max-ms"] = float64(lat[len(lat)-1].Microseconds()) / 1000
	out["route-bytes/edit"] = float64(bytes[len(bytes)/2])
	if ok, err := lastEditsHeld(s, map[int]int{last: edits}); !ok || err != nil {
		b.Fatalf("after the edits the client does not hold the last edit's split: %v", err)
	}
	mem, _ = ReadMem(p.Cmd.Process.Pid)
	out["hwm-after-edits-MiB"] = mem.HWM / (1 << 20)
	if len(s.Stats.Removed) > 0 {
		b.Fatalf("the client was told to remove %d resources (first %q) though no model went away", len(s.Stats.Removed), s.Stats.Removed[0])
	}
	return out
}

// splitOf is the v1 and v2 weights of model i's split route in the client's config.
func splitOf(s Snapshot, i int) (w1, w2 uint32, err error) {
	rc, _, err := s.RouteFor(inferReq(i))
	if err != nil || rc == nil {
		return 0, 0, fmt.Errorf("model %s: no route table (%v)", ModelName(i), err)
	}
	_, r, err := WalkRoute(rc, inferReq(i))
	if err != nil || r == nil {
		return 0, 0, fmt.Errorf("model %s: no route (%v)", ModelName(i), err)
	}
	for _, c := range r.GetRoute().GetWeightedClusters().GetClusters() {
		switch c.GetName() {
		case translate.ClusterName(ModelName(i), "v1"):
			w1 = c.GetWeight().GetValue()
		case translate.ClusterName(ModelName(i), "v2"):
			w2 = c.GetWeight().GetValue()
		}
	}
	return w1, w2, nil
}

// lastEditsHeld: for every model i in last, the client's split of i is that of edit
// last[i] (ModelDoc: v1 90-shift, v2 10+shift, compared as a ratio: weights may be scaled).
func lastEditsHeld(s Snapshot, last map[int]int) (bool, error) {
	for i, ed := range last {
		w1, w2, err := splitOf(s, i)
		if err != nil {
			return false, err
		}
		shift := uint32(ed % 80)
		if w1*(10+shift) != w2*(90-shift) || w1+w2 == 0 {
			return false, fmt.Errorf("model %s holds v1 %d / v2 %d, edit %d wants %d/%d", ModelName(i), w1, w2, ed, 90-shift, 10+shift)
		}
	}
	return true, nil
}

// BenchmarkBurst: 1,000 file edits within one second on 1,000 models (600 models edited
// once, 100 models four times each; edits paced 1 ms apart) against the shipped control
// plane, with an Envoy-like delta client and an Envoy-like SotW client connected. Reports
// the pushes (responses, every type, and RDS alone) each received from the first edit
// until 2 s after it held every file's last edit, the time from the last write to that,
// and fails if an edit is lost (a client never reaches the last edit of some file within
// 2 minutes, or moves off it). The same-run baseline (single-*) is one edit of one model.
func BenchmarkBurst(b *testing.B) {
	bin := Binary(b)
	const models = 1000
	for n := 0; n < b.N; n++ {
		dir := b.TempDir()
		WriteModels(b, dir, models)
		p := Start(b, bin, dir, 5*time.Minute, HealthOff)
		ctx := WaitCtx(b, 10*time.Minute)
		clients := map[string]*Envoy{}
		for _, kind := range []string{"delta", "sotw"} {
			e, err := DialEnvoy(ctx, p.ADS, "envoy-burst-"+kind, kind == "delta")
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(e.Close)
			if _, err := e.Wait(ctx, Snapshot.Complete); err != nil {
				b.Fatal(err)
			}
			clients[kind] = e
		}
		out := map[string]float64{"models": models}
		// Baseline: one edit of one model.
		for k, v := range measureEdits(b, ctx, clients, map[int]int{0: 1}, func() { EditModel(b, dir, 0, 1, false) }) {
			out["single-"+k] = v
		}
		// The burst: one edit of each of models 200..799 and, interleaved, edits 1..4 of
		// each of models 100..199 (after every sixth single edit one repeated edit, then the
		// rest): 1,000 edits.
		type edit struct{ model, n int }
		var plan []edit
		for i := 0; i < 600; i++ {
			plan = append(plan, edit{200 + i, 1})
			if i%6 == 5 {
				plan = append(plan, edit{100 + (i/6)%100, 0})
			}
		}
		for len(plan) < 1000 {
			plan = append(plan, edit{100 + len(plan)%100, 0})
		}
		last := map[int]int{0: 1}
		for k := range plan {
			if plan[k].n == 0 {
				plan[k].n = last[plan[k].model] + 1
			}
			last[plan[k].model] = plan[k].n
		}
		var spread time.Duration
		for k, v := range measureEdits(b, ctx, clients, last, func() {
			t0 := time.Now()
			for k, ed := range plan {
				if d := time.Until(t0.Add(time.Duration(k) * time.Millisecond)); d > 0 {
					time.Sleep(d)
				}
				EditModel(b, dir, ed.model, ed.n, false)
			}
			spread = time.Since(t0)
		}) {
			out[k] = v
		}
		out["edits"] = float64(len(plan))
		out["models-edited"] = float64(len(last) - 1)
		out["burst-s"] = spread.Seconds()
		report(b, out, nil)
	}
}

// measureEdits runs do (file edits) and waits until every client holds last (model →
// its last edit), then 2 s more to see nothing moves after; it returns per client the
// responses received (all types, and RDS), the route bytes, and the time from do's end
// until the client held every last edit.
func measureEdits(b *testing.B, ctx context.Context, clients map[string]*Envoy, last map[int]int, do func()) map[string]float64 {
	before := map[string]Snapshot{}
	for k, e := range clients {
		before[k] = e.Snap()
	}
	do()
	end := time.Now()
	out := map[string]float64{}
	for k, e := range clients {
		wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		var why error
		_, err := e.Wait(wctx, func(s Snapshot) bool {
			ok, err := lastEditsHeld(s, last)
			why = err
			return ok && s.Complete()
		})
		cancel()
		if err != nil {
			b.Fatalf("%s client: a lost edit: %v (%v)", k, why, err)
		}
		out[k+"-settle-ms"] = float64(time.Since(end).Microseconds()) / 1000
	}
	time.Sleep(2 * time.Second)
	for k, e := range clients {
		after := e.Snap()
		if ok, err := lastEditsHeld(after, last); !ok {
			b.Fatalf("%s client: moved off the last edits after holding them: %v", k, err)
		}
		total := func(x Snapshot) (n int) {
			for _, v := range x.Stats.Responses {
				n += v
			}
			return n
		}
		out[k+"-pushes"] = float64(total(after) - total(before[k]))
		out[k+"-rds-pushes"] = float64(after.Stats.Responses[resource.RouteType] - before[k].Stats.Responses[resource.RouteType])
		out[k+"-route-MB"] = float64(after.Stats.RouteBytes-before[k].Stats.RouteBytes) / 1e6
		if len(after.Stats.Removed) > len(before[k].Stats.Removed) {
			b.Fatalf("%s client: removals during edits: %v", k, after.Stats.Removed[len(before[k].Stats.Removed):])
		}
	}
	return out
}
