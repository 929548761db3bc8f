package analysis

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/api"
	promv1 "github.com/prometheus/client_golang/api/prometheus/v1"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/patchbay-io/patchbay/test/harness"
)

// TestPrometheusProvider runs the provider against a real Prometheus (Debian's
// prometheus; `make test-deps` installs it) scraping two real model hosts (the patchbay
// binary) every second: it sends the hosts known numbers of good and failing requests
// inside a window and checks what the provider reports against what was sent and what the
// hosts' own /metrics observed.
//
// increase() extrapolates a series' change between its first and last sample in the range
// to the range's ends (Prometheus's extrapolatedRate), by a factor between 1 and
// range/(last-first). The test makes every series exist and be scraped before the window's
// requests and again after them, so each series' change in the range is exactly what was
// sent, and checks results against [sent, sent x that factor], the factor read from
// Prometheus's raw samples.
func TestPrometheusProvider(t *testing.T) {
	t.Parallel()
	promBin := prometheusBinary(t)
	bin := patchbayBinary(t)
	repo := harness.RepoWith(t, "ranker/v7", "ranker/v8")
	h1 := startModelHost(t, bin, repo, "modelhost-1")
	h2 := startModelHost(t, bin, repo, "modelhost-2")
	promURL := startPrometheus(t, promBin, h1.admin, h2.admin)
	raw := rawAPI(t, promURL)
	rng := rand.New(rand.NewPCG(14, 14))

	type send struct {
		h         modelHost
		version   string
		good, bad int
		shadow    bool // Host: ranker-shadow:port, as Envoy sends a mirrored request
	}
	// Warm-up: every series the window uses exists before it (increase() counts a series
	// from its first sample). v7 never fails: it has no errors series at all, which must
	// count as zero errors.
	warm := []send{{h1, "v7", 1, 0, false}, {h1, "v8", 1, 1, false}, {h2, "v8", 1, 1, false}, {h2, "v8", 1, 1, true}}
	window := []send{{h1, "v7", 25, 0, false}, {h1, "v8", 30, 6, false}, {h2, "v8", 20, 4, false}}
	for _, s := range warm {
		infer(t, rng, s.h, s.version, s.good, s.bad, s.shadow)
	}
	// Mirrored requests in the window must not count, where the hosts tell them apart
	// (traffic="shadow"); a host from before the label counts them as live.
	if shadowTagged(t, h2) {
		window = append(window, send{h2, "v8", 7, 3, true})
	} else {
		t.Log("the model host has no traffic label: no shadow requests in the window")
	}
	want := map[string]float64{} // instance/version/requests|errors -> raw counter value
	add := func(ss []send) {
		for _, s := range ss {
			want[s.h.admin+"/"+s.version+"/requests"] += float64(s.good + s.bad)
			if s.bad > 0 {
				want[s.h.admin+"/"+s.version+"/errors"] += float64(s.bad)
			}
		}
	}
	add(warm)
	waitCounters(t, raw, want)

	before := map[string]*hostMetrics{h1.admin: scrapeHost(t, h1), h2.admin: scrapeHost(t, h2)}
	start := time.Now()
	// A scrape of every series after the window's start, before its first request.
	waitFor(t, raw, "a scrape of every host after the window start", func(v model.Vector) bool {
		return len(v) == 1 && float64(v[0].Value) > float64(start.UnixMilli())/1000+0.005
	}, `min(timestamp(patchbay_modelhost_requests_total{model="ranker"}))`)
	for _, s := range window {
		infer(t, rng, s.h, s.version, s.good, s.bad, s.shadow)
	}
	add(window)
	waitCounters(t, raw, want)
	after := map[string]*hostMetrics{h1.admin: scrapeHost(t, h1), h2.admin: scrapeHost(t, h2)}
	// The histograms' last samples too (their counts change with the same requests).
	waitFor(t, raw, "the hosts' latency histograms scraped after the last request", func(v model.Vector) bool {
		got := map[string]float64{}
		for _, s := range v {
			got[string(s.Metric["instance"])+"/"+string(s.Metric["version"])] = float64(s.Value)
		}
		for _, h := range []modelHost{h1, h2} {
			for v, c := range after[h.admin].latencyCount {
				if got[h.admin+"/"+v] != c {
					return false
				}
			}
		}
		return true
	}, `sum by (instance, version) (patchbay_modelhost_request_duration_seconds_count{model="ranker",traffic!="shadow"})`)
	// Hold the window open for scrapes of the final values: increase() extrapolates by at
	// most range/(last - first sample), and with 1 s scrapes a range of 8 s keeps that
	// factor near 8/7 instead of 2 or more in a window of a few seconds.
	waitFor(t, raw, "8 s of scrapes in the window", func(v model.Vector) bool {
		return len(v) == 1 && float64(v[0].Value) >= float64(start.UnixMilli())/1000+8
	}, `min(timestamp(patchbay_modelhost_requests_total{model="ranker"}))`)
	end := time.Now()
	rng8 := end.Sub(start).Truncate(time.Millisecond)
	f := extrapolation(t, raw, end, rng8)
	t.Logf("window %v, increase() factor at most %.3f", rng8, f)

	p, err := NewPrometheus(PrometheusConfig{URL: promURL, Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	w7 := Window{Model: "ranker", Version: "v7", Start: start, End: end}
	w8 := Window{Model: "ranker", Version: "v8", Start: start, End: end}

	t.Run("Counts", func(t *testing.T) {
		within := func(what string, got, sent float64) {
			t.Helper()
			if got < sent-1e-9 || got > sent*f+1e-9 {
				t.Errorf("%s = %v, want %v (x at most %.3f by increase()'s extrapolation)", what, got, sent, f)
			}
		}
		req, errs, err := p.Counts(ctx, w8)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("v8: %.2f requests, %.2f errors (sent 60, 10)", req, errs)
		within("v8 requests", req, 60)
		within("v8 errors", errs, 10)
		req, errs, err = p.Counts(ctx, w7)
		if err != nil {
			t.Fatal(err)
		}
		within("v7 requests", req, 25)
		if errs != 0 {
			t.Errorf("v7 errors = %v, want 0 (no errors series)", errs)
		}
		// A version without any series: zero, not an error.
		req, errs, err = p.Counts(ctx, Window{Model: "ranker", Version: "v9", Start: start, End: end})
		if err != nil || req != 0 || errs != 0 {
			t.Errorf("v9: %v, %v, %v; want 0, 0, nil", req, errs, err)
		}
		// Names are escaped into the selector: this one would match every series if it
		// were pasted in raw.
		req, _, err = p.Counts(ctx, Window{Model: `ranker",model=~".*`, Version: "v8", Start: start, End: end})
		if err != nil || req != 0 {
			t.Errorf("model with a quote: %v, %v; want 0 requests, no error", req, err)
		}
	})

	t.Run("LatencyQuantile", func(t *testing.T) {
		bounds, cum := latencyDelta(before, after, "v8")
		n := cum[len(cum)-1]
		if n != 50 {
			t.Fatalf("hosts observed %v successful v8 requests, want 50", n)
		}
		for _, q := range []float64{0.5, 0.9, 0.99} {
			got, err := p.LatencyQuantile(ctx, w8, q)
			if err != nil {
				t.Fatal(err)
			}
			// histogram_quantile picks the first bucket whose count reaches q x total and
			// interpolates inside it; with every count scaled by 1..f, that bucket lies
			// between the ones reaching q x n / f and q x n x f.
			lo, _ := bucketOf(bounds, cum, q*n/f)
			_, hi := bucketOf(bounds, cum, min(q*n*f, n))
			if got < lo || got > hi {
				t.Errorf("p%v = %v s, want within the hosts' measured bucket [%v, %v] s", q*100, got, lo, hi)
			} else {
				t.Logf("p%v = %.6f s, in [%v, %v] s", q*100, got, lo, hi)
			}
		}
		_, err := p.LatencyQuantile(ctx, Window{Model: "ranker", Version: "v9", Start: start, End: end}, 0.99)
		if err == nil || !strings.Contains(err.Error(), "patchbay_modelhost_request_duration_seconds_bucket") || !strings.Contains(err.Error(), "no series") {
			t.Errorf("v9 latency: %v; want an error naming the query and saying no series", err)
		}
		if _, err := p.LatencyQuantile(ctx, w8, 1.5); err == nil {
			t.Error("quantile 1.5 accepted")
		}
	})

	t.Run("ScoreHistogram", func(t *testing.T) {
		wantBounds, wantCounts, ok := outputDelta(before, after, "v8", "score")
		if !ok {
			t.Skip("the model host exports no patchbay_modelhost_output histogram yet (issue 14's host part)")
		}
		bounds, counts, err := p.ScoreHistogram(ctx, w8, "score")
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(bounds, wantBounds) {
			t.Fatalf("bounds %v, want the host's %v", bounds, wantBounds)
		}
		var total, n float64
		for i := range counts {
			total += counts[i]
			n += wantCounts[i]
		}
		if n != 50 {
			t.Fatalf("hosts observed %v v8 scores, want 50 (one per successful request)", n)
		}
		if total < n-1e-9 || total > n*f+1e-9 {
			t.Errorf("counts sum to %v, want %v (x at most %.3f)", total, n, f)
		}
		cum := 0.0
		for i := range counts {
			// Each cumulative count is scaled by its own factor in 1..f.
			lo := max(0, wantCounts[i]+cum-cum*f)
			hi := (wantCounts[i]+cum)*f - cum
			if counts[i] < lo-1e-9 || counts[i] > hi+1e-9 {
				t.Errorf("bucket le=%v: %v, want %v (between %v and %v)", bounds[i], counts[i], wantCounts[i], lo, hi)
			}
			cum += wantCounts[i]
		}
		if _, _, err := p.ScoreHistogram(ctx, w8, "nope"); err == nil || !strings.Contains(err.Error(), "no series") {
			t.Errorf("unknown output: %v; want a no-series error", err)
		}
	})

	t.Run("Errors", func(t *testing.T) {
		bad, err := NewPrometheus(PrometheusConfig{URL: promURL, Queries: map[string]string{QueryRequests: `sum(increase(patchbay_modelhost_requests_total[{{.Range}}]`}})
		if err != nil {
			t.Fatal(err)
		}
		_, _, err = bad.Counts(ctx, w8)
		if err == nil || !strings.Contains(err.Error(), "sum(increase(patchbay_modelhost_requests_total[") || !strings.Contains(err.Error(), "bad_data") {
			t.Errorf("query Prometheus refuses: %v; want its bad_data error naming the query", err)
		}
		down, err := NewPrometheus(PrometheusConfig{URL: "http://" + harness.FreeAddr(t), Timeout: 2 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := down.Counts(ctx, w8); err == nil || !strings.Contains(err.Error(), "patchbay_modelhost_requests_total") {
			t.Errorf("no server: %v; want an error naming the query", err)
		}
		if _, _, err := p.Counts(ctx, Window{Model: "ranker", Version: "v8", Start: end, End: end}); err == nil {
			t.Error("empty window accepted")
		}
	})
}

func TestNewPrometheusChecksQueries(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		queries map[string]string
		want    string // in the error; "" = no error
	}{
		{"defaults", nil, ""},
		{"override", map[string]string{QueryLatency: `histogram_quantile({{.Quantile}}, sum by (le) (rate(my_latency_bucket{app="{{.Model}}"}[{{.Range}}])))`}, ""},
		{"unknown name", map[string]string{"error-rate": "x"}, `unknown prometheus query "error-rate"`},
		{"unknown field", map[string]string{QueryErrors: `sum(x{m="{{.Modle}}"})`}, `prometheus query "errors"`},
		{"bad template", map[string]string{QueryDrift: `sum(x{{.Output}`}, `prometheus query "drift"`},
		{"empty", map[string]string{QueryRequests: " "}, `prometheus query "requests": empty`},
		{"loop", map[string]string{QueryRequests: `{{range 1000000000}}x{{end}}`}, `only {{.Model}}`},
		{"function", map[string]string{QueryRequests: `{{printf "%s" .Model}}`}, `only {{.Model}}`},
		{"variable", map[string]string{QueryRequests: `{{$x := .Model}}`}, `only {{.Model}}`},
		{"comment", map[string]string{QueryRequests: `{{/* c */}}sum(x)`}, ``},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NewPrometheus(PrometheusConfig{URL: "http://127.0.0.1:9090", Queries: tc.queries})
			if tc.want == "" && err != nil {
				t.Fatal(err)
			}
			if tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
				t.Fatalf("error %v, want it to contain %q", err, tc.want)
			}
		})
	}
	if _, err := NewPrometheus(PrometheusConfig{}); err == nil {
		t.Error("no URL accepted")
	}
}

// prometheusBinary is $PROMETHEUS_BIN, else prometheus on PATH, else the test skips.
func prometheusBinary(t *testing.T) string {
	t.Helper()
	if b := os.Getenv("PROMETHEUS_BIN"); b != "" {
		return b
	}
	b, err := exec.LookPath("prometheus")
	if err != nil {
		t.Skip("no prometheus on PATH (or PROMETHEUS_BIN): `make test-deps` as root installs Debian's prometheus")
	}
	return b
}

// patchbayBinary is $PATCHBAY_BIN, else a build of ./cmd/patchbay in a temporary
// directory (this package has one test that needs it, so no TestMain).
func patchbayBinary(t *testing.T) string {
	t.Helper()
	if b := os.Getenv("PATCHBAY_BIN"); b != "" {
		return b
	}
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "patchbay")
	build := exec.Command("go", "build", "-o", out, "./cmd/patchbay")
	build.Dir = root
	if b, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build patchbay: %v\n%s", err, b)
	}
	return out
}

type modelHost struct{ http, admin string }

func startModelHost(t *testing.T, bin, repo, name string) modelHost {
	t.Helper()
	h := modelHost{http: harness.FreeAddr(t), admin: harness.FreeAddr(t)}
	harness.Start(t, name, "http://"+h.admin+"/v2/health/ready", bin, "modelhost",
		"--repository", repo, "--http", h.http, "--grpc", harness.FreeAddr(t), "--admin", h.admin)
	return h
}

// startPrometheus runs Prometheus on a free loopback port with its storage in a temporary
// directory, scraping the targets' /metrics every second; it stops with the test.
func startPrometheus(t *testing.T, bin string, targets ...string) string {
	t.Helper()
	dir := t.TempDir()
	var b bytes.Buffer
	fmt.Fprintf(&b, "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: modelhost\n    static_configs:\n      - targets: [")
	for i, tg := range targets {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%q", tg)
	}
	b.WriteString("]\n")
	config := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(config, b.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := harness.FreeAddr(t)
	harness.Start(t, "prometheus", "http://"+addr+"/-/ready", bin,
		"--config.file="+config, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr, "--log.level=warn")
	return "http://" + addr
}

func rawAPI(t *testing.T, url string) promv1.API {
	t.Helper()
	c, err := api.NewClient(api.Config{Address: url, Client: &http.Client{Timeout: 5 * time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	return promv1.NewAPI(c)
}

// waitFor polls an instant query until ok holds, for at most 30 s.
func waitFor(t *testing.T, raw promv1.API, what string, ok func(model.Vector) bool, query string) {
	t.Helper()
	var last string
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		v, _, err := raw.Query(context.Background(), query, time.Now())
		if err != nil {
			last = err.Error()
		} else if vec, _ := v.(model.Vector); ok(vec) {
			return
		} else {
			last = vec.String()
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after 30s waiting for %s: %s\nlast: %s", what, query, last)
		}
	}
}

// waitCounters waits until Prometheus's latest samples of the request and error
// counters are exactly want (instance/version/requests|errors -> value).
func waitCounters(t *testing.T, raw promv1.API, want map[string]float64) {
	t.Helper()
	waitFor(t, raw, "the hosts' counters in Prometheus", func(v model.Vector) bool {
		got := map[string]float64{}
		for _, s := range v {
			kind := "requests"
			if s.Metric[model.MetricNameLabel] == "patchbay_modelhost_request_errors_total" {
				kind = "errors"
			}
			got[string(s.Metric["instance"])+"/"+string(s.Metric["version"])+"/"+kind] += float64(s.Value)
		}
		for k, x := range want {
			if got[k] != x {
				return false
			}
		}
		return len(got) == len(want)
	}, `sum by (__name__, instance, version) ({__name__=~"patchbay_modelhost_requests_total|patchbay_modelhost_request_errors_total", model="ranker"})`)
}

// extrapolation is the largest factor increase() may scale a change by in this window:
// range / (last - first sample) over every series of the model the provider reads.
func extrapolation(t *testing.T, raw promv1.API, end time.Time, r time.Duration) float64 {
	t.Helper()
	q := fmt.Sprintf(`{__name__=~"patchbay_modelhost_(requests_total|request_errors_total|request_duration_seconds_bucket|output_bucket)", model="ranker"}[%s]`, model.Duration(r))
	v, _, err := raw.Query(context.Background(), q, end)
	if err != nil {
		t.Fatal(err)
	}
	m, ok := v.(model.Matrix)
	if !ok || len(m) == 0 {
		t.Fatalf("%s: %v, want series", q, v)
	}
	f := 1.0
	for _, s := range m {
		if len(s.Values) < 2 {
			t.Fatalf("%s: series %s has %d samples in the window", q, s.Metric, len(s.Values))
		}
		span := s.Values[len(s.Values)-1].Timestamp.Sub(s.Values[0].Timestamp)
		f = max(f, r.Seconds()/span.Seconds())
	}
	return f
}

// infer sends good valid requests and bad ones (a row of 7 features where the model
// takes 8: 400, counted by the host as a failed request of the version).
func infer(t *testing.T, rng *rand.Rand, h modelHost, version string, good, bad int, shadow bool) {
	t.Helper()
	url := "http://" + h.http + "/v2/models/ranker/versions/" + version + "/infer"
	for i := range good + bad {
		n, want := 8, http.StatusOK
		if i >= good {
			n, want = 7, http.StatusBadRequest
		}
		row := make([]string, n)
		for j := range row {
			row[j] = fmt.Sprintf("%.3f", rng.Float64()*10-5)
		}
		body := fmt.Sprintf(`{"inputs":[{"name":"features","datatype":"FP32","shape":[1,%d],"data":[%s]}]}`, n, strings.Join(row, ","))
		req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		if shadow {
			req.Host = "ranker-shadow:" + h.http[strings.LastIndexByte(h.http, ':')+1:]
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Fatalf("%s: %d, want %d", url, resp.StatusCode, want)
		}
	}
}

// shadowTagged reports whether the host labels requests by traffic and saw shadow ones.
func shadowTagged(t *testing.T, h modelHost) bool {
	t.Helper()
	resp, err := http.Get("http://" + h.admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	if _, err := b.ReadFrom(resp.Body); err != nil {
		t.Fatal(err)
	}
	return strings.Contains(b.String(), `traffic="shadow"`)
}

// hostMetrics is what a host's own /metrics says, by version: the latency histogram
// and the output histograms (cumulative bucket counts, +Inf last).
type hostMetrics struct {
	latencyBounds []float64
	latency       map[string][]float64 // version -> cumulative counts
	latencyCount  map[string]float64
	outputBounds  map[string][]float64 // version/output
	output        map[string][]float64
}

func scrapeHost(t *testing.T, h modelHost) *hostMetrics {
	t.Helper()
	resp, err := http.Get("http://" + h.admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse %s/metrics: %v", h.admin, err)
	}
	m := &hostMetrics{latency: map[string][]float64{}, latencyCount: map[string]float64{}, outputBounds: map[string][]float64{}, output: map[string][]float64{}}
	labels := func(x *dto.Metric) map[string]string {
		l := map[string]string{}
		for _, p := range x.GetLabel() {
			l[p.GetName()] = p.GetValue()
		}
		return l
	}
	histogram := func(x *dto.Metric) (bounds, cum []float64) {
		for _, b := range x.GetHistogram().GetBucket() {
			if !math.IsInf(b.GetUpperBound(), 1) {
				bounds = append(bounds, b.GetUpperBound())
				cum = append(cum, float64(b.GetCumulativeCount()))
			}
		}
		return append(bounds, math.Inf(1)), append(cum, float64(x.GetHistogram().GetSampleCount()))
	}
	add := func(dst, src []float64) []float64 {
		if dst == nil {
			dst = make([]float64, len(src))
		}
		for i := range src {
			dst[i] += src[i]
		}
		return dst
	}
	for _, x := range fams["patchbay_modelhost_request_duration_seconds"].GetMetric() {
		l := labels(x)
		if l["model"] != "ranker" || l["traffic"] == "shadow" {
			continue
		}
		b, c := histogram(x)
		m.latencyBounds = b
		m.latency[l["version"]] = add(m.latency[l["version"]], c)
		m.latencyCount[l["version"]] += float64(x.GetHistogram().GetSampleCount())
	}
	for _, x := range fams["patchbay_modelhost_output"].GetMetric() {
		l := labels(x)
		if l["model"] != "ranker" || l["traffic"] == "shadow" {
			continue
		}
		k := l["version"] + "/" + l["output"]
		b, c := histogram(x)
		m.outputBounds[k] = b
		m.output[k] = add(m.output[k], c)
	}
	return m
}

// latencyDelta is the hosts' latency histogram of version over the window (cumulative).
func latencyDelta(before, after map[string]*hostMetrics, version string) (bounds, cum []float64) {
	for h, a := range after {
		bounds = a.latencyBounds
		if cum == nil {
			cum = make([]float64, len(bounds))
		}
		for i, c := range a.latency[version] {
			cum[i] += c - at(before[h].latency[version], i)
		}
	}
	return bounds, cum
}

// outputDelta is the hosts' histogram of one output over the window, per bucket.
func outputDelta(before, after map[string]*hostMetrics, version, output string) (bounds, counts []float64, ok bool) {
	k := version + "/" + output
	var cum []float64
	for h, a := range after {
		if a.outputBounds[k] == nil {
			continue
		}
		bounds = a.outputBounds[k]
		if cum == nil {
			cum = make([]float64, len(bounds))
		}
		for i, c := range a.output[k] {
			cum[i] += c - at(before[h].output[k], i)
		}
	}
	if cum == nil {
		return nil, nil, false
	}
	counts = make([]float64, len(cum))
	for i := range cum {
		counts[i] = cum[i] - at(cum, i-1)
	}
	return bounds, counts, true
}

func at(s []float64, i int) float64 {
	if i < 0 || i >= len(s) {
		return 0
	}
	return s[i]
}

// bucketOf gives the bounds of the first bucket whose cumulative count reaches rank.
func bucketOf(bounds, cum []float64, rank float64) (lo, hi float64) {
	for i, c := range cum {
		if c >= rank {
			if i > 0 {
				lo = bounds[i-1]
			}
			hi = bounds[i]
			if math.IsInf(hi, 1) && i > 0 { // histogram_quantile answers the highest finite bound there
				hi = bounds[i-1]
			}
			return lo, hi
		}
	}
	return bounds[len(bounds)-2], bounds[len(bounds)-2]
}

// FuzzCheckPrometheusQuery: any text from a rollout file is refused or accepted without
// panicking, and an accepted template renders at most one field's worth per byte of it.
func FuzzCheckPrometheusQuery(f *testing.F) {
	for _, q := range DefaultPrometheusQueries {
		f.Add(q, "ranker", `v"8\`)
	}
	f.Add(`{{range 10}}{{.Model}}{{end}}`, "m", "v")
	f.Add(`{{.Model}}{{.Nope}}`, "m", "v")
	f.Fuzz(func(t *testing.T, text, m, v string) {
		tmpl, err := parseQuery(QueryLatency, text)
		if err != nil {
			return
		}
		var b strings.Builder
		d := QueryData{Model: quoteInner(m), Version: quoteInner(v), Output: "score", Range: "30s", Quantile: "0.99"}
		if err := tmpl.Execute(&b, d); err != nil {
			t.Fatalf("accepted %q, then: %v", text, err)
		}
		if limit := len(text) * (1 + max(len(d.Model), len(d.Version), len(d.Output))); b.Len() > limit {
			t.Fatalf("%q rendered %d bytes, more than %d", text, b.Len(), limit)
		}
	})
}
