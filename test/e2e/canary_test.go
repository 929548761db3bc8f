package e2e

import (
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/patchbay-io/patchbay/test/harness"
)

// Canary analysis and shadow comparison (issue 14) with every real process: the model
// hosts (their admin /metrics scraped by the control plane's embedded provider, their
// prediction records streamed to its ADS port), the control plane running the analysis,
// ext_proc, and the Envoy model in Envoy's place. Every wait is bounded; every address
// is loopback.

// canaryRepo writes a model repository holding model/version with the given model.yaml
// and artifact (name → content); an artifact given as "@examples/…" is copied from the
// repository's examples.
func canaryRepo(t testing.TB, model, version, modelYAML string, artifacts map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	vdir := filepath.Join(dir, model, version)
	if err := os.MkdirAll(vdir, 0o755); err != nil {
		t.Fatal(err)
	}
	files := map[string]string{"model.yaml": modelYAML}
	for name, content := range artifacts {
		if src, ok := strings.CutPrefix(content, "@"); ok {
			root, err := harness.RepoRoot()
			if err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(filepath.Join(root, src))
			if err != nil {
				t.Fatal(err)
			}
			content = string(b)
		}
		files[name] = content
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(vdir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// canaryHost is a model host whose admin listener (its /metrics) the rollout names in
// metricsEndpoints.
type canaryHost struct {
	*host
	admin string
}

func startCanaryHost(t testing.TB, name, repo string, extra ...string) *canaryHost {
	t.Helper()
	h := &canaryHost{host: &host{http: freeAddr(t), grpc: freeAddr(t)}, admin: freeAddr(t)}
	args := append([]string{"modelhost", "--repository", repo, "--http", h.http, "--grpc", h.grpc, "--admin", h.admin, "--log-level", "warn"}, extra...)
	h.proc = startProc(t, name, "http://"+h.http+"/v2/health/ready", args...)
	return h
}

// rankerYAML is ranker v7's model.yaml (the same XGBoost artifact) with a given input
// shape and few output buckets: with a few hundred requests per version and step, PSI's
// sampling noise grows with the bucket count (≈ (buckets−1)·(1/n₁+1/n₂)), so four
// buckets keep two samples of one distribution far below the drift threshold.
func rankerYAML(shape string, batching bool) string {
	y := fmt.Sprintf(`runtime: xgboost
artifact: model.json
inputs:  [{name: features, datatype: FP32, shape: %s}]
outputs: [{name: score, datatype: FP32, shape: [%s], buckets: [0.25, 0.5, 0.75]}]
`, shape, strings.TrimSuffix(strings.TrimPrefix(strings.Split(shape, ",")[0], "["), " "))
	if batching {
		y += "batching: {max_batch_size: 64, max_delay: 500us}\n"
	}
	return y
}

// canaryRollout is a rollout of model with baseline and canary versions (REST endpoints
// and metrics endpoints) and an analysis section.
func canaryRollout(model string, base, can *canaryHost, baseV, canV, analysis string) string {
	return fmt.Sprintf(`apiVersion: patchbay.io/v1
kind: Rollout
model: %s
versions:
  - {name: %s, endpoints: [%q], metricsEndpoints: [%q]}
  - {name: %s, endpoints: [%q], metricsEndpoints: [%q]}
traffic: {%s: 100, %s: 0}
retries: 0
analysis:
%s`, model, baseV, base.http, base.admin, canV, can.http, can.admin, baseV, canV, analysis)
}

// startCanaryChain writes the rollout and starts the routing (control plane with a state
// file, ext_proc, the Envoy model) on it.
func startCanaryChain(t testing.TB, rolloutDoc string) *chain {
	t.Helper()
	c := &chain{t: t, dir: t.TempDir()}
	writeRollout(t, c.dir, "model.yaml", rolloutDoc)
	c.startRouting(t)
	return c
}

// statusDoc is the part of the control plane's /status these tests read.
type statusDoc struct {
	Models []struct {
		Name     string         `json:"name"`
		Traffic  map[string]int `json:"traffic"`
		Rollback *struct {
			Reason string    `json:"reason"`
			At     time.Time `json:"at"`
		} `json:"rollback"`
		Analysis *struct {
			Phase       string             `json:"phase"`
			Step        int                `json:"step"`
			Steps       []int              `json:"steps"`
			Share       int                `json:"share"`
			StepStarted time.Time          `json:"step_started"`
			Reason      string             `json:"reason"`
			Decision    string             `json:"decision"`
			DecisionWhy string             `json:"decision_reason"`
			EvaluatedAt time.Time          `json:"evaluated_at"`
			Requests    map[string]float64 `json:"requests"`
			Gates       []struct {
				Gate      string  `json:"gate"`
				Value     float64 `json:"value"`
				Threshold float64 `json:"threshold"`
				Pass      bool    `json:"pass"`
				NoData    string  `json:"no_data"`
				Skipped   string  `json:"skipped"`
			} `json:"gates"`
		} `json:"analysis"`
	} `json:"models"`
	Shadow *struct {
		Records struct {
			Received uint64 `json:"received"`
			Pairs    uint64 `json:"pairs"`
		} `json:"records"`
		Outputs []struct {
			Model          string  `json:"model"`
			Version        string  `json:"version"`
			Output         string  `json:"output"`
			Pairs          uint64  `json:"pairs"`
			ValuesCompared uint64  `json:"valuesCompared"`
			MeanAbsDiff    float64 `json:"meanAbsDiff"`
			MaxAbsDiff     float64 `json:"maxAbsDiff"`
		} `json:"outputs"`
	} `json:"shadow"`
	raw string
}

func (c *chain) status() (statusDoc, error) {
	var st statusDoc
	resp, err := http.Get("http://" + c.xdsAdmin + "/status")
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	dec := json.NewDecoder(resp.Body)
	var raw json.RawMessage
	if err := dec.Decode(&raw); err != nil {
		return st, err
	}
	st.raw = string(raw)
	return st, json.Unmarshal(raw, &st)
}

// waitStatus polls /status every 100ms until ok holds for it or d passes, and returns it;
// on timeout the last status is in the failure.
func (c *chain) waitStatus(t testing.TB, d time.Duration, what string, ok func(statusDoc) bool) statusDoc {
	t.Helper()
	deadline := time.Now().Add(d)
	var last statusDoc
	for {
		st, err := c.status()
		if err == nil {
			last = st
			if ok(st) {
				return st
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s; last /status: %s", d, what, last.raw)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// load sends requests for model through the edge from a few goroutines, each request for
// one of users x-user-ids with random features (dim of them, in [0, 1)), until stopped.
// With batch2 set, every third request carries two rows.
type load struct {
	stop     chan struct{}
	wg       sync.WaitGroup
	once     sync.Once
	batch2   atomic.Bool
	total    atomic.Int64
	failed   atomic.Int64
	mu       sync.Mutex
	versions map[string]int
}

func startLoad(t testing.TB, c *chain, model string, dim, workers, users int) *load {
	l := &load{stop: make(chan struct{}), versions: map[string]int{}}
	for w := 0; w < workers; w++ {
		l.wg.Add(1)
		go func(w int) {
			defer l.wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 14))
			for i := 0; i < 200000; i++ {
				select {
				case <-l.stop:
					return
				default:
				}
				rows := 1
				if l.batch2.Load() && i%3 == 0 {
					rows = 2
				}
				r, err := c.infer("/v2/models/"+model+"/infer", map[string]string{"x-user-id": fmt.Sprintf("u-%d-%d", w, rng.IntN(users))},
					featuresJSON(rng, rows, dim))
				l.total.Add(1)
				if err != nil || r.status != 200 {
					l.failed.Add(1)
					continue
				}
				l.mu.Lock()
				l.versions[r.version]++
				l.mu.Unlock()
			}
		}(w)
	}
	t.Cleanup(l.halt)
	return l
}

func (l *load) halt() {
	l.once.Do(func() { close(l.stop) })
	l.wg.Wait()
}

func featuresJSON(rng *rand.Rand, rows, dim int) string {
	vals := make([]string, rows*dim)
	for i := range vals {
		vals[i] = fmt.Sprintf("%.4f", rng.Float64())
	}
	return fmt.Sprintf(`{"inputs":[{"name":"features","datatype":"FP32","shape":[%d,%d],"data":[%s]}]}`, rows, dim, strings.Join(vals, ","))
}

// TestCanaryHealthyPromoted: baseline and canary serve the same artifact; the analysis
// takes every step and ends succeeded with the canary at its final share, which the edge
// then serves. The last step is 100%: the baseline gets no traffic there, so the canary
// alone must reach minRequests and the gates that compare with the baseline are skipped
// (this step once waited forever on the baseline's minRequests). minRequests is 100: PSI's
// sampling noise with 4 buckets is ≈ 3·(1/n₁+1/n₂), so at 20 requests per version two
// samples of one distribution crossed the 0.5 threshold now and then on a loaded machine.
func TestCanaryHealthyPromoted(t *testing.T) {
	start := time.Now()
	base := startCanaryHost(t, "host-v7", canaryRepo(t, "ranker", "v7", rankerYAML("[-1, 8]", true), map[string]string{"model.json": "@examples/models/ranker/v7/model.json"}))
	can := startCanaryHost(t, "host-v8", canaryRepo(t, "ranker", "v8", rankerYAML("[-1, 8]", true), map[string]string{"model.json": "@examples/models/ranker/v7/model.json"}))
	steps := []int{20, 50, 100}
	c := startCanaryChain(t, canaryRollout("ranker", base, can, "v7", "v8", `  baseline: v7
  canary: v8
  steps: [20, 50, 100]
  interval: 1s
  minRequests: 100
  gates:
    - {metric: error-rate, max: 0.01}
    - {metric: latency, percentile: 90, maxRatio: 20}
    - {metric: drift, output: score, maxPSI: 0.5}
`))
	l := startLoad(t, c, "ranker", 8, 4, 300)
	seen := map[int]bool{}
	st := c.waitStatus(t, 45*time.Second, "the analysis to succeed", func(st statusDoc) bool {
		a := st.Models[0].Analysis
		if a == nil {
			return false
		}
		seen[a.Share] = true
		if a.Phase == "failed" {
			t.Fatalf("a healthy canary failed: %s", st.raw)
		}
		return a.Phase == "succeeded"
	})
	l.halt()
	m := st.Models[0]
	a := m.Analysis
	if a.Share != 100 || a.Step != len(steps) || a.Decision != "done" {
		t.Fatalf("succeeded at step %d share %d (decision %q), want step %d share 100, done: %s", a.Step, a.Share, a.Decision, len(steps), st.raw)
	}
	var skipped []string
	for _, g := range a.Gates {
		if !g.Pass || g.NoData != "" {
			t.Fatalf("gate %s: %+v in the last step of a promoted canary: %s", g.Gate, g, st.raw)
		}
		if g.Skipped != "" {
			skipped = append(skipped, g.Gate)
		}
	}
	if strings.Join(skipped, ",") != "latency-p90-ratio,drift-score" {
		t.Fatalf("skipped at the 100%% step: %v, want the two gates that compare with the baseline: %s", skipped, st.raw)
	}
	if len(a.Gates) != 3 {
		t.Fatalf("gates %+v, want error-rate, latency and drift", a.Gates)
	}
	if m.Rollback != nil || m.Traffic["v8"] != 100 || m.Traffic["v7"] != 0 {
		t.Fatalf("served split %v rollback %+v after success, want v8 100: %s", m.Traffic, m.Rollback, st.raw)
	}
	if l.failed.Load() != 0 {
		t.Fatalf("%d of %d requests failed during a healthy canary", l.failed.Load(), l.total.Load())
	}
	// The edge serves the final split: every new user on the canary.
	v8 := 0
	const users = 300
	for i := 0; i < users; i++ {
		if c.mustUser(t, fmt.Sprintf("after-%d", i)).version == "v8" {
			v8++
		}
	}
	if v8 != users {
		t.Fatalf("%d of %d new users on v8 after promotion to 100%%, want all", v8, users)
	}
	t.Logf("promoted through %v in %v (%d requests, by version %v; shares seen on /status %v); last decision %s %q, requests %v",
		steps, time.Since(start).Round(time.Millisecond), l.total.Load(), l.versions, seen, a.Decision, a.DecisionWhy, a.Requests)
}

// metricValue reads one host's counter from its admin /metrics.
func (h *canaryHost) metric(t testing.TB, name string, filters ...string) float64 {
	return harness.MetricSum(t, "http://"+h.admin+"/metrics", name, filters...)
}

// TestCanaryErrorsRolledBack: the canary's host accepts only single-row requests (its
// model.yaml says [1, 8]) where the baseline's takes [-1, 8]. Once the analysis has
// advanced, the clients start sending some two-row requests: the canary's host refuses
// them (counted in its errors counter), the baseline's serves them, and the error-rate
// gate rolls the model back to 100% baseline within one interval (plus one evaluation
// period) of the first failure.
func TestCanaryErrorsRolledBack(t *testing.T) {
	const interval = 2 * time.Second
	base := startCanaryHost(t, "host-v7", canaryRepo(t, "ranker", "v7", rankerYAML("[-1, 8]", true), map[string]string{"model.json": "@examples/models/ranker/v7/model.json"}))
	can := startCanaryHost(t, "host-v8", canaryRepo(t, "ranker", "v8", rankerYAML("[1, 8]", false), map[string]string{"model.json": "@examples/models/ranker/v7/model.json"}))
	c := startCanaryChain(t, canaryRollout("ranker", base, can, "v7", "v8", fmt.Sprintf(`  baseline: v7
  canary: v8
  steps: [20, 50, 90]
  interval: %v
  minRequests: 20
  gates:
    - {metric: error-rate, max: 0.05}
    - {metric: latency, percentile: 90, maxRatio: 20}
    - {metric: drift, output: score, maxPSI: 0.5}
`, interval)))
	l := startLoad(t, c, "ranker", 8, 4, 300)
	c.waitStatus(t, 30*time.Second, "the analysis to advance to step 2", func(st statusDoc) bool {
		a := st.Models[0].Analysis
		if a != nil && a.Phase != "running" && a.Phase != "waiting" && a.Phase != "pending" {
			t.Fatalf("analysis ended before the failures started: %s", st.raw)
		}
		return a != nil && a.Step >= 2
	})
	if n := l.failed.Load(); n != 0 {
		t.Fatalf("%d requests failed before the two-row requests started", n)
	}
	failStart := time.Now()
	l.batch2.Store(true)
	st := c.waitStatus(t, 20*time.Second, "the analysis to fail", func(st statusDoc) bool {
		a := st.Models[0].Analysis
		return a != nil && a.Phase == "failed"
	})
	l.halt()
	m, a := st.Models[0], st.Models[0].Analysis
	if !strings.Contains(a.Reason, "error-rate") {
		t.Fatalf("rolled back for %q, want the error-rate gate: %s", a.Reason, st.raw)
	}
	if m.Traffic["v7"] != 100 || m.Traffic["v8"] != 0 {
		t.Fatalf("split %v after the rollback, want v7 100: %s", m.Traffic, st.raw)
	}
	if m.Rollback == nil || !strings.Contains(m.Rollback.Reason, "error-rate") {
		t.Fatalf("rollback %+v, want one in force naming the error-rate gate: %s", m.Rollback, st.raw)
	}
	// The decision: after the failures started, within one interval and one evaluation
	// period (interval/4) of them.
	took := a.EvaluatedAt.Sub(failStart)
	if a.Decision != "fail" || took <= 0 || took > interval+interval/4 {
		t.Fatalf("decision %q at %v, %v after the first two-row request; want fail within %v: %s",
			a.Decision, a.EvaluatedAt, took, interval+interval/4, st.raw)
	}
	// The canary's host counted the refusals; the baseline's served every request.
	if n := can.metric(t, "patchbay_modelhost_request_errors_total", `version="v8"`); n == 0 {
		t.Fatal("the canary's host counted no errors")
	}
	if n := base.metric(t, "patchbay_modelhost_request_errors_total", `version="v7"`); n != 0 {
		t.Fatalf("the baseline's host counted %v errors", n)
	}
	// The edge serves the baseline only.
	waitFor(t, 10*time.Second, "the edge to serve v7 only", func() bool {
		for i := 0; i < 20; i++ {
			if r, err := c.user(fmt.Sprintf("after-%d", i)); err != nil || r.status != 200 || r.version != "v7" {
				return false
			}
		}
		return true
	})
	t.Logf("rolled back %v after the first failing request (bound %v): %s; %d of %d requests failed",
		took.Round(time.Millisecond), interval+interval/4, a.Reason, l.failed.Load(), l.total.Load())
}

// TestCanaryDriftStopped: the canary is churn v1's logistic model with another bias, so
// every request succeeds about as fast as the baseline's, but its probabilities move to
// the top bucket: the drift gate stops it.
func TestCanaryDriftStopped(t *testing.T) {
	const churnYAML = `runtime: linear
artifact: linear.json
inputs:  [{name: features, datatype: FP32, shape: [-1, 4]}]
outputs: [{name: probability, datatype: FP32, shape: [-1], buckets: [0.2, 0.4, 0.6, 0.8]}]
`
	base := startCanaryHost(t, "host-v1", canaryRepo(t, "churn", "v1", churnYAML, map[string]string{"linear.json": `{"link":"logistic","weights":[0.8,-0.5,0.3,1.2],"bias":-0.2}`}))
	can := startCanaryHost(t, "host-v2", canaryRepo(t, "churn", "v2", churnYAML, map[string]string{"linear.json": `{"link":"logistic","weights":[0.8,-0.5,0.3,1.2],"bias":3.0}`}))
	c := startCanaryChain(t, canaryRollout("churn", base, can, "v1", "v2", `  baseline: v1
  canary: v2
  steps: [20, 50, 90]
  interval: 1s
  minRequests: 30
  gates:
    - {metric: error-rate, max: 0.01}
    - {metric: latency, percentile: 90, maxRatio: 20}
    - {metric: drift, output: probability, maxPSI: 0.25}
`))
	l := startLoad(t, c, "churn", 4, 4, 300)
	st := c.waitStatus(t, 30*time.Second, "the analysis to fail", func(st statusDoc) bool {
		a := st.Models[0].Analysis
		if a != nil && a.Phase == "succeeded" {
			t.Fatalf("a drifting canary was promoted: %s", st.raw)
		}
		return a != nil && a.Phase == "failed"
	})
	l.halt()
	m, a := st.Models[0], st.Models[0].Analysis
	if !strings.HasPrefix(a.Reason, "analysis: drift-probability") {
		t.Fatalf("stopped for %q, want the drift gate: %s", a.Reason, st.raw)
	}
	gates := map[string]bool{}
	for _, g := range a.Gates {
		if g.NoData != "" {
			t.Fatalf("gate %s without data in the failing decision: %s", g.Gate, st.raw)
		}
		gates[g.Gate] = g.Pass
	}
	if pass, ok := gates["drift-probability"]; !ok || pass || !gates["error-rate"] || !gates["latency-p90-ratio"] {
		t.Fatalf("gates %v: want error-rate and latency passed, drift failed: %s", gates, st.raw)
	}
	if m.Traffic["v1"] != 100 || m.Traffic["v2"] != 0 {
		t.Fatalf("split %v after the drift gate failed, want v1 100: %s", m.Traffic, st.raw)
	}
	if n := l.failed.Load(); n != 0 {
		t.Fatalf("%d of %d requests failed: the canary should fail on drift alone", n, l.total.Load())
	}
	if n := can.metric(t, "patchbay_modelhost_request_errors_total"); n != 0 {
		t.Fatalf("the canary's host counted %v errors", n)
	}
	t.Logf("stopped by %q at step %d (%d requests, by version %v)", a.Reason, a.Step, l.total.Load(), l.versions)
}

// directScore asks a host for model's score of one row, without x-request-id (so the
// host sends no prediction record for it).
func directScore(t testing.TB, hostHTTP, model string, row []float64) float64 {
	t.Helper()
	vals := make([]string, len(row))
	for i, v := range row {
		vals[i] = fmt.Sprintf("%.4f", v)
	}
	body := fmt.Sprintf(`{"inputs":[{"name":"features","datatype":"FP32","shape":[1,%d],"data":[%s]}]}`, len(row), strings.Join(vals, ","))
	resp, err := client.Post("http://"+hostHTTP+"/v2/models/"+model+"/infer", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		Outputs []struct {
			Data []float64 `json:"data"`
		} `json:"outputs"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || resp.StatusCode != 200 || len(out.Outputs) != 1 || len(out.Outputs[0].Data) != 1 {
		t.Fatalf("direct infer at %s: %d %v %+v", hostHTTP, resp.StatusCode, err, out)
	}
	return out.Outputs[0].Data[0]
}

// TestCanaryShadowDisagreement: ranker v7 serves, v8 (another XGBoost fixture) is
// shadowed at 100%, both hosts stream prediction records (--shadow-sample 0.5, chosen by
// a hash of x-request-id) to the control plane. After n requests with distinct ids and
// known inputs, /status's shadow comparison must report the mean absolute score
// difference that the two hosts themselves give for those inputs (asked directly), within
// sampling error: the m compared requests are a hash-chosen subset of the n, so their
// mean differs from the n's mean by a finite-population standard error
// sd·sqrt((n−m)/(m·(n−1))); the test allows 4 of them (+1e-6 for float32 scores). The
// count m must be n/2 within 4 binomial sds.
func TestCanaryShadowDisagreement(t *testing.T) {
	const n = 400
	a := &canaryHost{host: &host{http: freeAddr(t), grpc: freeAddr(t)}, admin: freeAddr(t)}
	b := &canaryHost{host: &host{http: freeAddr(t), grpc: freeAddr(t)}, admin: freeAddr(t)}
	c := &chain{t: t, dir: t.TempDir()}
	writeRollout(t, c.dir, "ranker.yaml", rankerRollout(a.http, b.http, "{v7: 100, v8: 0}", "shadow: [{version: v8, percent: 100}]\n"))
	c.startRouting(t)
	for _, h := range []struct {
		h    *canaryHost
		name string
	}{{a, "v7"}, {b, "v8"}} {
		h.h.proc = startProc(t, "host-"+h.name, "http://"+h.h.http+"/v2/health/ready", "modelhost", "--repository", repoWith(t, "ranker/"+h.name),
			"--http", h.h.http, "--grpc", h.h.grpc, "--admin", h.h.admin, "--log-level", "warn",
			"--shadow-records", c.xdsAddr, "--shadow-sample", "0.5")
	}
	waitFor(t, 10*time.Second, "the edge to reach v7", func() bool {
		r, err := c.user("warmup")
		return err == nil && r.status == 200
	})
	rng := rand.New(rand.NewPCG(8, 7))
	rows := make([][]float64, n)
	for i := range rows {
		rows[i] = make([]float64, 8)
		vals := make([]string, 8)
		for j := range rows[i] {
			rows[i][j] = math.Round(rng.Float64()*1e4) / 1e4 // what "%.4f" sends
			vals[j] = fmt.Sprintf("%.4f", rows[i][j])
		}
		body := fmt.Sprintf(`{"inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":[%s]}]}`, strings.Join(vals, ","))
		r, err := c.infer("/v2/models/ranker/infer", map[string]string{"x-user-id": fmt.Sprintf("sh-%d", i), "x-request-id": fmt.Sprintf("shadow-req-%d", i)}, body)
		if err != nil || r.status != 200 || r.version != "v7" {
			t.Fatalf("request %d: %+v %v (want v7 answering: shadow responses never reach clients)", i, r, err)
		}
	}
	// Ground truth from the hosts themselves.
	diffs := make([]float64, n)
	var sum, maxDiff float64
	for i, row := range rows {
		diffs[i] = math.Abs(directScore(t, a.http, "ranker", row) - directScore(t, b.http, "ranker", row))
		sum += diffs[i]
		maxDiff = max(maxDiff, diffs[i])
	}
	mean := sum / n
	var ss float64
	for _, d := range diffs {
		ss += (d - mean) * (d - mean)
	}
	sd := math.Sqrt(ss / (n - 1))
	// Records arrive asynchronously (mirrors are fire-and-forget): wait until the counts
	// stop moving.
	var prevPairs, prevReceived uint64
	st := c.waitStatus(t, 20*time.Second, "the shadow comparison to settle", func(st statusDoc) bool {
		if st.Shadow == nil {
			return false
		}
		settled := st.Shadow.Records.Pairs > 0 && st.Shadow.Records.Pairs == prevPairs && st.Shadow.Records.Received == prevReceived
		prevPairs, prevReceived = st.Shadow.Records.Pairs, st.Shadow.Records.Received
		if !settled {
			time.Sleep(300 * time.Millisecond)
		}
		return settled
	})
	var got *struct {
		Model          string  `json:"model"`
		Version        string  `json:"version"`
		Output         string  `json:"output"`
		Pairs          uint64  `json:"pairs"`
		ValuesCompared uint64  `json:"valuesCompared"`
		MeanAbsDiff    float64 `json:"meanAbsDiff"`
		MaxAbsDiff     float64 `json:"maxAbsDiff"`
	}
	for i, o := range st.Shadow.Outputs {
		if o.Model == "ranker" && o.Version == "v8" && o.Output == "score" {
			got = &st.Shadow.Outputs[i]
		}
	}
	if got == nil {
		t.Fatalf("no ranker/v8/score comparison: %s", st.raw)
	}
	m := float64(got.ValuesCompared)
	if got.Pairs != got.ValuesCompared || math.Abs(m-n/2) > 4*math.Sqrt(n*0.25) {
		t.Fatalf("%d pairs, %d values compared of %d requests at --shadow-sample 0.5: want n/2 ± %.0f: %s", got.Pairs, got.ValuesCompared, n, 4*math.Sqrt(n*0.25), st.raw)
	}
	bound := 4*sd*math.Sqrt((n-m)/(m*(n-1))) + 1e-6
	if math.Abs(got.MeanAbsDiff-mean) > bound || got.MaxAbsDiff > maxDiff+1e-6 {
		t.Fatalf("shadow meanAbsDiff %.5f (max %.5f) over %v pairs, hosts' own %.5f (max %.5f) over %d inputs; allowed ±%.5f: %s",
			got.MeanAbsDiff, got.MaxAbsDiff, m, mean, maxDiff, n, bound, st.raw)
	}
	t.Logf("shadow meanAbsDiff %.5f over %v pairs; hosts' own %.5f (sd %.5f) over %d inputs; bound ±%.5f; records %+v",
		got.MeanAbsDiff, m, mean, sd, n, bound, st.Shadow.Records)
}

// TestCanaryResumesAfterControlPlaneRestart: the control plane is killed (SIGKILL) in the
// middle of a step after the analysis advanced at least once, and restarted on the same
// ports and --state-file: the analysis goes on from the stored step and its start (not
// step 1) and finishes.
func TestCanaryResumesAfterControlPlaneRestart(t *testing.T) {
	const interval = 2 * time.Second
	base := startCanaryHost(t, "host-v7", canaryRepo(t, "ranker", "v7", rankerYAML("[-1, 8]", true), map[string]string{"model.json": "@examples/models/ranker/v7/model.json"}))
	can := startCanaryHost(t, "host-v8", canaryRepo(t, "ranker", "v8", rankerYAML("[-1, 8]", true), map[string]string{"model.json": "@examples/models/ranker/v7/model.json"}))
	c := startCanaryChain(t, canaryRollout("ranker", base, can, "v7", "v8", fmt.Sprintf(`  baseline: v7
  canary: v8
  steps: [20, 40, 60, 90]
  interval: %v
  minRequests: 20
  gates:
    - {metric: error-rate, max: 0.01}
    - {metric: latency, percentile: 90, maxRatio: 20}
    - {metric: drift, output: score, maxPSI: 0.5}
`, interval)))
	l := startLoad(t, c, "ranker", 8, 4, 300)
	before := c.waitStatus(t, 30*time.Second, "the analysis to advance", func(st statusDoc) bool {
		a := st.Models[0].Analysis
		return a != nil && a.Step >= 2 && a.Phase == "running"
	}).Models[0].Analysis
	c.xds.kill()
	killed := time.Now()
	c.xds.start()
	after, err := c.status()
	if err != nil {
		t.Fatal(err)
	}
	a := after.Models[0].Analysis
	if a == nil || a.Step < before.Step || (a.Step == before.Step && !a.StepStarted.Equal(before.StepStarted)) {
		t.Fatalf("before the kill: step %d started %v; after the restart: %s", before.Step, before.StepStarted, after.raw)
	}
	st := c.waitStatus(t, 40*time.Second, "the analysis to finish after the restart", func(st statusDoc) bool {
		a := st.Models[0].Analysis
		if a != nil && a.Phase == "failed" {
			t.Fatalf("the analysis failed after the restart: %s", st.raw)
		}
		return a != nil && a.Phase == "succeeded"
	})
	l.halt()
	m := st.Models[0]
	if m.Analysis.Step != 4 || m.Analysis.Share != 90 || m.Traffic["v8"] != 90 || m.Traffic["v7"] != 10 {
		t.Fatalf("after the restart: %s", st.raw)
	}
	if n := l.failed.Load(); n != 0 {
		t.Fatalf("%d of %d requests failed", n, l.total.Load())
	}
	t.Logf("killed at step %d (started %v), resumed at step %d (started %v), succeeded %v after the kill; %d requests, by version %v",
		before.Step, before.StepStarted.Format(time.StampMilli), a.Step, a.StepStarted.Format(time.StampMilli),
		time.Since(killed).Round(time.Millisecond), l.total.Load(), l.versions)
}
