package xds

import (
	"fmt"
	"runtime"
	"sort"
	"testing"
	"time"

	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/translate"
)

func bigSet(models int) *rollout.Set {
	set := &rollout.Set{}
	for i := 0; i < models; i++ {
		r := &rollout.Rollout{
			APIVersion: rollout.APIVersion, Kind: rollout.Kind, Model: fmt.Sprintf("model-%04d", i),
			Traffic: map[string]int{"v1": 80, "v2": 15, "v3": 5},
			Shadow:  []rollout.Shadow{{Version: "v3", Percent: 1}},
			Experiments: []rollout.Experiment{{Name: fmt.Sprintf("exp-%04d", i), Layer: fmt.Sprintf("layer-%d", i%50), Allocation: 2,
				Arms: []rollout.Arm{{Name: "a", Version: "v1", Weight: 1}, {Name: "b", Version: "v2", Weight: 1}}}},
		}
		for j, v := range []string{"v1", "v2", "v3"} {
			r.Versions = append(r.Versions, rollout.Version{Name: v, Protocol: "http",
				Endpoints: []string{fmt.Sprintf("10.%d.%d.%d:8000", i/250, i%250, j+1)}})
		}
		set.Rollouts = append(set.Rollouts, r)
	}
	return set
}

// BenchmarkTranslate1000x3 measures translate + validate (Build) for 1,000 models x 3
// versions against the bare translation of the same input (no validation, no versioning)
// measured in the same run, and prints the ratio.
func BenchmarkTranslate1000x3(b *testing.B) {
	set := bigSet(1000)
	if err := rollout.Validate(set); err != nil {
		b.Fatal(err)
	}
	opts := translate.Options{EdgeAddress: "0.0.0.0:10000", SidecarAddress: "127.0.0.1:15001", AccessLog: true}
	in := &translate.Input{Set: set, Slots: translate.SlotMaps(set, nil)}
	var bare, full time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		if _, err := translate.Envoy(in, opts, translate.Edge); err != nil {
			b.Fatal(err)
		}
		translate.GRPC(in)
		t1 := time.Now()
		if _, err := translate.Build(in, opts); err != nil {
			b.Fatal(err)
		}
		bare += t1.Sub(t0)
		full += time.Since(t1)
	}
	b.ReportMetric(float64(full.Milliseconds())/float64(b.N), "build-ms/op")
	b.ReportMetric(float64(bare.Milliseconds())/float64(b.N), "bare-translate-ms/op")
	b.ReportMetric(float64(full)/float64(bare), "build/bare-ratio")
}

// BenchmarkEditToRoute measures the time from a rollout file edit (written and renamed into
// place) to grpc-go's xDS client routing on the new weights, over 50 edits, and prints p50
// and p99 next to the p50 of one RPC (the probe's own resolution), measured in the same run.
func BenchmarkEditToRoute(b *testing.B) {
	v1, v2 := startBackend(b, "v1"), startBackend(b, "v2")
	eps := map[string]string{"v1": v1.addr, "v2": v2.addr}
	dir := b.TempDir()
	writeFile(b, dir, "ranker.yaml", rolloutDoc("ranker", eps, "{v1: 100, v2: 0}", ""))
	// The shipped defaults (debounce 10ms, settle 100ms), not the test harness's quicker
	// debounce, so the figure is what an operator gets.
	c := startCPWith(b, dir, func(cfg *Config) { cfg.Debounce, cfg.Settle = 0, 0 })
	client := xdsClient(b, c, "ranker")
	allGoTo(b, client, "v1")
	var lat, rpc []time.Duration
	b.ResetTimer()
	for n := 0; n < b.N; n++ {
		for i := 0; i < 50; i++ {
			want, traffic := "v2", "{v1: 0, v2: 100}"
			if i%2 == 1 {
				want, traffic = "v1", "{v1: 100, v2: 0}"
			}
			start := time.Now()
			writeFile(b, dir, "ranker.yaml", rolloutDoc("ranker", eps, traffic, ""))
			for j := 0; ; j++ {
				t0 := time.Now()
				got, err := call(b.Context(), client)
				rpc = append(rpc, time.Since(t0))
				if err == nil && got == want {
					break
				}
				if time.Since(start) > 10*time.Second {
					b.Fatalf("edit %d not routed within 10s", i)
				}
			}
			lat = append(lat, time.Since(start))
		}
	}
	b.StopTimer()
	p := func(d []time.Duration, q float64) time.Duration {
		sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
		return d[int(q*float64(len(d)-1))]
	}
	p50, p99, rpc50 := p(lat, 0.5), p(lat, 0.99), p(rpc, 0.5)
	b.ReportMetric(float64(p50.Microseconds())/1000, "edit-to-route-p50-ms")
	b.ReportMetric(float64(p99.Microseconds())/1000, "edit-to-route-p99-ms")
	b.ReportMetric(float64(rpc50.Microseconds())/1000, "rpc-p50-ms")
	b.ReportMetric(float64(p50)/float64(rpc50), "p50/rpc-ratio")
}

// BenchmarkMemoryPer1000Models reports the heap a control plane holds for 1,000 models x 3
// versions once its snapshots (three flavours) and policy are set, against the heap of
// the parsed rollouts alone, measured in the same run.
func BenchmarkMemoryPer1000Models(b *testing.B) {
	heap := func() uint64 {
		runtime.GC()
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	for n := 0; n < b.N; n++ {
		base := heap()
		set := bigSet(1000)
		withSet := heap()
		srv, err := New(Config{RolloutsDir: b.TempDir(), Translate: translate.Options{EdgeAddress: "0.0.0.0:10000", SidecarAddress: "127.0.0.1:15001"}})
		if err != nil {
			b.Fatal(err)
		}
		srv.mu.Lock()
		srv.state.files = set
		if err := srv.applyLocked(b.Context()); err != nil {
			b.Fatal(err)
		}
		srv.mu.Unlock()
		full := heap()
		runtime.KeepAlive(set)
		runtime.KeepAlive(srv)
		b.ReportMetric(float64(withSet-base)/(1<<20), "rollouts-MiB")
		b.ReportMetric(float64(full-base)/(1<<20), "control-plane-MiB/1000-models")
		b.ReportMetric(float64(full-base)/float64(withSet-base), "ratio")
	}
}
