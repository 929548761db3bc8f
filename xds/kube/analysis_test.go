package kube

import (
	"encoding/json"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	v1 "github.com/patchbay-io/patchbay/api/k8s/v1"
	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/store"
)

// The ranker canary with every analysis field, as a kubectl manifest and as a rollout file.
const (
	canaryManifest = `
apiVersion: patchbay.io/v1
kind: Rollout
metadata:
  name: ranker
  namespace: ml
spec:
  versions:
    - name: v7
      endpoints: ["127.0.0.1:9001"]
      metricsEndpoints: ["127.0.0.1:9101"]
    - name: v8
      endpoints: ["127.0.0.1:9002"]
      metricsEndpoints: ["127.0.0.1:9102", "127.0.0.1:9103"]
  traffic: {v7: 100}
  shadow: [{version: v8, percent: 10}]
  analysis:
    baseline: v7
    canary: v8
    steps: [1, 5, 20, 50, 100]
    interval: 45s
    minRequests: 200
    webhook: http://127.0.0.1:8080/hook
    gates:
      - {metric: error-rate, max: 0.01, maxIncrease: 0.005}
      - {metric: latency, percentile: 99.5, max: 250ms, maxRatio: 1.5}
      - {metric: drift, output: score, maxPSI: 0.2}
      - {metric: shadow-agreement, output: label, min: 0.99, maxMeanAbsDiff: 0.05}
`
	canaryFile = `
apiVersion: patchbay.io/v1
kind: Rollout
model: ranker
versions:
  - name: v7
    endpoints: ["127.0.0.1:9001"]
    metricsEndpoints: ["127.0.0.1:9101"]
  - name: v8
    endpoints: ["127.0.0.1:9002"]
    metricsEndpoints: ["127.0.0.1:9102", "127.0.0.1:9103"]
traffic: {v7: 100}
shadow: [{version: v8, percent: 10}]
analysis:
  baseline: v7
  canary: v8
  steps: [1, 5, 20, 50, 100]
  interval: 45s
  minRequests: 200
  webhook: http://127.0.0.1:8080/hook
  gates:
    - {metric: error-rate, max: 0.01, maxIncrease: 0.005}
    - {metric: latency, percentile: 99.5, max: 250ms, maxRatio: 1.5}
    - {metric: drift, output: score, maxPSI: 0.2}
    - {metric: shadow-agreement, output: label, min: 0.99, maxMeanAbsDiff: 0.05}
`
)

// loadBoth renders the manifest and loads it, and loads the file, failing on either error.
func loadBoth(t *testing.T, manifest, file string) (fromObject, fromFile *rollout.Rollout) {
	t.Helper()
	obj := object(t, manifest)
	data, err := Render(obj)
	if err != nil {
		t.Fatal(err)
	}
	got, err := rollout.LoadData([]rollout.File{{Path: Path(obj), Data: data}})
	if err != nil {
		t.Fatalf("rendered object does not load: %v\n%s", err, data)
	}
	want, err := rollout.LoadData([]rollout.File{{Path: "ranker.yaml", Data: []byte(file)}})
	if err != nil {
		t.Fatal(err)
	}
	return got.Rollouts[0], want.Rollouts[0]
}

// TestRenderAnalysisLoadsAsTheFile: a Rollout with an analysis (every gate kind, numeric
// and duration thresholds) and metricsEndpoints renders into the same rollout as the file.
func TestRenderAnalysisLoadsAsTheFile(t *testing.T) {
	got, want := loadBoth(t, canaryManifest, canaryFile)
	if d := cmp.Diff(want, got, ignoreSource); d != "" {
		t.Errorf("object vs file (-file +object):\n%s", d)
	}
	a := got.Analysis
	if a == nil || a.Baseline != "v7" || a.Canary != "v8" || a.Interval.Duration != 45*time.Second || a.MinReq() != 200 || len(a.Gates) != 4 {
		t.Fatalf("analysis %+v", a)
	}
	if n, err := a.Gates[0].Max.Number(); err != nil || n != 0.01 {
		t.Errorf("error-rate max = %v, %v", n, err)
	}
	if s, err := a.Gates[1].Max.Seconds(); err != nil || s != 0.25 {
		t.Errorf("latency max = %v, %v", s, err)
	}
	if got.Version("v8").MetricsEndpoints[1] != "127.0.0.1:9103" {
		t.Errorf("metricsEndpoints %v", got.Version("v8").MetricsEndpoints)
	}
}

// TestRenderAnalysisFromTypedObject: a v1.Rollout built in Go (what a client sends, the
// thresholds as a JSON number and string) renders into the same rollout as the file.
func TestRenderAnalysisFromTypedObject(t *testing.T) {
	f := func(v float64) *float64 { return &v }
	thr := func(js string) *v1.Threshold { return &v1.Threshold{Raw: []byte(js)} }
	n := 200
	ro := v1.Rollout{Spec: v1.RolloutSpec{
		Versions: []v1.ModelVersion{
			{Name: "v7", Endpoints: []string{"127.0.0.1:9001"}, MetricsEndpoints: []string{"127.0.0.1:9101"}},
			{Name: "v8", Endpoints: []string{"127.0.0.1:9002"}, MetricsEndpoints: []string{"127.0.0.1:9102", "127.0.0.1:9103"}},
		},
		Traffic: map[string]int{"v7": 100},
		Shadow:  []v1.Shadow{{Version: "v8", Percent: 10}},
		Analysis: &v1.Analysis{
			Baseline: "v7", Canary: "v8", Steps: []int{1, 5, 20, 50, 100}, MinRequests: &n,
			Webhook: "http://127.0.0.1:8080/hook",
			Gates: []v1.Gate{
				{Metric: "error-rate", Max: thr("0.01"), MaxIncrease: f(0.005)},
				{Metric: "latency", Percentile: 99.5, Max: thr(`"250ms"`), MaxRatio: f(1.5)},
				{Metric: "drift", Output: "score", MaxPSI: f(0.2)},
				{Metric: "shadow-agreement", Output: "label", Min: f(0.99), MaxMeanAbsDiff: f(0.05)},
			},
		},
	}}
	ro.Name, ro.Namespace = "ranker", "ml"
	ro.Spec.Analysis.Interval = durationPtr(45 * time.Second)
	b, err := json.Marshal(&ro)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	data, err := Render(&unstructured.Unstructured{Object: m})
	if err != nil {
		t.Fatal(err)
	}
	got, err := rollout.LoadData([]rollout.File{{Path: "ml/ranker", Data: data}})
	if err != nil {
		t.Fatalf("rendered object does not load: %v\n%s", err, data)
	}
	_, want := loadBoth(t, canaryManifest, canaryFile)
	if d := cmp.Diff(want, got.Rollouts[0], ignoreSource); d != "" {
		t.Errorf("typed object vs file (-file +object):\n%s", d)
	}
}

// TestAnalysisProblemsNameSpecFieldPaths: an analysis the schema passes but the file rules
// refuse is reported by spec field path: a decreasing step and an unknown canary; a
// threshold written as an object (the schema takes any value there), located by the line
// of the rendered document it is on.
func TestAnalysisProblemsNameSpecFieldPaths(t *testing.T) {
	for _, c := range []struct {
		name, old, new string
		want           []string
	}{
		{"rules", "steps: [1, 5, 20, 50, 100]\n    interval: 45s\n    minRequests: 200\n", "steps: [1, 5, 3]\n    interval: 45s\n    minRequests: 200\n    canary: v9\n",
			[]string{"spec.analysis.steps[2]: 3: steps must be strictly increasing", "spec.analysis.canary: unknown version"}},
		{"threshold type", "max: 250ms", "max: {ms: 250}", []string{"spec.analysis.gates[1].max: wrong type: got map, want a number or a duration"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			bad := strings.Replace(canaryManifest, c.old, c.new, 1)
			if c.name == "rules" {
				bad = strings.Replace(bad, "    canary: v8\n", "", 1)
			}
			obj := object(t, bad)
			data, err := Render(obj)
			if err != nil {
				t.Fatal(err)
			}
			_, err = rollout.LoadData([]rollout.File{{Path: Path(obj), Data: data}})
			if err == nil {
				t.Fatal("invalid analysis loaded")
			}
			msg := Message(problems(Path(obj), data, err))
			for _, want := range c.want {
				if !strings.Contains(msg, want) {
					t.Errorf("message %q lacks %q", msg, want)
				}
			}
		})
	}
}

// TestStateKeysAreModelStatesFields: the status keys the Store reads and writes are every
// field of store.ModelState (a state field missing here is silently dropped in Kubernetes).
func TestStateKeysAreModelStatesFields(t *testing.T) {
	var want []string
	ty := reflect.TypeFor[store.ModelState]()
	for i := 0; i < ty.NumField(); i++ {
		name, _, _ := strings.Cut(ty.Field(i).Tag.Get("json"), ",")
		if name != "" && name != "-" {
			want = append(want, name)
		}
	}
	got := append([]string(nil), stateKeys...)
	sort.Strings(want)
	sort.Strings(got)
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("stateKeys vs ModelState's JSON fields (-ModelState +stateKeys):\n%s", d)
	}
}

// TestAnalysisStateInStatus: a ModelState with an analysis written into a status reads back
// equal (times to the nanosecond, every gate), and a state without one clears it.
func TestAnalysisStateInStatus(t *testing.T) {
	obj := object(t, canaryManifest)
	obj.Object["status"] = map[string]any{"state": "Serving"}
	at := time.Date(2026, 11, 30, 12, 0, 30, 987654321, time.UTC)
	want := store.ModelState{
		SpecFingerprint: "fp1",
		Slots:           []store.Run{{Version: "v7", Slots: 95}, {Version: "v8", Slots: 5}},
		Analysis: &store.AnalysisState{
			SpecFingerprint: "fp1", Step: 1, StepStarted: at, Phase: store.PhaseWaiting,
			Reason: "canary v8 has 12 of 200 requests",
			LastDecision: &store.Decision{At: at, Step: 1, Decision: "advance", Gates: []store.Gate{
				{Metric: "error-rate", Value: 0.002, Threshold: 0.01, Pass: true},
				{Metric: "latency", Value: 0.21, Threshold: 0.25, Pass: true},
			}},
		},
	}
	if err := setModelState(obj, want); err != nil {
		t.Fatal(err)
	}
	got, err := modelState(obj)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("(-want +got):\n%s", d)
	}
	if p, _, _ := unstructured.NestedString(obj.Object, "status", "analysis", "phase"); p != store.PhaseWaiting {
		t.Errorf("status.analysis.phase = %q", p)
	}
	want.Analysis = nil
	if err := setModelState(obj, want); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := unstructured.NestedFieldNoCopy(obj.Object, "status", "analysis"); ok {
		t.Error("status.analysis kept after writing a state without one")
	}
}

func durationPtr(d time.Duration) *metav1.Duration { return &metav1.Duration{Duration: d} }

// TestStepTraffic: status.split shows the analysis step's split (the canary's step share
// out of the pair's) while the state runs on the status's spec; the spec's own traffic for
// a failed analysis, a state of another spec, or none.
func TestStepTraffic(t *testing.T) {
	a := &rollout.Analysis{Baseline: "v7", Canary: "v8", Steps: []int{1, 5, 20, 50, 100}}
	traffic := map[string]int{"v6": 10, "v7": 90}
	status := func(fp, afp string, step int, phase string) map[string]any {
		return map[string]any{"specFingerprint": fp, "split": "x",
			"analysis": map[string]any{"specFingerprint": afp, "step": int64(step), "phase": phase}}
	}
	for _, c := range []struct {
		name   string
		a      *rollout.Analysis
		status map[string]any
		want   string
	}{
		{"step 2", a, status("fp", "fp", 2, store.PhaseRunning), "v6=10,v7=72,v8=18"},
		{"waiting at 0", a, status("fp", "fp", 0, store.PhaseWaiting), "v6=10,v7=89,v8=1"},
		{"succeeded", a, status("fp", "fp", 4, store.PhaseSucceeded), "v6=10,v8=90"},
		{"step past the end", a, status("fp", "fp", 9, store.PhaseRunning), "v6=10,v8=90"},
		{"failed", a, status("fp", "fp", 2, store.PhaseFailed), "v6=10,v7=90"},
		{"another spec's", a, status("fp2", "fp", 2, store.PhaseRunning), "v6=10,v7=90"},
		{"no state", a, map[string]any{"specFingerprint": "fp"}, "v6=10,v7=90"},
		{"no analysis in spec", nil, status("fp", "fp", 2, store.PhaseRunning), "v6=10,v7=90"},
	} {
		if got := Split(stepTraffic(traffic, c.a, c.status), []string{"v6", "v7", "v8"}); got != c.want {
			t.Errorf("%s: split %q, want %q", c.name, got, c.want)
		}
	}
}
