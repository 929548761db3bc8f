package analysis

import (
	"context"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/patchbay-io/patchbay/xds/rollout"
)

func near(a, b float64) bool { return math.Abs(a-b) < 1e-9 }

func TestHistogramQuantile(t *testing.T) {
	inf := math.Inf(1)
	bounds := []float64{0.1, 0.2, 0.5, inf}
	counts := []float64{10, 30, 50, 10} // 100 observations
	for _, tc := range []struct{ q, want float64 }{
		{0.05, 0.05}, // rank 5 in [0, 0.1] holding 10: 0.1 * 5/10
		{0.5, 0.26},  // rank 50: 40 below 0.2, 10 of 50 into [0.2, 0.5]: 0.2 + 0.3*0.2
		{0.4, 0.2},   // rank 40 ends the second bucket
		{0.99, 0.5},  // rank 99 in +Inf: the largest finite bound
	} {
		if got := HistogramQuantile(tc.q, bounds, counts); !near(got, tc.want) {
			t.Errorf("q %v: got %v, want %v", tc.q, got, tc.want)
		}
	}
	if got := HistogramQuantile(0.5, bounds, []float64{0, 0, 0, 0}); !math.IsNaN(got) {
		t.Errorf("empty histogram: got %v, want NaN", got)
	}
	if got := HistogramQuantile(0.5, bounds, []float64{1, 2}); !math.IsNaN(got) {
		t.Errorf("mismatched lengths: got %v, want NaN", got)
	}
}

func TestCumulative(t *testing.T) {
	b, c := Cumulative(map[float64]float64{0.5: 90, 0.1: 10, 0.2: 40}, 100)
	want := []float64{10, 30, 50, 10}
	if len(b) != 4 || !math.IsInf(b[3], 1) || b[0] != 0.1 {
		t.Fatalf("bounds %v", b)
	}
	for i := range want {
		if c[i] != want[i] {
			t.Fatalf("counts %v, want %v", c, want)
		}
	}
}

func TestPSI(t *testing.T) {
	if got := PSI([]float64{50, 50}, []float64{5, 5}); !near(got, 0) {
		t.Errorf("same proportions: %v, want 0", got)
	}
	// (0.8-0.5) ln(0.8/0.5) + (0.2-0.5) ln(0.2/0.5)
	if got := PSI([]float64{80, 20}, []float64{50, 50}); math.Abs(got-0.41588830833596724) > 1e-12 {
		t.Errorf("got %v, want 0.415888", got)
	}
	// An empty bucket is raised to PSIFloor: (1-0.5) ln 2 + (1e-4-0.5) ln(2e-4).
	if got := PSI([]float64{100, 0}, []float64{50, 50}); math.Abs(got-4.60431846666895) > 1e-9 {
		t.Errorf("got %v, want 4.604318", got)
	}
	if got := PSI([]float64{0, 0}, []float64{1, 1}); !math.IsNaN(got) {
		t.Errorf("empty side: %v, want NaN", got)
	}
}

func TestErrorRateLatencyRatioCapacity(t *testing.T) {
	if ErrorRate(200, 3) != 0.015 || ErrorRate(0, 0) != 0 {
		t.Error("ErrorRate")
	}
	if !near(LatencyRatio(0.3, 0.2), 1.5) || !near(LatencyRatio(0.002, 0), 2) {
		t.Error("LatencyRatio")
	}
	for _, tc := range []struct{ share, base, want int }{{1, 4, 1}, {20, 4, 1}, {50, 4, 2}, {51, 4, 3}, {100, 4, 4}, {100, 0, 1}} {
		if got := CapacityNeeded(tc.share, tc.base); got != tc.want {
			t.Errorf("CapacityNeeded(%d, %d) = %d, want %d", tc.share, tc.base, got, tc.want)
		}
	}
}

func TestDecide(t *testing.T) {
	pass := GateResult{Gate: "error-rate", Value: 0.001, Threshold: 0.01, Max: true, Pass: true}
	fail := GateResult{Gate: "error-rate", Value: 0.2, Threshold: 0.01, Max: true}
	steps := []int{1, 50, 100}
	base := func() Input {
		return Input{Step: 0, Steps: steps, Elapsed: time.Minute, Interval: 30 * time.Second, MinRequests: 100,
			Measurement: Measurement{CanaryRequests: 100, BaselineRequests: 900, Gates: []GateResult{pass}}}
	}
	for _, tc := range []struct {
		name    string
		change  func(*Input)
		kind    Kind
		reason  string
		blocked bool
	}{
		{"advance", func(*Input) {}, Advance, "step 1 (1%) passed; next 50%", false},
		{"too few canary requests", func(in *Input) { in.Measurement.CanaryRequests = 99 }, Wait, "minRequests: canary 99, baseline 900 of 100", true},
		{"too few baseline requests, a gate failing", func(in *Input) {
			in.Measurement.BaselineRequests = 10
			in.Measurement.Gates = []GateResult{fail}
		}, Wait, "minRequests", true},
		{"failed gate before the interval", func(in *Input) {
			in.Elapsed = time.Second
			in.Measurement.Gates = []GateResult{pass, fail}
		}, Fail, "error-rate 0.2 (want <= 0.01)", false},
		{"interval not over", func(in *Input) { in.Elapsed = 10 * time.Second }, Wait, "step 1 (1%): 10s of 30s", false},
		{"no data", func(in *Input) {
			in.Measurement.Gates = []GateResult{{Gate: "drift-score", NoData: "no observations in the window"}}
		}, Wait, "drift-score: no observations", true},
		{"last step", func(in *Input) { in.Step = 2 }, Done, "every step passed: canary at 100%", false},
		{"capacity short", func(in *Input) { in.Capacity = []Capacity{{Protocol: "http", Canary: 1, Baseline: 4}} }, Wait,
			"capacity: 50% needs 2 ready http endpoints of the canary (4 of the baseline), it has 1", true},
		{"capacity enough", func(in *Input) { in.Capacity = []Capacity{{Protocol: "http", Canary: 2, Baseline: 4}} }, Advance, "", false},
	} {
		in := base()
		tc.change(&in)
		d := Decide(in)
		if d.Kind != tc.kind || !strings.Contains(d.Reason, tc.reason) || d.Blocked != tc.blocked {
			t.Errorf("%s: got %+v, want %s %q blocked %v", tc.name, d, tc.kind, tc.reason, tc.blocked)
		}
		if d.Kind == Fail && d.Gate != "error-rate" {
			t.Errorf("%s: failed gate %q", tc.name, d.Gate)
		}
	}
}

// shadow-agreement gates read the shadow comparison given to Measure: agreement at least
// min, mean absolute difference at most maxMeanAbsDiff; no comparison is no data (a wait).
func TestMeasureShadowAgreement(t *testing.T) {
	min, diff := 0.99, 0.05
	a := &rollout.Analysis{Baseline: "v1", Canary: "v2", Steps: []int{50}, Gates: []rollout.Gate{
		{Metric: rollout.MetricShadowAgreement, Output: "label", Min: &min, MaxMeanAbsDiff: &diff}}}
	p := countsOnly{}
	shadow := func(model, version, output string) (float64, float64, int, bool) {
		if model != "m" || version != "v2" || output != "label" {
			return 0, 0, 0, false
		}
		return 0.97, 0.01, 500, true
	}
	m, err := Measure(context.Background(), p, a, "m", time.Time{}, time.Now(), shadow)
	if err != nil || len(m.Gates) != 2 {
		t.Fatalf("%+v %v", m, err)
	}
	if g := m.Gates[0]; g.Gate != "shadow-agreement-label" || g.Value != 0.97 || g.Pass || g.Max {
		t.Errorf("agreement %+v: want 0.97 failing min 0.99", g)
	}
	if g := m.Gates[1]; g.Gate != "shadow-mean-abs-diff-label" || g.Value != 0.01 || !g.Pass {
		t.Errorf("mean abs diff %+v", g)
	}
	if d := Decide(Input{Steps: a.Steps, Interval: time.Second, MinRequests: 1, Measurement: m}); d.Kind != Fail || d.Gate != "shadow-agreement-label" {
		t.Errorf("decision %+v", d)
	}
	m, _ = Measure(context.Background(), p, a, "m", time.Time{}, time.Now(), nil)
	if d := Decide(Input{Steps: a.Steps, Interval: time.Second, MinRequests: 1, Measurement: m}); d.Kind != Wait || !strings.Contains(d.Reason, "no shadow comparison of v2") {
		t.Errorf("without a comparison: %+v", d)
	}
}

// countsOnly is a Provider of fixed counts (the shadow gate reads none of its histograms).
type countsOnly struct{}

func (countsOnly) Counts(context.Context, Window) (float64, float64, error) { return 10, 0, nil }
func (countsOnly) LatencyQuantile(context.Context, Window, float64) (float64, error) {
	return math.NaN(), nil
}
func (countsOnly) ScoreHistogram(context.Context, Window, string) ([]float64, []float64, error) {
	return nil, nil, nil
}

// TestIdleBaselineStep: at a step that gives the baseline no share (the canary at 100% of
// the pair), the baseline cannot reach minRequests and has nothing to compare with. Before
// this, such a step waited forever on minRequests (found by the e2e canary tests). Now the
// canary alone must reach minRequests, its absolute gates are judged, and the gates that
// compare with the baseline are skipped (passing, saying why) without asking for the
// baseline's latency or histograms.
func TestIdleBaselineStep(t *testing.T) {
	incr, ratio, psi := 0.005, 1.5, 0.2
	a := &rollout.Analysis{Baseline: "v1", Canary: "v2", Steps: []int{50, 100}, Gates: []rollout.Gate{
		{Metric: rollout.MetricErrorRate, Max: &rollout.Threshold{Text: "0.01"}, MaxIncrease: &incr},
		{Metric: rollout.MetricLatency, Percentile: 99, MaxRatio: &ratio},
		{Metric: rollout.MetricDrift, Output: "score", MaxPSI: &psi}}}
	busy, err := MeasureStep(context.Background(), countsOnly{}, a, "m", time.Time{}, time.Now(), nil, false)
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range busy.Gates {
		if g.Skipped != "" {
			t.Errorf("gate %s skipped at a step where the baseline has a share", g.Gate)
		}
	}
	m, err := MeasureStep(context.Background(), countsOnly{}, a, "m", time.Time{}, time.Now(), nil, true)
	if err != nil {
		t.Fatal(err)
	}
	var skipped []string
	for _, g := range m.Gates {
		if g.Skipped != "" {
			if !g.Pass {
				t.Errorf("skipped gate %s does not pass", g.Gate)
			}
			skipped = append(skipped, g.Gate)
		} else if g.Gate != "error-rate" {
			t.Errorf("gate %s was judged at an idle-baseline step", g.Gate)
		}
	}
	if strings.Join(skipped, ",") != "error-rate-increase,latency-p99-ratio,drift-score" {
		t.Errorf("skipped %v, want the three relative gates", skipped)
	}
	m.BaselineRequests = 0
	in := Input{Step: 1, Steps: a.Steps, Elapsed: time.Minute, Interval: time.Second, MinRequests: 5, Measurement: m}
	if d := Decide(in); d.Kind != Wait || !strings.Contains(d.Reason, "minRequests") {
		t.Errorf("without BaselineIdle: %+v, want a wait on minRequests", d)
	}
	in.BaselineIdle = true
	if d := Decide(in); d.Kind != Done {
		t.Errorf("with BaselineIdle: %+v, want done", d)
	}
}
