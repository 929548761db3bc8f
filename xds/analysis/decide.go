package analysis

import (
	"context"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/patchbay-io/patchbay/xds/rollout"
)

// GateResult is one bound of one gate judged over a window.
type GateResult struct {
	// Gate names the bound: error-rate, error-rate-increase, latency-p99,
	// latency-p99-ratio, drift-<output>, shadow-agreement-<output>,
	// shadow-mean-abs-diff-<output>.
	Gate      string  `json:"gate"`
	Metric    string  `json:"metric"`
	Value     float64 `json:"value"`
	Threshold float64 `json:"threshold"`
	// Max: the value must be at most Threshold; else at least.
	Max  bool `json:"max"`
	Pass bool `json:"pass"`
	// NoData says the value could not be measured (no histogram yet, no shadow pairs).
	NoData string `json:"noData,omitempty"`
	// Skipped says why a gate that compares with the baseline was not judged: at a step
	// that gives the baseline no share there is no baseline traffic to compare with (it
	// was judged at the previous step). A skipped gate passes.
	Skipped string `json:"skipped,omitempty"`
}

func (g GateResult) String() string {
	if g.NoData != "" {
		return g.Gate + ": " + g.NoData
	}
	op := "<="
	if !g.Max {
		op = ">="
	}
	return fmt.Sprintf("%s %s (want %s %s)", g.Gate, fmtNum(g.Value), op, fmtNum(g.Threshold))
}

func fmtNum(v float64) string { return strconv.FormatFloat(v, 'g', 4, 64) }

// ShadowFunc reports the shadow comparison of a model's shadowed version on an output:
// class agreement rate, mean absolute score difference and the pairs compared (ok false:
// no comparison known).
type ShadowFunc func(model, version, output string) (agreement, meanAbsDiff float64, pairs int, ok bool)

// Measurement is what a window measured: each version's requests and every gate bound.
type Measurement struct {
	CanaryRequests, BaselineRequests float64
	Gates                            []GateResult
}

// Measure asks p for every gate of a over the window [start, end] of model's canary and
// baseline. shadow may be nil (shadow-agreement gates then have no data).
func Measure(ctx context.Context, p Provider, a *rollout.Analysis, model string, start, end time.Time, shadow ShadowFunc) (Measurement, error) {
	return MeasureStep(ctx, p, a, model, start, end, shadow, false)
}

// MeasureStep is Measure for a step; baselineIdle says the step gives the baseline no share
// (the canary at 100% of the pair): the gates that compare the canary with the baseline are
// then skipped (they pass, saying why) and the baseline is not asked for them.
func MeasureStep(ctx context.Context, p Provider, a *rollout.Analysis, model string, start, end time.Time, shadow ShadowFunc, baselineIdle bool) (Measurement, error) {
	var m Measurement
	const idle = "the baseline has no share at this step (judged at the previous step)"
	skipped := func(gate, metric string, t float64, isMax bool) GateResult {
		r := bound(gate, metric, 0, t, isMax)
		r.Pass, r.Skipped = true, idle
		return r
	}
	cw := Window{Model: model, Version: a.Canary, Start: start, End: end}
	bw := Window{Model: model, Version: a.Baseline, Start: start, End: end}
	cr, ce, err := p.Counts(ctx, cw)
	if err != nil {
		return m, fmt.Errorf("%s requests: %w", a.Canary, err)
	}
	br, be, err := p.Counts(ctx, bw)
	if err != nil {
		return m, fmt.Errorf("%s requests: %w", a.Baseline, err)
	}
	m.CanaryRequests, m.BaselineRequests = cr, br
	for _, g := range a.Gates {
		switch g.Metric {
		case rollout.MetricErrorRate:
			c, b := ErrorRate(cr, ce), ErrorRate(br, be)
			if g.Max != nil {
				t, _ := g.Max.Number()
				m.Gates = append(m.Gates, bound("error-rate", g.Metric, c, t, true))
			}
			if g.MaxIncrease != nil {
				if baselineIdle {
					m.Gates = append(m.Gates, skipped("error-rate-increase", g.Metric, *g.MaxIncrease, true))
				} else {
					m.Gates = append(m.Gates, bound("error-rate-increase", g.Metric, c-b, *g.MaxIncrease, true))
				}
			}
		case rollout.MetricLatency:
			name := "latency-p" + strconv.FormatFloat(g.Percentile, 'f', -1, 64)
			q := g.Percentile / 100
			c, err := p.LatencyQuantile(ctx, cw, q)
			if err != nil {
				return m, fmt.Errorf("%s latency: %w", a.Canary, err)
			}
			if g.Max != nil {
				t, _ := g.Max.Seconds()
				m.Gates = append(m.Gates, bound(name, g.Metric, c, t, true))
			}
			if g.MaxRatio != nil && baselineIdle {
				m.Gates = append(m.Gates, skipped(name+"-ratio", g.Metric, *g.MaxRatio, true))
			} else if g.MaxRatio != nil {
				b, err := p.LatencyQuantile(ctx, bw, q)
				if err != nil {
					return m, fmt.Errorf("%s latency: %w", a.Baseline, err)
				}
				m.Gates = append(m.Gates, bound(name+"-ratio", g.Metric, LatencyRatio(c, b), *g.MaxRatio, true))
			}
		case rollout.MetricDrift:
			name := "drift-" + g.Output
			if baselineIdle {
				m.Gates = append(m.Gates, skipped(name, g.Metric, *g.MaxPSI, true))
				continue
			}
			cb, cc, err := p.ScoreHistogram(ctx, cw, g.Output)
			if err != nil {
				return m, fmt.Errorf("%s output %s: %w", a.Canary, g.Output, err)
			}
			bb, bc, err := p.ScoreHistogram(ctx, bw, g.Output)
			if err != nil {
				return m, fmt.Errorf("%s output %s: %w", a.Baseline, g.Output, err)
			}
			r := bound(name, g.Metric, 0, *g.MaxPSI, true)
			if !sameBounds(cb, bb) {
				r.NoData = fmt.Sprintf("the versions' %s histograms have different buckets", g.Output)
			} else {
				r = bound(name, g.Metric, PSI(cc, bc), *g.MaxPSI, true)
			}
			m.Gates = append(m.Gates, r)
		case rollout.MetricShadowAgreement:
			var agree, diff float64
			var ok bool
			if shadow != nil {
				agree, diff, _, ok = shadow(model, a.Canary, g.Output)
			}
			add := func(r GateResult) {
				if !ok {
					r.NoData, r.Pass = "no shadow comparison of "+a.Canary+" yet", false
				}
				m.Gates = append(m.Gates, r)
			}
			if t := firstOf(g.Min, g.MinAgreement); t != nil {
				r := bound("shadow-agreement-"+g.Output, g.Metric, agree, *t, false)
				if ok && math.IsNaN(agree) {
					r.NoData, r.Pass = "output "+g.Output+" has no class to agree on (its values compare: maxMeanAbsDiff)", false
				}
				add(r)
			}
			if g.MaxMeanAbsDiff != nil {
				add(bound("shadow-mean-abs-diff-"+g.Output, g.Metric, diff, *g.MaxMeanAbsDiff, true))
			}
		}
	}
	return m, nil
}

func bound(gate, metric string, v, t float64, isMax bool) GateResult {
	r := GateResult{Gate: gate, Metric: metric, Value: v, Threshold: t, Max: isMax}
	switch {
	case math.IsNaN(v):
		r.NoData = "no observations in the window"
	case isMax:
		r.Pass = v <= t
	default:
		r.Pass = v >= t
	}
	return r
}

func firstOf(a, b *float64) *float64 {
	if a != nil {
		return a
	}
	return b
}

func sameBounds(a, b []float64) bool {
	if len(a) != len(b) || len(a) == 0 {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// Kind is what a decision does.
type Kind string

// Decisions.
const (
	Advance Kind = "advance" // go to the next step
	Wait    Kind = "wait"    // stay at this step (Reason says why)
	Fail    Kind = "fail"    // a gate failed: roll back to the baseline
	Done    Kind = "done"    // the last step passed: the canary keeps its final share
)

// Capacity is one protocol's ready endpoints of canary and baseline.
type Capacity struct {
	Protocol         string
	Canary, Baseline int
}

// Input is everything a decision depends on.
type Input struct {
	Step        int   // index into Steps of the step being judged
	Steps       []int // the canary's shares
	Elapsed     time.Duration
	Interval    time.Duration
	MinRequests float64
	Measurement Measurement
	// Capacity per protocol the model serves (empty: not known, not checked).
	Capacity []Capacity
	// BaselineIdle: the step gives the baseline no share, so minRequests applies to the
	// canary alone (see MeasureStep).
	BaselineIdle bool
}

// Decision is the outcome of one evaluation.
type Decision struct {
	Kind   Kind   `json:"kind"`
	Reason string `json:"reason,omitempty"`
	// Gate names the failed gate (Fail), Blocked says a Wait is for something other than
	// the step's time (minRequests, missing data, capacity).
	Gate    string `json:"gate,omitempty"`
	Blocked bool   `json:"blocked,omitempty"`
}

// Decide judges a step: a failed gate fails at once (once both versions have MinRequests
// in the window, whatever the step's time); then it waits for MinRequests, for every gate
// to have data and for the step to have lasted Interval; then the last step is Done, and
// any other advances if the canary has the capacity for the next step's share
// (CapacityNeeded), else waits.
func Decide(in Input) Decision {
	m := in.Measurement
	if m.CanaryRequests < in.MinRequests || (m.BaselineRequests < in.MinRequests && !in.BaselineIdle) {
		return Decision{Kind: Wait, Blocked: true, Reason: fmt.Sprintf("minRequests: canary %s, baseline %s of %s requests in the window",
			fmtNum(m.CanaryRequests), fmtNum(m.BaselineRequests), fmtNum(in.MinRequests))}
	}
	var failed, nodata []string
	gate := ""
	for _, g := range m.Gates {
		switch {
		case g.NoData != "":
			nodata = append(nodata, g.String())
		case !g.Pass:
			if gate == "" {
				gate = g.Gate
			}
			failed = append(failed, g.String())
		}
	}
	if len(failed) > 0 {
		return Decision{Kind: Fail, Gate: gate, Reason: strings.Join(failed, "; ")}
	}
	if len(nodata) > 0 {
		return Decision{Kind: Wait, Blocked: true, Reason: strings.Join(nodata, "; ")}
	}
	if in.Elapsed < in.Interval {
		return Decision{Kind: Wait, Reason: fmt.Sprintf("step %d (%d%%): %v of %v", in.Step+1, in.Steps[in.Step],
			in.Elapsed.Round(time.Millisecond), in.Interval)}
	}
	if in.Step >= len(in.Steps)-1 {
		return Decision{Kind: Done, Reason: fmt.Sprintf("every step passed: canary at %d%%", in.Steps[len(in.Steps)-1])}
	}
	next := in.Steps[in.Step+1]
	for _, c := range in.Capacity {
		if need := CapacityNeeded(next, c.Baseline); c.Canary < need {
			return Decision{Kind: Wait, Blocked: true, Reason: fmt.Sprintf("capacity: %d%% needs %d ready %s endpoints of the canary (%d of the baseline), it has %d",
				next, need, c.Protocol, c.Baseline, c.Canary)}
		}
	}
	return Decision{Kind: Advance, Reason: fmt.Sprintf("step %d (%d%%) passed; next %d%%", in.Step+1, in.Steps[in.Step], next)}
}
