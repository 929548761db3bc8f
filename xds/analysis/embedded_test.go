package analysis

import (
	"context"
	"math"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/patchbay-io/patchbay/xds/rollout"
)

// host is a model host's metrics as a real registry served over HTTP on 127.0.0.1.
type host struct {
	reqs, errs *prometheus.CounterVec
	dur, out   *prometheus.HistogramVec
	addr       string
}

func newHost(t *testing.T) *host {
	reg := prometheus.NewRegistry()
	h := &host{
		reqs: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "patchbay_modelhost_requests_total"}, []string{"model", "version", "protocol", "traffic"}),
		errs: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "patchbay_modelhost_request_errors_total"}, []string{"model", "version", "protocol", "code", "traffic"}),
		dur: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "patchbay_modelhost_request_duration_seconds", Buckets: []float64{0.1, 0.2, 0.5}},
			[]string{"model", "version", "protocol", "traffic"}),
		out: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "patchbay_modelhost_output", Buckets: []float64{0.5, 1}},
			[]string{"model", "version", "output", "traffic"}),
	}
	reg.MustRegister(h.reqs, h.errs, h.dur, h.out)
	srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	t.Cleanup(srv.Close)
	h.addr = strings.TrimPrefix(srv.URL, "http://")
	return h
}

// observe records n requests of a version, errs of them failed, each taking d seconds and
// answering score.
func (h *host) observe(version, protocol, traffic string, n, errs int, d, score float64) {
	for i := 0; i < n; i++ {
		h.reqs.WithLabelValues("m", version, protocol, traffic).Inc()
		h.dur.WithLabelValues("m", version, protocol, traffic).Observe(d)
		h.out.WithLabelValues("m", version, "score", traffic).Observe(score)
	}
	if errs > 0 {
		h.errs.WithLabelValues("m", version, protocol, "500", traffic).Add(float64(errs))
	}
}

func TestEmbeddedAnswersFromTheWindowsDeltas(t *testing.T) {
	h1, h2 := newHost(t), newHost(t)
	e := &Embedded{Endpoints: func(model, version string) []string {
		if model == "m" && version == "v2" {
			return []string{h1.addr, h2.addr}
		}
		return nil
	}}
	ctx := context.Background()
	// Before the window: counted in neither delta.
	h1.observe("v2", "http", "live", 50, 50, 0.4, 0.9)
	start := time.Now()
	if _, _, err := e.Counts(ctx, Window{Model: "m", Version: "v2", Start: start, End: start}); err != nil {
		t.Fatal(err)
	}
	// In the window: live REST and gRPC on two hosts, shadow copies (not counted), and
	// another version on the same host.
	h1.observe("v2", "http", "live", 60, 3, 0.05, 0.2)
	h1.observe("v2", "grpc", "live", 20, 1, 0.15, 0.7)
	h2.observe("v2", "http", "live", 20, 0, 0.3, 0.2)
	h2.observe("v2", "http", "shadow", 500, 500, 0.4, 0.9)
	h2.observe("v1", "http", "live", 7, 7, 0.4, 0.9)
	w := Window{Model: "m", Version: "v2", Start: start, End: time.Now()}
	req, errs, err := e.Counts(ctx, w)
	if err != nil || req != 100 || errs != 4 {
		t.Fatalf("counts %v %v %v, want 100 requests, 4 errors", req, errs, err)
	}
	// 60 in [0, 0.1], 20 in (0.1, 0.2], 20 in (0.2, 0.5]: p50 at rank 50 is 0.1*50/60.
	p50, err := e.LatencyQuantile(ctx, w, 0.5)
	if err != nil || math.Abs(p50-0.1*50/60) > 1e-9 {
		t.Fatalf("p50 %v %v, want %v", p50, err, 0.1*50/60)
	}
	// p90 at rank 90: 80 below 0.2, 10 of 20 into (0.2, 0.5]: 0.35.
	if p90, _ := e.LatencyQuantile(ctx, w, 0.9); math.Abs(p90-0.35) > 1e-9 {
		t.Fatalf("p90 %v, want 0.35", p90)
	}
	bounds, counts, err := e.ScoreHistogram(ctx, w, "score")
	if err != nil || len(bounds) != 3 || !math.IsInf(bounds[2], 1) {
		t.Fatalf("histogram %v %v %v", bounds, counts, err)
	}
	if counts[0] != 80 || counts[1] != 20 || counts[2] != 0 {
		t.Fatalf("score counts %v, want [80 20 0]", counts)
	}
}

func TestEmbeddedWithoutTrafficLabelCountsAsLive(t *testing.T) {
	reg := prometheus.NewRegistry()
	reqs := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "patchbay_modelhost_requests_total"}, []string{"model", "version", "protocol"})
	reg.MustRegister(reqs)
	srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	defer srv.Close()
	e := &Embedded{Endpoints: func(string, string) []string { return []string{strings.TrimPrefix(srv.URL, "http://")} }}
	reqs.WithLabelValues("m", "v1", "http").Add(5)
	start := time.Now()
	e.Counts(context.Background(), Window{Model: "m", Version: "v1", Start: start, End: start})
	reqs.WithLabelValues("m", "v1", "http").Add(12)
	if r, _, err := e.Counts(context.Background(), Window{Model: "m", Version: "v1", Start: start, End: time.Now()}); err != nil || r != 12 {
		t.Fatalf("got %v %v, want 12", r, err)
	}
}

func TestEmbeddedScrapeErrors(t *testing.T) {
	e := &Embedded{Endpoints: func(string, string) []string { return []string{"127.0.0.1:1"} }, Timeout: time.Second}
	if _, _, err := e.Counts(context.Background(), Window{Model: "m", Version: "v1", End: time.Now()}); err == nil || !strings.Contains(err.Error(), "scrape 127.0.0.1:1") {
		t.Fatalf("got %v, want a scrape error naming the endpoint", err)
	}
	e = &Embedded{Endpoints: func(string, string) []string { return nil }}
	if _, _, err := e.Counts(context.Background(), Window{Model: "m", Version: "v1", End: time.Now()}); err == nil {
		t.Fatal("no endpoints: want an error")
	}
}

// Measure and Decide over the embedded provider: the error-rate gate of a canary failing
// 10% of its requests fails; latency and drift are measured from the real histograms.
func TestMeasureOverEmbedded(t *testing.T) {
	h := newHost(t)
	e := &Embedded{Endpoints: func(string, string) []string { return []string{h.addr} }}
	maxErr, inc, ratio, psi := &rollout.Threshold{Text: "0.05"}, 0.01, 2.0, 0.2
	a := &rollout.Analysis{Baseline: "v1", Canary: "v2", Steps: []int{10, 100}, Gates: []rollout.Gate{
		{Metric: rollout.MetricErrorRate, Max: maxErr, MaxIncrease: &inc},
		{Metric: rollout.MetricLatency, Percentile: 90, Max: &rollout.Threshold{Text: "450ms"}, MaxRatio: &ratio},
		{Metric: rollout.MetricDrift, Output: "score", MaxPSI: &psi},
	}}
	ctx := context.Background()
	start := time.Now()
	if _, err := Measure(ctx, e, a, "m", start, start, nil); err != nil {
		t.Fatal(err)
	}
	h.observe("v1", "http", "live", 100, 0, 0.05, 0.2)
	h.observe("v2", "http", "live", 100, 10, 0.05, 0.2)
	m, err := Measure(ctx, e, a, "m", start, time.Now(), nil)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]GateResult{}
	for _, g := range m.Gates {
		got[g.Gate] = g
	}
	if g := got["error-rate"]; g.Value != 0.1 || g.Pass {
		t.Errorf("error-rate %+v", g)
	}
	if g := got["error-rate-increase"]; g.Value != 0.1 || g.Pass {
		t.Errorf("error-rate-increase %+v", g)
	}
	if g := got["latency-p90"]; math.Abs(g.Value-0.09) > 1e-9 || !g.Pass {
		t.Errorf("latency-p90 %+v", g)
	}
	if g := got["latency-p90-ratio"]; math.Abs(g.Value-1) > 1e-9 || !g.Pass {
		t.Errorf("latency-p90-ratio %+v", g)
	}
	if g := got["drift-score"]; g.Value != 0 || !g.Pass {
		t.Errorf("drift-score %+v", g)
	}
	d := Decide(Input{Steps: a.Steps, Interval: time.Hour, MinRequests: 100, Measurement: m})
	if d.Kind != Fail || d.Gate != "error-rate" {
		t.Fatalf("decision %+v, want fail on error-rate", d)
	}
}
