package k8s

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	v1 "github.com/patchbay-io/patchbay/api/k8s/v1"
	"github.com/patchbay-io/patchbay/xds/kube"
	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/store"
)

// The ranker canary with every analysis field, as kubectl YAML and as a rollout file.
const (
	canaryManifest = `
apiVersion: patchbay.io/v1
kind: Rollout
metadata:
  name: ranker
spec:
  versions:
    - name: v7
      endpoints: ["127.0.0.1:9001"]
      metricsEndpoints: ["127.0.0.1:9101"]
    - name: v8
      endpoints: ["127.0.0.1:9002"]
      metricsEndpoints: ["127.0.0.1:9102"]
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
    metricsEndpoints: ["127.0.0.1:9102"]
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

// TestAnalysisRolloutThroughAPIServer: a Rollout with an analysis is accepted by the chart's
// CRD under strict field validation and kept whole (nothing pruned: before, the schema had
// no analysis and strict validation refused it); the Source reads it as the very rollout
// the file gives; what the schema states is refused at apply time (a step of 0 or 150, an
// unknown metric or provider, minRequests 0, percentile 20); what only the file rules see
// (decreasing steps, an unknown canary, a threshold that is an object) reaches
// status.conditions by field path.
func TestAnalysisRolloutThroughAPIServer(t *testing.T) {
	ns := namespace(t)
	created := apply(t, ns, canaryManifest)
	if max, _, _ := unstructured.NestedSlice(created.Object, "spec", "analysis", "gates"); len(max) != 4 ||
		max[0].(map[string]any)["max"] != 0.01 || max[1].(map[string]any)["max"] != "250ms" {
		t.Fatalf("gates as stored: %v", max)
	}
	if me, _, _ := unstructured.NestedSlice(created.Object, "spec", "versions"); len(me) != 2 ||
		!cmp.Equal(me[1].(map[string]any)["metricsEndpoints"], []any{"127.0.0.1:9102"}) {
		t.Fatalf("versions as stored: %v", me)
	}

	src := kube.NewSource(kubeConfig(t, ns))
	changed := watching(t, src)
	ctx := context.Background()
	files, settled, err := src.Read(ctx)
	if err != nil || !settled {
		t.Fatalf("Read: %v (settled %v)", err, settled)
	}
	got := load(t, files)
	want := load(t, []rollout.File{{Path: "ranker.yaml", Data: []byte(canaryFile)}})
	if d := cmp.Diff(want.Rollouts, got.Rollouts, ignoreSource); d != "" {
		t.Errorf("Rollout object vs file (-file +object):\n%s", d)
	}
	if a := got.Rollouts[0].Analysis; a == nil || len(a.Steps) != 5 || a.Interval.Duration != 45*time.Second {
		t.Fatalf("analysis read %+v", a)
	}

	rc := clients(t).Dynamic.Resource(v1.GroupVersionResource).Namespace(ns)
	gate := func(s map[string]any, i int) map[string]any {
		return s["analysis"].(map[string]any)["gates"].([]any)[i].(map[string]any)
	}
	for name, edit := range map[string]func(spec map[string]any){
		"step-0":           func(s map[string]any) { s["analysis"].(map[string]any)["steps"] = []any{0, 50} },
		"step-150":         func(s map[string]any) { s["analysis"].(map[string]any)["steps"] = []any{10, 150} },
		"no-steps":         func(s map[string]any) { s["analysis"].(map[string]any)["steps"] = []any{} },
		"unknown-metric":   func(s map[string]any) { gate(s, 0)["metric"] = "colour" },
		"unknown-provider": func(s map[string]any) { s["analysis"].(map[string]any)["provider"] = "graphite" },
		"min-requests-0":   func(s map[string]any) { s["analysis"].(map[string]any)["minRequests"] = 0 },
		"percentile-20":    func(s map[string]any) { gate(s, 1)["percentile"] = 20 },
		"unknown-field":    func(s map[string]any) { gate(s, 2)["maxKS"] = 0.1 },
		"bad-interval":     func(s map[string]any) { s["analysis"].(map[string]any)["interval"] = "soon" },
	} {
		obj := parseManifest(t, canaryManifest)
		obj.SetName(name)
		spec, _, _ := unstructured.NestedMap(obj.Object, "spec")
		edit(spec)
		obj.Object["spec"] = spec
		if _, err := rc.Create(ctx, obj, metav1.CreateOptions{FieldValidation: "Strict"}); err == nil {
			t.Errorf("%s: created", name)
		} else {
			t.Logf("%s: refused: %v", name, err)
		}
	}

	src.Report(ctx, nil, "1")
	eventually(t, "Ready=True Applied", func() (bool, string) {
		c := readyCondition(getRollout(t, ns, "ranker"))
		return c != nil && c.Status == metav1.ConditionTrue && c.Reason == v1.ReasonApplied, spew(getRollout(t, ns, "ranker"))
	})

	for _, c := range []struct {
		name     string
		edit     func(string) string
		gen      int64
		messages []string
	}{
		{"rules", func(m string) string {
			m = strings.Replace(m, "steps: [1, 5, 20, 50, 100]", "steps: [5, 1]", 1)
			return strings.Replace(m, "canary: v8", "canary: v9", 1)
		}, 2, []string{"spec.analysis.steps[1]: 1: steps must be strictly increasing", "spec.analysis.canary: unknown version"}},
		{"threshold-object", func(m string) string { return strings.Replace(m, "max: 250ms", "max: {ms: 250}", 1) }, 3,
			[]string{"spec.analysis.gates[1].max: wrong type: got map, want a number or a duration"}},
	} {
		replaceSpec(t, ns, c.edit(canaryManifest))
		waitChanged(t, changed)
		files, _, err := src.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(files) != 1 {
			t.Fatalf("%s: Read %d documents", c.name, len(files))
		}
		if d := cmp.Diff(want.Rollouts, load(t, files).Rollouts, ignoreSource); d != "" {
			t.Errorf("%s: not the last good spec served (-good +read):\n%s", c.name, d)
		}
		src.Report(ctx, nil, "1")
		eventually(t, c.name+": Ready=False Invalid by field path", func() (bool, string) {
			obj := getRollout(t, ns, "ranker")
			cond := readyCondition(obj)
			if cond == nil || cond.Status != metav1.ConditionFalse || cond.Reason != v1.ReasonInvalid || cond.ObservedGeneration != c.gen {
				return false, spew(obj)
			}
			for _, m := range c.messages {
				if !strings.Contains(cond.Message, m) {
					return false, cond.Message
				}
			}
			return true, ""
		})
	}
}

// TestStoreKeepsAnalysisState: the analysis state written by one replica's Store lands in
// the Rollout's status (schema-valid, not pruned: before, status had no analysis and the
// API server dropped it, so a restarted control plane began the analysis again), reads
// back equal through another replica's Load (times to the nanosecond, every gate) and
// wakes its Watch; the Source's status writes keep it; a state without one clears it.
func TestStoreKeepsAnalysisState(t *testing.T) {
	ns := namespace(t)
	apply(t, ns, canaryManifest)
	a, b := kube.NewStore(kubeConfig(t, ns)), kube.NewStore(kubeConfig(t, ns))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	woke := make(chan struct{}, 1)
	watchDone := make(chan error, 1)
	go func() {
		watchDone <- b.Watch(ctx, func() {
			select {
			case woke <- struct{}{}:
			default:
			}
		})
	}()
	defer func() { cancel(); <-watchDone }()

	at := time.Date(2026, 11, 30, 16, 45, 10, 123456789, time.UTC)
	want := store.ModelState{
		SpecFingerprint: "fp1",
		Slots:           []store.Run{{Version: "v7", Slots: 99}, {Version: "v8", Slots: 1}},
		ConfigVersion:   "3",
		Analysis: &store.AnalysisState{
			SpecFingerprint: "fp1", Step: 1, StepStarted: at, Phase: store.PhaseRunning,
			LastDecision: &store.Decision{At: at, Step: 0, Decision: "advance", Gates: []store.Gate{
				{Metric: "error-rate", Value: 0.0025, Threshold: 0.01, Pass: true},
				{Metric: "latency", Value: 0.2, Threshold: 0.25, Pass: true},
				{Metric: "drift", Value: 0, Threshold: 0.2, Pass: true},
			}},
		},
	}
	// Until b's informer has listed, a write shows to it as its initial state, not a
	// change: write a warm-up state until b's Watch fires (bounded), then the real one.
	for i := 0; ; i++ {
		if i == 20 {
			t.Fatal("other replica's Watch never fired")
		}
		if _, err := a.Update(ctx, "ranker", func(cur store.ModelState) (store.ModelState, error) {
			cur.ConfigVersion = "warm-up-" + strconv.Itoa(i)
			return cur, nil
		}); err != nil {
			t.Fatal(err)
		}
		select {
		case <-woke:
		case <-time.After(time.Second):
			continue
		}
		break
	}
	got, err := a.Update(ctx, "ranker", func(store.ModelState) (store.ModelState, error) { return want, nil })
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("Update returned (-want +got):\n%s", d)
	}
	obj := getRollout(t, ns, "ranker")
	if p, _, _ := unstructured.NestedString(obj.Object, "status", "analysis", "phase"); p != store.PhaseRunning {
		t.Fatalf("status.analysis.phase %q in the API server: %s", p, spew(obj))
	}
	if g, _, _ := unstructured.NestedSlice(obj.Object, "status", "analysis", "lastDecision", "gates"); len(g) != 3 {
		t.Errorf("status.analysis.lastDecision.gates %v", g)
	}
	loaded, err := b.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(want, loaded["ranker"]); d != "" {
		t.Errorf("other replica's Load (-want +got):\n%s", d)
	}
	select {
	case <-woke:
	case <-time.After(30 * time.Second):
		t.Error("other replica's Watch did not fire on the analysis state write")
	}

	// The Source's status writes (conditions, split, state) leave the analysis state, and
	// status.split is the split served at the step: v8 at 5 % of the pair's 100.
	src := kube.NewSource(kubeConfig(t, ns))
	watching(t, src)
	if _, _, err := src.Read(ctx); err != nil {
		t.Fatal(err)
	}
	src.Report(ctx, nil, "3")
	eventually(t, "Ready=True Applied with the analysis kept", func() (bool, string) {
		obj := getRollout(t, ns, "ranker")
		c := readyCondition(obj)
		split, _, _ := unstructured.NestedString(obj.Object, "status", "split")
		st, err := b.Load(ctx)
		return c != nil && c.Reason == v1.ReasonApplied && split == "v7=95,v8=5" && err == nil && cmp.Equal(want, st["ranker"]), spew(obj)
	})
	// The next step, written by another replica, shows without a reload of the Source's.
	next := want.Clone()
	next.Analysis.Step = 2
	if _, err := b.Update(ctx, "ranker", func(store.ModelState) (store.ModelState, error) { return next, nil }); err != nil {
		t.Fatal(err)
	}
	eventually(t, "split of step 2", func() (bool, string) {
		obj := getRollout(t, ns, "ranker")
		split, _, _ := unstructured.NestedString(obj.Object, "status", "split")
		return split == "v7=80,v8=20", spew(obj)
	})
	if _, err := b.Update(ctx, "ranker", func(store.ModelState) (store.ModelState, error) { return want, nil }); err != nil {
		t.Fatal(err)
	}

	// A later decision: the analysis fails and its rollback is recorded beside it.
	failed := want.Clone()
	failed.Analysis.Phase, failed.Analysis.Reason = store.PhaseFailed, "analysis: error-rate 0.04 > 0.01"
	failed.Rollback = &store.Rollback{Traffic: map[string]int{"v7": 100}, Reason: failed.Analysis.Reason, At: at, FromIndex: -1, SpecFingerprint: "fp1"}
	if _, err := b.Update(ctx, "ranker", func(cur store.ModelState) (store.ModelState, error) {
		if d := cmp.Diff(want, cur); d != "" {
			t.Errorf("b's fn got (-want +got):\n%s", d)
		}
		return failed, nil
	}); err != nil {
		t.Fatal(err)
	}
	if st, err := a.Load(ctx); err != nil || !cmp.Equal(failed, st["ranker"]) {
		t.Errorf("after the failed decision: %v %s", err, cmp.Diff(failed, st["ranker"]))
	}
	eventually(t, "RolledBack to the baseline", func() (bool, string) {
		obj := getRollout(t, ns, "ranker")
		split, _, _ := unstructured.NestedString(obj.Object, "status", "split")
		state, _, _ := unstructured.NestedString(obj.Object, "status", "state")
		return split == "v7=100" && state == v1.StateRolledBack, spew(obj)
	})

	// A state without an analysis (the spec lost its section) clears status.analysis.
	if _, err := a.Update(ctx, "ranker", func(cur store.ModelState) (store.ModelState, error) {
		cur.Analysis = nil
		return cur, nil
	}); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := unstructured.NestedFieldNoCopy(getRollout(t, ns, "ranker").Object, "status", "analysis"); ok {
		t.Error("status.analysis kept after a state without one")
	}
}
