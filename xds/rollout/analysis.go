package rollout

import (
	"fmt"
	"math"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"text/template"
	"text/template/parse"
	"time"

	"go.yaml.in/yaml/v3"
)

// Analysis ramps a canary through steps of its share, judging it against a baseline over
// each step's window (the control plane's analysis loop, xds/analysis_loop.go).
type Analysis struct {
	// Baseline and Canary are versions of this rollout.
	Baseline string `yaml:"baseline"`
	Canary   string `yaml:"canary"`
	// Steps are the canary's shares in percent, strictly increasing, 1..100 (see
	// StepSplit for how a share is taken out of the pair's traffic).
	Steps []int `yaml:"steps"`
	// Interval is how long a step lasts at least; gates are judged over the step's window.
	Interval Duration `yaml:"interval"`
	// MinRequests is the requests each of canary and baseline must have had in the window
	// before a gate is judged (default DefaultMinRequests).
	MinRequests *int `yaml:"minRequests"`
	// Provider is where metrics come from: embedded (default: the control plane scrapes the
	// versions' metricsEndpoints) or prometheus.
	Provider   string      `yaml:"provider"`
	Prometheus *Prometheus `yaml:"prometheus"`
	// Webhook, when set, is POSTed every decision as JSON (best effort, bounded timeout).
	Webhook string `yaml:"webhook"`
	Gates   []Gate `yaml:"gates"`
}

// Prometheus configures the prometheus provider.
type Prometheus struct {
	URL string `yaml:"url"`
	// Queries override the provider's PromQL templates, by name (PrometheusQueryNames).
	Queries map[string]string `yaml:"queries"`
}

// Gate is one condition the canary must meet over a step's window.
type Gate struct {
	// Metric is error-rate, latency, drift or shadow-agreement.
	Metric string `yaml:"metric"`
	// Max: error-rate: the canary's error rate (0..1); latency: the quantile (a duration).
	Max *Threshold `yaml:"max"`
	// MaxIncrease (error-rate): canary's error rate minus the baseline's.
	MaxIncrease *float64 `yaml:"maxIncrease"`
	// Percentile (latency): 50..99.9.
	Percentile float64 `yaml:"percentile"`
	// MaxRatio (latency): canary's quantile over the baseline's.
	MaxRatio *float64 `yaml:"maxRatio"`
	// Output (drift, shadow-agreement): an output tensor of the model.
	Output string `yaml:"output"`
	// MaxPSI (drift): population stability index, canary vs baseline histograms.
	MaxPSI *float64 `yaml:"maxPSI"`
	// Min / MinAgreement (shadow-agreement): class agreement rate (0..1), Min an alias.
	Min          *float64 `yaml:"min"`
	MinAgreement *float64 `yaml:"minAgreement"`
	// MaxMeanAbsDiff (shadow-agreement): mean absolute score difference.
	MaxMeanAbsDiff *float64 `yaml:"maxMeanAbsDiff"`
}

// Gate metrics.
const (
	MetricErrorRate       = "error-rate"
	MetricLatency         = "latency"
	MetricDrift           = "drift"
	MetricShadowAgreement = "shadow-agreement"
)

// Analysis providers.
const (
	ProviderEmbedded   = "embedded"
	ProviderPrometheus = "prometheus"
)

// Analysis defaults and bounds.
const (
	DefaultMinRequests      = 100
	DefaultAnalysisInterval = 30 * time.Second
	MinAnalysisInterval     = 100 * time.Millisecond
	MaxAnalysisInterval     = 24 * time.Hour
)

// PrometheusQueryNames are the templates a prometheus provider's queries may override.
var PrometheusQueryNames = []string{"requests", "errors", "latency", "drift"}

// Threshold is a gate bound written as a number (0.01) or a duration (250ms); which one a
// gate wants depends on its metric (validation checks it). Text is the scalar as written.
type Threshold struct{ Text string }

// UnmarshalYAML keeps a scalar's text.
func (t *Threshold) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: wrong type: got %s, want a number or a duration", n.Line, kindName(n))}}
	}
	t.Text = n.Value
	return nil
}

// MarshalYAML writes the scalar back as written.
func (t Threshold) MarshalYAML() (any, error) {
	return &yaml.Node{Kind: yaml.ScalarNode, Value: t.Text}, nil
}

// Number parses the threshold as a finite number.
func (t *Threshold) Number() (float64, error) {
	v, err := strconv.ParseFloat(strings.TrimSpace(t.Text), 64)
	if err != nil || math.IsNaN(v) || math.IsInf(v, 0) {
		return 0, fmt.Errorf("%q is not a number", t.Text)
	}
	return v, nil
}

// Seconds parses the threshold as a duration ("250ms") and returns it in seconds.
func (t *Threshold) Seconds() (float64, error) {
	d, err := time.ParseDuration(strings.TrimSpace(t.Text))
	if err != nil {
		return 0, fmt.Errorf("%q is not a duration like 250ms", t.Text)
	}
	return d.Seconds(), nil
}

// MinReq is MinRequests with its default.
func (a *Analysis) MinReq() int {
	if a.MinRequests == nil {
		return DefaultMinRequests
	}
	return *a.MinRequests
}

// StepSplit is the split served at a step whose canary share is step percent: the
// canary's and baseline's shares of traffic are replaced by round(pair*step/100) for the
// canary and the rest of the pair for the baseline, where pair is the sum of their shares
// in traffic (the canary takes its step share out of the pair's total; every other version
// keeps its share). At least 1 goes to the canary when step > 0 and pair > 0.
func StepSplit(traffic map[string]int, baseline, canary string, step int) map[string]int {
	out := make(map[string]int, len(traffic)+2)
	for v, w := range traffic {
		out[v] = w
	}
	pair := traffic[baseline] + traffic[canary]
	c := (pair*step + 50) / 100
	if c == 0 && step > 0 && pair > 0 {
		c = 1
	}
	if c > pair {
		c = pair
	}
	out[canary], out[baseline] = c, pair-c
	return out
}

func (a *Analysis) applyDefaults() {
	if a.Provider == "" {
		a.Provider = ProviderEmbedded
	}
	if a.Interval.Duration == 0 {
		a.Interval.Duration = DefaultAnalysisInterval
	}
	if a.MinRequests == nil {
		n := DefaultMinRequests
		a.MinRequests = &n
	}
}

// validateAnalysis checks the analysis section of r (versions: the names defined).
func validateAnalysis(r *Rollout, versions map[string]bool, add func(*Rollout, string, string, ...any)) {
	a := r.Analysis
	if a == nil {
		return
	}
	const f = "analysis"
	known := func(field, name, role string) bool {
		switch {
		case name == "":
			add(r, f+"."+field, "missing: the %s version", role)
		case !versions[name]:
			add(r, f+"."+field, "unknown version %q (versions: %s)", name, versionList(r))
		default:
			return true
		}
		return false
	}
	okB := known("baseline", a.Baseline, "baseline")
	okC := known("canary", a.Canary, "canary")
	if okB && okC {
		if a.Baseline == a.Canary {
			add(r, f+".canary", "the canary must be another version than the baseline %q", a.Baseline)
		} else if r.Traffic[a.Baseline]+r.Traffic[a.Canary] <= 0 {
			add(r, f, "traffic gives neither %s nor %s a share: the canary's steps are taken out of their shares, so give the baseline its share in traffic", a.Baseline, a.Canary)
		} else {
			b, c := r.Version(a.Baseline), r.Version(a.Canary)
			for _, p := range []string{REST, GRPC} {
				if b.Serves(p) && !c.Serves(p) {
					add(r, f+".canary", "the canary %s has no %s endpoint and the baseline %s has: it could not take the baseline's requests", a.Canary, protoName(p), a.Baseline)
				}
			}
		}
	}
	if len(a.Steps) == 0 {
		add(r, f+".steps", "missing: the canary's shares in percent, e.g. [1, 5, 20, 50, 100]")
	}
	for i, s := range a.Steps {
		sf := f + ".steps[" + strconv.Itoa(i) + "]"
		if s < 1 || s > 100 {
			add(r, sf, "%d is outside 1..100", s)
		} else if i > 0 && s <= a.Steps[i-1] {
			add(r, sf, "%d: steps must be strictly increasing (after %d)", s, a.Steps[i-1])
		}
	}
	if d := a.Interval.Duration; d < MinAnalysisInterval || d > MaxAnalysisInterval {
		add(r, f+".interval", "%v is outside %v..%v", d, MinAnalysisInterval, MaxAnalysisInterval)
	}
	if a.MinRequests != nil && *a.MinRequests < 1 {
		add(r, f+".minRequests", "%d: want at least 1", *a.MinRequests)
	}
	switch a.Provider {
	case ProviderEmbedded:
		if a.Prometheus != nil {
			add(r, f+".prometheus", "only with provider: prometheus")
		}
		for _, name := range []string{a.Baseline, a.Canary} {
			if v := r.Version(name); v != nil && len(v.MetricsEndpoints) == 0 {
				i := versionIndex(r, name)
				add(r, "versions["+strconv.Itoa(i)+"].name", "provider embedded scrapes the versions' metricsEndpoints: version %s has none (its model hosts' admin host:port)", name)
			}
		}
	case ProviderPrometheus:
		p := a.Prometheus
		if p == nil {
			add(r, f+".provider", "provider prometheus needs analysis.prometheus.url")
			break
		}
		if u, err := url.Parse(p.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			add(r, f+".prometheus.url", "%q: want an http(s) URL of the Prometheus server", p.URL)
		}
		names := make([]string, 0, len(p.Queries))
		for name := range p.Queries {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			q := p.Queries[name]
			qf := f + ".prometheus.queries." + name
			if !contains(PrometheusQueryNames, name) {
				add(r, qf, "unknown query %q (queries: %s)", name, strings.Join(PrometheusQueryNames, ", "))
			} else if strings.TrimSpace(q) == "" {
				add(r, qf, "empty query")
			} else if t, err := template.New(name).Parse(q); err != nil {
				add(r, qf, "not a template: %v", err)
			} else if err := substitutionsOnly(t); err != nil {
				add(r, qf, "%v", err)
			}
		}
	default:
		add(r, f+".provider", "%q: want embedded or prometheus", a.Provider)
	}
	if a.Webhook != "" {
		if u, err := url.Parse(a.Webhook); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			add(r, f+".webhook", "%q: want an http(s) URL", a.Webhook)
		}
	}
	if len(a.Gates) == 0 {
		add(r, f+".gates", "missing: at least one gate (error-rate, latency, drift, shadow-agreement)")
	}
	for i := range a.Gates {
		validateGate(r, f+".gates["+strconv.Itoa(i)+"]", &a.Gates[i], add)
	}
}

func validateGate(r *Rollout, f string, g *Gate, add func(*Rollout, string, string, ...any)) {
	// Which fields each metric takes; any other set field is refused at its line.
	set := map[string]bool{"max": g.Max != nil, "maxIncrease": g.MaxIncrease != nil, "percentile": g.Percentile != 0,
		"maxRatio": g.MaxRatio != nil, "output": g.Output != "", "maxPSI": g.MaxPSI != nil, "min": g.Min != nil,
		"minAgreement": g.MinAgreement != nil, "maxMeanAbsDiff": g.MaxMeanAbsDiff != nil}
	takes := map[string][]string{
		MetricErrorRate:       {"max", "maxIncrease"},
		MetricLatency:         {"percentile", "max", "maxRatio"},
		MetricDrift:           {"output", "maxPSI"},
		MetricShadowAgreement: {"output", "min", "minAgreement", "maxMeanAbsDiff"},
	}
	fields, ok := takes[g.Metric]
	if !ok {
		add(r, f+".metric", "%q: want error-rate, latency, drift or shadow-agreement", g.Metric)
		return
	}
	for _, k := range []string{"max", "maxIncrease", "percentile", "maxRatio", "output", "maxPSI", "min", "minAgreement", "maxMeanAbsDiff"} {
		if set[k] && !contains(fields, k) {
			add(r, f+"."+k, "not a field of metric %s (its fields: %s)", g.Metric, strings.Join(fields, ", "))
		}
	}
	unit := func(k string, v *float64) {
		if v != nil && !(*v >= 0 && *v <= 1) {
			add(r, f+"."+k, "%v is outside [0, 1]", *v)
		}
	}
	switch g.Metric {
	case MetricErrorRate:
		if g.Max == nil && g.MaxIncrease == nil {
			add(r, f, "an error-rate gate needs max (the canary's error rate) or maxIncrease (over the baseline's)")
		}
		if g.Max != nil {
			if v, err := g.Max.Number(); err != nil {
				add(r, f+".max", "%v: want an error rate 0..1", err)
			} else {
				unit("max", &v)
			}
		}
		unit("maxIncrease", g.MaxIncrease)
	case MetricLatency:
		if !(g.Percentile >= 50 && g.Percentile <= 99.9) {
			add(r, f+".percentile", "%v is outside 50..99.9", g.Percentile)
		}
		if g.Max == nil && g.MaxRatio == nil {
			add(r, f, "a latency gate needs max (a duration) or maxRatio (over the baseline's)")
		}
		if g.Max != nil {
			if v, err := g.Max.Seconds(); err != nil {
				add(r, f+".max", "%v", err)
			} else if v <= 0 {
				add(r, f+".max", "must be positive")
			}
		}
		if g.MaxRatio != nil && !(*g.MaxRatio > 0 && !math.IsInf(*g.MaxRatio, 0)) {
			add(r, f+".maxRatio", "%v: want a positive ratio", *g.MaxRatio)
		}
	case MetricDrift:
		if g.Output == "" {
			add(r, f+".output", "missing: the output tensor whose histograms are compared")
		}
		if g.MaxPSI == nil {
			add(r, f+".maxPSI", "missing: the largest population stability index allowed (0.1 small, 0.25 large)")
		} else if !(*g.MaxPSI > 0 && !math.IsInf(*g.MaxPSI, 0)) {
			add(r, f+".maxPSI", "%v: want a positive number", *g.MaxPSI)
		}
	case MetricShadowAgreement:
		if g.Output == "" {
			add(r, f+".output", "missing: the output tensor compared")
		}
		if g.Min != nil && g.MinAgreement != nil {
			add(r, f+".min", "give min or minAgreement, not both")
		}
		if g.Min == nil && g.MinAgreement == nil && g.MaxMeanAbsDiff == nil {
			add(r, f, "a shadow-agreement gate needs min / minAgreement (class agreement) or maxMeanAbsDiff (scores)")
		}
		unit("min", g.Min)
		unit("minAgreement", g.MinAgreement)
		if g.MaxMeanAbsDiff != nil && !(*g.MaxMeanAbsDiff >= 0 && !math.IsInf(*g.MaxMeanAbsDiff, 0)) {
			add(r, f+".maxMeanAbsDiff", "%v: want a number >= 0", *g.MaxMeanAbsDiff)
		}
		if r.Analysis != nil && r.Analysis.Canary != "" && !shadows(r, r.Analysis.Canary) {
			add(r, f+".metric", "shadow-agreement needs the canary %s in shadow (its mirrored answers are compared)", r.Analysis.Canary)
		}
	}
}

func shadows(r *Rollout, v string) bool {
	for _, s := range r.Shadow {
		if s.Version == v {
			return true
		}
	}
	return false
}

func versionIndex(r *Rollout, name string) int {
	for i := range r.Versions {
		if r.Versions[i].Name == name {
			return i
		}
	}
	return 0
}

func protoName(p string) string {
	if p == GRPC {
		return "gRPC"
	}
	return "REST"
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// queryFields are the substitutions a Prometheus query template may use.
var queryFields = []string{"Model", "Version", "Output", "Range", "Quantile"}

// substitutionsOnly accepts a template of text and {{.Field}} substitutions of
// queryFields only: a rollout file's template runs in the control plane, so no loops,
// conditions, variables or function calls (the prometheus provider applies the same rule).
func substitutionsOnly(t *template.Template) error {
	bad := func(n parse.Node) error {
		return fmt.Errorf("%s: only {{.Model}}, {{.Version}}, {{.Output}}, {{.Range}} and {{.Quantile}} may be used", n)
	}
	for _, n := range t.Tree.Root.Nodes {
		switch x := n.(type) {
		case *parse.TextNode:
		case *parse.ActionNode:
			p := x.Pipe
			if len(p.Decl) != 0 || len(p.Cmds) != 1 || len(p.Cmds[0].Args) != 1 {
				return bad(n)
			}
			f, ok := p.Cmds[0].Args[0].(*parse.FieldNode)
			if !ok || len(f.Ident) != 1 || !contains(queryFields, f.Ident[0]) {
				return bad(n)
			}
		default:
			return bad(n)
		}
	}
	return nil
}
