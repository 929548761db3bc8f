package xds

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/patchbay-io/patchbay/internal/tlsfiles"
	"github.com/patchbay-io/patchbay/xds/store"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// metricsHost stands for a model host's admin listener: a real prometheus.Registry with
// the hosts' request, error and duration metrics, served on /metrics over HTTP on
// 127.0.0.1, and the version's ready path. The test drives its counters.
type metricsHost struct {
	addr    string
	version string
	reqs    *prometheus.CounterVec
	errs    *prometheus.CounterVec
	dur     *prometheus.HistogramVec
	// perTick requests are recorded every 5ms, errPermille of them failed.
	perTick     atomic.Int64
	errPermille atomic.Int64
	notReady    atomic.Bool // the ready path answers 503
}

func startMetricsHost(t *testing.T, model, version string) *metricsHost {
	t.Helper()
	return startMetricsHostTLS(t, model, version, nil)
}

// startMetricsHostTLS is startMetricsHost serving over TLS with cfg (nil: plain).
func startMetricsHostTLS(t *testing.T, model, version string, cfg *tls.Config) *metricsHost {
	t.Helper()
	reg := prometheus.NewRegistry()
	h := &metricsHost{version: version,
		reqs: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "patchbay_modelhost_requests_total"}, []string{"model", "version", "protocol", "traffic"}),
		errs: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "patchbay_modelhost_request_errors_total"}, []string{"model", "version", "protocol", "code", "traffic"}),
		dur: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "patchbay_modelhost_request_duration_seconds", Buckets: prometheus.DefBuckets},
			[]string{"model", "version", "protocol", "traffic"}),
	}
	reg.MustRegister(h.reqs, h.errs, h.dur)
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /v2/models/"+model+"/versions/"+version+"/ready", func(w http.ResponseWriter, _ *http.Request) {
		if h.notReady.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: mux}
	h.addr = lis.Addr().String()
	if cfg != nil {
		lis = tls.NewListener(lis, cfg)
	}
	go srv.Serve(lis)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		var total int64
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			n := h.perTick.Load()
			for i := int64(0); i < n; i++ {
				total++
				h.reqs.WithLabelValues(model, version, "http", "live").Inc()
				h.dur.WithLabelValues(model, version, "http", "live").Observe(0.004)
				if total%1000 < h.errPermille.Load() {
					h.errs.WithLabelValues(model, version, "http", "500", "live").Inc()
				}
			}
			// Shadow copies never count: a flood of failed ones.
			h.reqs.WithLabelValues(model, version, "http", "shadow").Add(50)
			h.errs.WithLabelValues(model, version, "http", "500", "shadow").Add(50)
		}
	}()
	t.Cleanup(func() { cancel(); <-done; srv.Close() })
	return h
}

func analysisDoc(b, c *metricsHost, interval string, minRequests int, extra string) string {
	return fmt.Sprintf(`apiVersion: patchbay.io/v1
kind: Rollout
model: m
versions:
  - {name: v1, endpoints: [%q], metricsEndpoints: [%q]}
  - {name: v2, endpoints: [%q], metricsEndpoints: [%q]}
traffic: {v1: 100}
analysis:
  baseline: v1
  canary: v2
  steps: [10, 50, 100]
  interval: %s
  minRequests: %d
%s  gates:
    - {metric: error-rate, max: 0.05}
    - {metric: latency, percentile: 99, max: 1s}
`, b.addr, b.addr, c.addr, c.addr, interval, minRequests, extra)
}

func getStatus(t *testing.T, c *cp) Status {
	t.Helper()
	resp, err := http.Get("http://" + c.adminAddr + "/status")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatal(err)
	}
	return st
}

func modelStatus(t *testing.T, c *cp, model string) ModelStatus {
	t.Helper()
	for _, m := range getStatus(t, c).Models {
		if m.Name == model {
			return m
		}
	}
	t.Fatalf("no model %s in /status", model)
	return ModelStatus{}
}

func storedState(t *testing.T, path, model string) store.ModelState {
	t.Helper()
	all, err := store.NewFile(path).Load(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return all[model]
}

// webhookSink collects the decisions POSTed to it.
type webhookSink struct {
	mu     sync.Mutex
	events []AnalysisEvent
	url    string
}

func startWebhook(t *testing.T) *webhookSink {
	w := &webhookSink{}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		var ev AnalysisEvent
		if r.Method == http.MethodPost && r.Header.Get("Content-Type") == "application/json" && json.NewDecoder(r.Body).Decode(&ev) == nil {
			w.mu.Lock()
			w.events = append(w.events, ev)
			w.mu.Unlock()
		}
	})}
	go srv.Serve(lis)
	t.Cleanup(func() { srv.Close() })
	w.url = "http://" + lis.Addr().String() + "/hook"
	return w
}

func (w *webhookSink) decisions() map[string]int {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := map[string]int{}
	for _, e := range w.events {
		out[e.Decision]++
	}
	return out
}

// A canary meeting its gates goes through every step (10, 50, 100) to its final share:
// served split, slot map, stored state, history (one split per step, monotone), log
// lines, metrics and webhook all show it.
func TestAnalysisPromotesAHealthyCanaryThroughEveryStep(t *testing.T) {
	base, canary := startMetricsHost(t, "m", "v1"), startMetricsHost(t, "m", "v2")
	base.perTick.Store(4)
	canary.perTick.Store(4)
	hook := startWebhook(t)
	dir := t.TempDir()
	stateFile := filepath.Join(t.TempDir(), "state.json")
	writeFile(t, dir, "m.yaml", analysisDoc(base, canary, "200ms", 20, "  webhook: "+hook.url+"\n"))
	c := startCPWith(t, dir, func(cfg *Config) { cfg.StateFile = stateFile })

	waitFor(t, 30*time.Second, "analysis succeeded", func() bool {
		a := modelStatus(t, c, "m").Analysis
		return a != nil && a.Phase == store.PhaseSucceeded
	})
	ms := modelStatus(t, c, "m")
	if ms.Traffic["v2"] != 100 || ms.Traffic["v1"] != 0 {
		t.Fatalf("served split %v, want v2 at its final share 100", ms.Traffic)
	}
	if len(ms.SlotRuns) != 1 || ms.SlotRuns[0].Version != "v2" {
		t.Fatalf("slot runs %v, want all slots on v2", ms.SlotRuns)
	}
	if a := ms.Analysis; a.Step != 3 || a.Share != 100 || !strings.Contains(a.Reason, "every step passed") {
		t.Fatalf("analysis status %+v", a)
	}
	st := storedState(t, stateFile, "m")
	if st.Analysis == nil || st.Analysis.Phase != store.PhaseSucceeded || st.Analysis.Step != 2 || st.Rollback != nil {
		t.Fatalf("stored state %+v", st.Analysis)
	}
	want := []map[string]int{{"v1": 90, "v2": 10}, {"v1": 50, "v2": 50}, {"v1": 0, "v2": 100}}
	if len(st.History) != 3 {
		t.Fatalf("history %v, want %v", st.History, want)
	}
	for i := range want {
		if !sameSplit(st.History[i], want[i]) {
			t.Fatalf("history %v, want %v", st.History, want)
		}
	}
	logs := c.logs.String()
	for _, l := range []string{`"step":1,"share":10,"message":"analysis step"`, `"step":2,"share":50`, `"step":3,"share":100`, `"message":"analysis promoted"`} {
		if !strings.Contains(logs, l) {
			t.Errorf("log lacks %s", l)
		}
	}
	resp, err := http.Get("http://" + c.adminAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, m := range []string{`patchbay_xds_analysis_step{model="m"`, `patchbay_xds_analysis_decisions_total{decision="advance",model="m"`,
		`patchbay_xds_analysis_decisions_total{decision="done",model="m"`, `patchbay_xds_analysis_gate_value{gate="error-rate",model="m"`} {
		if !strings.Contains(string(body), m) {
			t.Errorf("metrics lack %s", m)
		}
	}
	waitFor(t, 10*time.Second, "webhook got the advances and the promotion", func() bool {
		d := hook.decisions()
		return d["advance"] >= 2 && d["done"] >= 1
	})
}

// A canary whose error rate exceeds the gate is rolled back to 100% baseline through the
// rollback path at the step it fails, within its interval, and /status names the gate.
func TestAnalysisRollsBackAFailingCanary(t *testing.T) {
	base, canary := startMetricsHost(t, "m", "v1"), startMetricsHost(t, "m", "v2")
	base.perTick.Store(4)
	canary.perTick.Store(4)
	dir := t.TempDir()
	stateFile := filepath.Join(t.TempDir(), "state.json")
	writeFile(t, dir, "m.yaml", analysisDoc(base, canary, "30s", 20, ""))
	c := startCPWith(t, dir, func(cfg *Config) { cfg.StateFile = stateFile })
	waitFor(t, 10*time.Second, "step 1 started", func() bool {
		a := modelStatus(t, c, "m").Analysis
		return a != nil && !a.StepStarted.IsZero() && a.Decision == "wait"
	})
	canary.errPermille.Store(300) // 30% of the canary's requests fail from now on

	waitFor(t, 20*time.Second, "analysis failed", func() bool {
		a := modelStatus(t, c, "m").Analysis
		return a != nil && a.Phase == store.PhaseFailed
	})
	ms := modelStatus(t, c, "m")
	if ms.Traffic["v1"] != 100 || ms.Traffic["v2"] != 0 {
		t.Fatalf("served split %v, want 100%% baseline", ms.Traffic)
	}
	if ms.Rollback == nil || !strings.HasPrefix(ms.Rollback.Reason, "analysis: error-rate ") {
		t.Fatalf("rollback %+v, want reason naming the error-rate gate", ms.Rollback)
	}
	a := ms.Analysis
	if a.Step != 1 || !strings.Contains(a.Reason, "analysis: error-rate") {
		t.Fatalf("analysis status %+v", a)
	}
	failed := false
	for _, g := range a.Gates {
		if g.Gate == "error-rate" && !g.Pass && g.Value > 0.05 && g.Threshold == 0.05 {
			failed = true
		}
	}
	if !failed {
		t.Fatalf("gates %+v: want error-rate failing above 0.05", a.Gates)
	}
	st := storedState(t, stateFile, "m")
	d := st.Analysis.LastDecision
	if d == nil || d.Decision != "fail" || d.Step != 0 || !d.At.Before(st.Analysis.StepStarted.Add(30*time.Second)) {
		t.Fatalf("stored decision %+v (step started %v): want a fail at step 1 within its 30s interval", d, st.Analysis.StepStarted)
	}
	if st.Rollback == nil || st.Rollback.Traffic["v1"] != 100 {
		t.Fatalf("stored rollback %+v", st.Rollback)
	}
	waitFor(t, 5*time.Second, "the 'analysis rolled back' log line", func() bool {
		return strings.Contains(c.logs.String(), `"message":"analysis rolled back"`)
	})
	// Held: the canary recovers, and still nothing moves until the file changes.
	canary.errPermille.Store(0)
	time.Sleep(300 * time.Millisecond)
	if ms := modelStatus(t, c, "m"); ms.Traffic["v1"] != 100 || ms.Analysis.Phase != store.PhaseFailed {
		t.Fatalf("after the failure: %v %s", ms.Traffic, ms.Analysis.Phase)
	}
}

// Without minRequests in the window the analysis waits at its step, and says why.
func TestAnalysisWaitsForMinRequests(t *testing.T) {
	base, canary := startMetricsHost(t, "m", "v1"), startMetricsHost(t, "m", "v2")
	base.perTick.Store(4) // the canary gets nothing
	dir := t.TempDir()
	writeFile(t, dir, "m.yaml", analysisDoc(base, canary, "200ms", 20, ""))
	c := startCP(t, dir)
	waitFor(t, 10*time.Second, "analysis waiting", func() bool {
		a := modelStatus(t, c, "m").Analysis
		return a != nil && a.Phase == store.PhaseWaiting
	})
	// Several intervals later it is still at step 1, waiting for the canary's requests.
	time.Sleep(600 * time.Millisecond)
	ms := modelStatus(t, c, "m")
	a := ms.Analysis
	if a.Phase != store.PhaseWaiting || a.Step != 1 || a.Decision != "wait" || !strings.Contains(a.DecisionWhy, "minRequests: canary 0, baseline") ||
		!strings.Contains(a.Reason, "minRequests") {
		t.Fatalf("analysis %+v", a)
	}
	if ms.Traffic["v1"] != 90 || ms.Traffic["v2"] != 10 {
		t.Fatalf("served split %v, want step 1's v1 90 / v2 10", ms.Traffic)
	}
	// Requests arrive: it goes on.
	canary.perTick.Store(4)
	waitFor(t, 30*time.Second, "analysis succeeded", func() bool {
		return modelStatus(t, c, "m").Analysis.Phase == store.PhaseSucceeded
	})
}

// startAnalysisAtStep2 starts a control plane with a File store (stateFile) on rollouts in
// dir: an analysis of v2 (canary) against v1 (base), both hosts busy, 1s interval, 20
// minRequests; it returns once the analysis is at step 2 or later.
func startAnalysisAtStep2(t *testing.T) (base, canary *metricsHost, dir, stateFile string, c *cp) {
	t.Helper()
	base, canary = startMetricsHost(t, "m", "v1"), startMetricsHost(t, "m", "v2")
	base.perTick.Store(4)
	canary.perTick.Store(4)
	dir = t.TempDir()
	stateFile = filepath.Join(t.TempDir(), "state.json")
	writeFile(t, dir, "m.yaml", analysisDoc(base, canary, "1s", 20, ""))
	c = startCPWith(t, dir, func(cfg *Config) { cfg.StateFile = stateFile })
	waitFor(t, 20*time.Second, "step 2", func() bool {
		a := modelStatus(t, c, "m").Analysis
		return a != nil && a.Step >= 2
	})
	return base, canary, dir, stateFile, c
}

// A control plane restarted in the middle of an analysis (File store) resumes at the step
// it stored, serving that step's split from its first config.
func TestAnalysisResumesAfterRestart(t *testing.T) {
	base, canary, _, stateFile, c := startAnalysisAtStep2(t)
	base.perTick.Store(0) // no requests: after the restart it can only wait where it was
	canary.perTick.Store(0)
	c.stop()
	st := storedState(t, stateFile, "m")
	if st.Analysis == nil || st.Analysis.Step < 1 {
		t.Fatalf("stored analysis %+v, want step index >= 1", st.Analysis)
	}
	c.start()
	waitFor(t, 10*time.Second, "a config after the restart", func() bool { return c.srv.Version() != "" })
	ms := modelStatus(t, c, "m")
	if a := ms.Analysis; a == nil || a.Step != st.Analysis.Step+1 || !a.StepStarted.Equal(st.Analysis.StepStarted) {
		t.Fatalf("after restart: %+v, want step %d started %v", a, st.Analysis.Step+1, st.Analysis.StepStarted)
	}
	share := []int{10, 50, 100}[st.Analysis.Step]
	if ms.Traffic["v2"] != share {
		t.Fatalf("after restart the split is %v, want the canary at %d", ms.Traffic, share)
	}
	base.perTick.Store(4)
	canary.perTick.Store(4)
	waitFor(t, 30*time.Second, "analysis succeeded after the restart", func() bool {
		return modelStatus(t, c, "m").Analysis.Phase == store.PhaseSucceeded
	})
}

// Editing the model's rollout restarts its analysis at step 0.
func TestAnalysisRestartsAtStepZeroOnSpecChange(t *testing.T) {
	base, canary, dir, stateFile, _ := startAnalysisAtStep2(t)
	before := storedState(t, stateFile, "m").Analysis
	writeFile(t, dir, "m.yaml", strings.Replace(analysisDoc(base, canary, "1s", 20, ""), "max: 0.05", "max: 0.06", 1))
	waitFor(t, 10*time.Second, "a new analysis of the new spec", func() bool {
		a := storedState(t, stateFile, "m").Analysis
		return a != nil && a.SpecFingerprint != before.SpecFingerprint
	})
	after := storedState(t, stateFile, "m")
	if after.Analysis.Step != 0 {
		t.Fatalf("new spec's analysis at step index %d, want 0", after.Analysis.Step)
	}
	if n := len(after.History); n == 0 || after.History[n-1]["v2"] != 10 {
		t.Fatalf("history %v: want the new spec's split at step 1 (v2 10) last", after.History)
	}
}

// The canary takes a step only with the ready endpoints its next share needs: the prober's
// healthy endpoints of the canary >= ceil(share/100 × the baseline's). With one of its two
// endpoints failing its ready probe, it waits before 100% and says why; once that endpoint
// is ready it goes on. A webhook that never answers does not hold the loop up.
func TestAnalysisWaitsForCapacity(t *testing.T) {
	b1, b2 := startMetricsHost(t, "m", "v1"), startMetricsHost(t, "m", "v1")
	c1, c2 := startMetricsHost(t, "m", "v2"), startMetricsHost(t, "m", "v2")
	for _, h := range []*metricsHost{b1, b2, c1} {
		h.perTick.Store(3)
	}
	c2.notReady.Store(true)
	stuck := make(chan struct{})
	hookLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hookSrv := &http.Server{Handler: http.HandlerFunc(func(http.ResponseWriter, *http.Request) { <-stuck })}
	go hookSrv.Serve(hookLis)
	t.Cleanup(func() { close(stuck); hookSrv.Close() })
	doc := fmt.Sprintf(`apiVersion: patchbay.io/v1
kind: Rollout
model: m
versions:
  - {name: v1, endpoints: [%q, %q], metricsEndpoints: [%q, %q]}
  - {name: v2, endpoints: [%q, %q], metricsEndpoints: [%q, %q]}
traffic: {v1: 100}
analysis:
  baseline: v1
  canary: v2
  steps: [10, 50, 100]
  interval: 200ms
  minRequests: 20
  webhook: http://%s/hook
  gates:
    - {metric: error-rate, max: 0.05}
`, b1.addr, b2.addr, b1.addr, b2.addr, c1.addr, c2.addr, c1.addr, c2.addr, hookLis.Addr())
	dir := t.TempDir()
	writeFile(t, dir, "m.yaml", doc)
	c := startCPWith(t, dir, func(cfg *Config) { cfg.VersionHealth = 50 * time.Millisecond })
	want := "capacity: 100% needs 2 ready http endpoints of the canary (2 of the baseline), it has 1"
	waitFor(t, 30*time.Second, "the analysis waiting for capacity", func() bool {
		a := modelStatus(t, c, "m").Analysis
		return a != nil && a.Phase == store.PhaseWaiting && strings.Contains(a.Reason, want)
	})
	if ms := modelStatus(t, c, "m"); ms.Analysis.Step != 2 || ms.Traffic["v2"] != 50 {
		t.Fatalf("waiting at %+v, split %v: want step 2 (50%%)", ms.Analysis, ms.Traffic)
	}
	c2.notReady.Store(false)
	waitFor(t, 30*time.Second, "analysis succeeded once the canary has the capacity", func() bool {
		return modelStatus(t, c, "m").Analysis.Phase == store.PhaseSucceeded
	})
}

// Versions served over TLS are scraped over TLS with the control plane's client
// certificate (--tls-cert/--tls-key) checked against --upstream-tls-ca, from hosts that
// require and verify it; the analysis reads them and promotes the canary.
func TestAnalysisScrapesVersionsOverTLS(t *testing.T) {
	pki := t.TempDir()
	ca, err := tlsfiles.NewCA("test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	hostFiles, err := ca.WriteLeaf(pki, "host", tlsfiles.Leaf{Name: "host", Hosts: []string{"127.0.0.1"}, URI: "spiffe://patchbay.local/role/modelhost"})
	if err != nil {
		t.Fatal(err)
	}
	cpFiles, err := ca.WriteLeaf(pki, "xds", tlsfiles.Leaf{Name: "xds", Hosts: []string{"127.0.0.1"}})
	if err != nil {
		t.Fatal(err)
	}
	src, err := tlsfiles.Load(hostFiles, tlsfiles.Options{})
	if err != nil {
		t.Fatal(err)
	}
	base := startMetricsHostTLS(t, "m", "v1", src.ServerConfig("http/1.1"))
	canary := startMetricsHostTLS(t, "m", "v2", src.ServerConfig("http/1.1"))
	base.perTick.Store(4)
	canary.perTick.Store(4)
	doc := strings.ReplaceAll(analysisDoc(base, canary, "100ms", 20, ""), "metricsEndpoints:", "tls: true, metricsEndpoints:")
	doc = strings.Replace(doc, "steps: [10, 50, 100]", "steps: [100]", 1)
	dir := t.TempDir()
	writeFile(t, dir, "m.yaml", doc)
	var srv *Server
	c := startCPWith(t, dir, func(cfg *Config) {
		cfg.TLS = tlsfiles.Files{Cert: cpFiles.Cert, Key: cpFiles.Key}
		cfg.Translate.UpstreamTLS = translate.TLSFiles{CA: cpFiles.CA, Cert: cpFiles.Cert, Key: cpFiles.Key}
	})
	srv = c.srv
	waitFor(t, 30*time.Second, "analysis over TLS succeeded", func() bool {
		for _, m := range srv.Status().Models {
			if m.Analysis != nil && m.Analysis.Phase == store.PhaseSucceeded {
				return true
			}
		}
		return false
	})
}
