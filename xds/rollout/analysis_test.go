package rollout

import (
	"strings"
	"testing"
	"time"
)

func TestAnalysisGood(t *testing.T) {
	set, err := LoadFiles("testdata/analysis/good.yaml")
	if err != nil {
		t.Fatal(err)
	}
	a := set.Model("ranker").Analysis
	if a == nil || a.Baseline != "v7" || a.Canary != "v8" || len(a.Steps) != 5 || a.Interval.Duration != 30*time.Second {
		t.Fatalf("analysis %+v", a)
	}
	if a.Provider != ProviderEmbedded || a.MinReq() != DefaultMinRequests {
		t.Errorf("defaults: provider %q minRequests %d, want embedded, %d", a.Provider, a.MinReq(), DefaultMinRequests)
	}
	if v, err := a.Gates[0].Max.Number(); err != nil || v != 0.01 {
		t.Errorf("error-rate max %v %v", v, err)
	}
	if v, err := a.Gates[1].Max.Seconds(); err != nil || v != 0.25 {
		t.Errorf("latency max %v %v", v, err)
	}
	if got := set.Model("ranker").Versions[1].MetricsEndpoints; len(got) != 1 || got[0] != "127.0.0.1:9102" {
		t.Errorf("metricsEndpoints %v", got)
	}
	c := set.Model("churn").Analysis
	if c.Provider != ProviderPrometheus || c.MinReq() != 20 || c.Interval.Duration != DefaultAnalysisInterval || c.Prometheus.Queries["requests"] == "" {
		t.Errorf("churn analysis %+v", c)
	}
}

// Every bad field of an analysis gets its own file:line error.
func TestAnalysisBadReportsEveryFieldWithLine(t *testing.T) {
	_, err := LoadFiles("testdata/analysis/bad.yaml")
	if err == nil {
		t.Fatal("want errors")
	}
	want := []string{
		`bad.yaml:7: versions[0].metricsEndpoints[0]: "127.0.0.1:0": port must be 1..65535`,
		`bad.yaml:13: analysis.canary: unknown version "v9" (versions: v7, v8)`,
		`bad.yaml:14: analysis.steps[1]: 5: steps must be strictly increasing (after 5)`,
		`bad.yaml:14: analysis.steps[2]: 120 is outside 1..100`,
		`bad.yaml:15: analysis.interval: 10ms is outside 100ms..24h0m0s`,
		`bad.yaml:16: analysis.minRequests: 0: want at least 1`,
		`bad.yaml:18: analysis.prometheus: only with provider: prometheus`,
		`bad.yaml:19: analysis.webhook: "ftp://example": want an http(s) URL`,
		`bad.yaml:22: analysis.gates[0].max: 2 is outside [0, 1]`,
		`bad.yaml:23: analysis.gates[0].percentile: not a field of metric error-rate (its fields: max, maxIncrease)`,
		`bad.yaml:25: analysis.gates[1].percentile: 20 is outside 50..99.9`,
		`bad.yaml:26: analysis.gates[1].max: "0.25" is not a duration like 250ms`,
		`bad.yaml:27: analysis.gates[2].output: missing: the output tensor whose histograms are compared`,
		`bad.yaml:28: analysis.gates[2].maxPSI: -1: want a positive number`,
		`bad.yaml:29: analysis.gates[3].metric: shadow-agreement needs the canary v9 in shadow`,
		`bad.yaml:31: analysis.gates[3].min: give min or minAgreement, not both`,
		`bad.yaml:31: analysis.gates[3].min: 1.5 is outside [0, 1]`,
		`bad.yaml:33: analysis.gates[4].metric: "throughput": want error-rate, latency, drift or shadow-agreement`,
		`bad.yaml:34: analysis.gates[5]: an error-rate gate needs max (the canary's error rate) or maxIncrease`,
		`bad.yaml:45: analysis.canary: the canary must be another version than the baseline "v1"`,
		`bad.yaml:43: analysis.steps: missing: the canary's shares in percent`,
		`bad.yaml:48: analysis.prometheus.url: "127.0.0.1:9090": want an http(s) URL`,
		`bad.yaml:49: analysis.prometheus.queries.drift: empty query`,
		`bad.yaml:49: analysis.prometheus.queries.errors: {{range .Model}}x{{end}}: only {{.Model}}, {{.Version}}, {{.Output}}, {{.Range}} and {{.Quantile}} may be used`,
		`bad.yaml:49: analysis.prometheus.queries.latency: not a template:`,
		`bad.yaml:49: analysis.prometheus.queries.requests: {{.Nope}}: only`,
		`bad.yaml:49: analysis.prometheus.queries.rps: unknown query "rps" (queries: requests, errors, latency, drift)`,
		`bad.yaml:50: analysis.gates: missing: at least one gate`,
		`bad.yaml:61: analysis.canary: the canary v2 has no REST endpoint and the baseline v1 has`,
		`bad.yaml:63: analysis.provider: "statsd": want embedded or prometheus`,
		`bad.yaml:65: analysis.gates[0].max: "lots" is not a number: want an error rate 0..1`,
		`bad.yaml:72: versions[1].name: provider embedded scrapes the versions' metricsEndpoints: version v2 has none`,
	}
	got := strings.Split(err.Error(), "\n")
	for _, w := range want {
		found := false
		for _, g := range got {
			if strings.Contains(g, w) {
				found = true
			}
		}
		if !found {
			t.Errorf("missing %q", w)
		}
	}
	if len(got) != len(want) {
		t.Errorf("%d errors, want %d:\n%s", len(got), len(want), err)
	}
}

func TestStepSplit(t *testing.T) {
	for _, tc := range []struct {
		traffic map[string]int
		step    int
		want    map[string]int
	}{
		{map[string]int{"b": 100}, 1, map[string]int{"b": 99, "c": 1}},
		{map[string]int{"b": 100, "c": 0}, 50, map[string]int{"b": 50, "c": 50}},
		{map[string]int{"b": 100}, 100, map[string]int{"b": 0, "c": 100}},
		// the pair has 80 (others keep theirs): 20% of 80 is 16; 1% of 80 rounds to 1.
		{map[string]int{"o": 20, "b": 70, "c": 10}, 20, map[string]int{"o": 20, "b": 64, "c": 16}},
		{map[string]int{"o": 20, "b": 80}, 1, map[string]int{"o": 20, "b": 79, "c": 1}},
		{map[string]int{"o": 98, "b": 2}, 5, map[string]int{"o": 98, "b": 1, "c": 1}},
	} {
		got := StepSplit(tc.traffic, "b", "c", tc.step)
		for v, w := range tc.want {
			if got[v] != w {
				t.Errorf("StepSplit(%v, %d) = %v, want %v", tc.traffic, tc.step, got, tc.want)
				break
			}
		}
	}
}
