package analysis

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"text/template"
	"text/template/parse"
	"time"

	"github.com/prometheus/client_golang/api"
	promv1 "github.com/prometheus/client_golang/api/prometheus/v1"
	"github.com/prometheus/common/model"
)

// The names of the Prometheus provider's PromQL templates, which a rollout's
// analysis.prometheus.queries may override (xds/rollout.PrometheusQueryNames).
const (
	QueryRequests = "requests" // Counts: requests of the version in the window
	QueryErrors   = "errors"   // Counts: failed requests of the version in the window
	QueryLatency  = "latency"  // LatencyQuantile
	QueryDrift    = "drift"    // ScoreHistogram: cumulative bucket counts by le
)

// liveSelector picks a version's live series: traffic!="shadow" matches the hosts'
// traffic="live" series and series without the label (hosts from before it existed),
// never mirrored requests.
const liveSelector = `model="{{.Model}}",version="{{.Version}}",traffic!="shadow"`

// DefaultPrometheusQueries are the provider's PromQL templates over the model hosts'
// metrics (modelhost/README.md, Telemetry). Each is a text/template with the fields of
// QueryData, evaluated at the window's end over a range as long as the window.
var DefaultPrometheusQueries = map[string]string{
	QueryRequests: `sum(increase(patchbay_modelhost_requests_total{` + liveSelector + `}[{{.Range}}]))`,
	QueryErrors:   `sum(increase(patchbay_modelhost_request_errors_total{` + liveSelector + `}[{{.Range}}]))`,
	QueryLatency: `histogram_quantile({{.Quantile}}, sum by (le) (increase(` +
		`patchbay_modelhost_request_duration_seconds_bucket{` + liveSelector + `}[{{.Range}}])))`,
	QueryDrift: `sum by (le) (increase(patchbay_modelhost_output_bucket{` + liveSelector + `,output="{{.Output}}"}[{{.Range}}]))`,
}

// QueryData is what a query template sees. Model, Version and Output are escaped for use
// inside a double-quoted PromQL string ("{{.Model}}"); Range is a PromQL duration (the
// window's length, e.g. 30s or 1m0s500ms); Quantile is a number in [0, 1].
type QueryData struct {
	Model, Version, Output string
	Range                  string
	Quantile               string
}

// PrometheusConfig configures a Prometheus provider.
type PrometheusConfig struct {
	// URL of the Prometheus server (http://127.0.0.1:9090); the HTTP API is under /api/v1.
	URL string
	// Queries override DefaultPrometheusQueries by name (QueryRequests ...).
	Queries map[string]string
	// Timeout bounds each query, over the wire and on the server (default 10s).
	Timeout time.Duration
	// Client sends the queries (default: an http.Client with Timeout).
	Client *http.Client
}

// Prometheus answers the gates' questions with PromQL over the HTTP API
// (/api/v1/query, evaluated at the window's end).
type Prometheus struct {
	api     promv1.API
	timeout time.Duration
	queries map[string]*template.Template
}

var _ Provider = (*Prometheus)(nil)

// CheckPrometheusQuery reports whether text is a usable template for the named query:
// a known name, and a template that parses and runs with QueryData.
func CheckPrometheusQuery(name, text string) error {
	_, err := parseQuery(name, text)
	return err
}

func parseQuery(name, text string) (*template.Template, error) {
	if _, ok := DefaultPrometheusQueries[name]; !ok {
		return nil, fmt.Errorf("unknown prometheus query %q (want one of requests, errors, latency, drift)", name)
	}
	if strings.TrimSpace(text) == "" {
		return nil, fmt.Errorf("prometheus query %q: empty", name)
	}
	t, err := template.New(name).Option("missingkey=error").Parse(text)
	if err != nil {
		return nil, fmt.Errorf("prometheus query %q: %w", name, err)
	}
	// Only substitutions: a rollout file's template must not loop or call functions in
	// the control plane ({{range 1000000000}} would).
	for _, n := range t.Tree.Root.Nodes {
		if err := substitutionOnly(n); err != nil {
			return nil, fmt.Errorf("prometheus query %q: %w", name, err)
		}
	}
	var b strings.Builder
	if err := t.Execute(&b, QueryData{Model: "m", Version: "v", Output: "o", Range: "1m", Quantile: "0.99"}); err != nil {
		return nil, fmt.Errorf("prometheus query %q: %w", name, err)
	}
	return t, nil
}

// substitutionOnly accepts text and {{.Field}} actions, nothing else.
func substitutionOnly(n parse.Node) error {
	switch x := n.(type) {
	case *parse.TextNode:
		return nil
	case *parse.ActionNode:
		if p := x.Pipe; len(p.Decl) == 0 && len(p.Cmds) == 1 && len(p.Cmds[0].Args) == 1 {
			if f, ok := p.Cmds[0].Args[0].(*parse.FieldNode); ok && len(f.Ident) == 1 {
				return nil
			}
		}
		return fmt.Errorf("%s: only {{.Model}}, {{.Version}}, {{.Output}}, {{.Range}} and {{.Quantile}} may be used", x)
	default:
		return fmt.Errorf("%s: only {{.Model}}, {{.Version}}, {{.Output}}, {{.Range}} and {{.Quantile}} may be used", n)
	}
}

// NewPrometheus checks the configuration and the templates; it sends nothing.
func NewPrometheus(cfg PrometheusConfig) (*Prometheus, error) {
	if cfg.URL == "" {
		return nil, errors.New("prometheus provider: no URL")
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	if cfg.Client == nil {
		cfg.Client = &http.Client{Timeout: cfg.Timeout}
	}
	c, err := api.NewClient(api.Config{Address: cfg.URL, Client: cfg.Client})
	if err != nil {
		return nil, fmt.Errorf("prometheus provider %q: %w", cfg.URL, err)
	}
	p := &Prometheus{api: promv1.NewAPI(c), timeout: cfg.Timeout, queries: map[string]*template.Template{}}
	var errs []error
	for name, text := range DefaultPrometheusQueries {
		if o, ok := cfg.Queries[name]; ok {
			text = o
		}
		t, err := parseQuery(name, text)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		p.queries[name] = t
	}
	for name := range cfg.Queries {
		if _, ok := DefaultPrometheusQueries[name]; !ok {
			errs = append(errs, fmt.Errorf("unknown prometheus query %q (want one of requests, errors, latency, drift)", name))
		}
	}
	if len(errs) > 0 {
		slices.SortFunc(errs, func(a, b error) int { return strings.Compare(a.Error(), b.Error()) })
		return nil, errors.Join(errs...)
	}
	return p, nil
}

// Counts answers the requests and errors queries. A query that finds no series counts
// zero (a version without traffic, or without any error, has no such series).
func (p *Prometheus) Counts(ctx context.Context, w Window) (requests, errs float64, err error) {
	if requests, err = p.sum(ctx, w, QueryRequests, QueryData{}); err != nil {
		return 0, 0, err
	}
	if errs, err = p.sum(ctx, w, QueryErrors, QueryData{}); err != nil {
		return 0, 0, err
	}
	return requests, errs, nil
}

// LatencyQuantile answers the latency query. No series, or a histogram without
// observations in the window (histogram_quantile gives NaN), is an error.
func (p *Prometheus) LatencyQuantile(ctx context.Context, w Window, q float64) (float64, error) {
	if !(q >= 0 && q <= 1) {
		return 0, fmt.Errorf("latency quantile %v: want 0..1", q)
	}
	query, v, err := p.query(ctx, w, QueryLatency, QueryData{Quantile: strconv.FormatFloat(q, 'g', -1, 64)})
	if err != nil {
		return 0, err
	}
	samples, err := samplesOf(query, v)
	if err != nil {
		return 0, err
	}
	switch {
	case len(samples) == 0:
		return 0, fmt.Errorf("prometheus query %s at %s: no series (no latency observed for %s/%s)", query, stamp(w.End), w.Model, w.Version)
	case len(samples) > 1:
		return 0, fmt.Errorf("prometheus query %s at %s: %d series, want one", query, stamp(w.End), len(samples))
	}
	x := float64(samples[0].Value)
	if math.IsNaN(x) {
		return 0, fmt.Errorf("prometheus query %s at %s: NaN (no requests of %s/%s observed in the window)", query, stamp(w.End), w.Model, w.Version)
	}
	return x, nil
}

// ScoreHistogram answers the drift query: one series per bucket, labelled le, holding
// the cumulative count of that bucket in the window. It returns the upper bounds
// ascending (+Inf last, as Prometheus histograms always have) and the count in each
// bucket (the cumulative counts differenced; a bucket below its predecessor, which
// increase()'s per-series extrapolation can give, counts zero).
func (p *Prometheus) ScoreHistogram(ctx context.Context, w Window, output string) (bounds, counts []float64, err error) {
	query, v, err := p.query(ctx, w, QueryDrift, QueryData{Output: quoteInner(output)})
	if err != nil {
		return nil, nil, err
	}
	samples, err := samplesOf(query, v)
	if err != nil {
		return nil, nil, err
	}
	if len(samples) == 0 {
		return nil, nil, fmt.Errorf("prometheus query %s at %s: no series (no histogram of output %q of %s/%s)", query, stamp(w.End), output, w.Model, w.Version)
	}
	type bucket struct{ le, cum float64 }
	buckets := make([]bucket, 0, len(samples))
	for _, s := range samples {
		le, ok := s.Metric[model.BucketLabel]
		if !ok {
			return nil, nil, fmt.Errorf("prometheus query %s at %s: series %s has no le label (sum by (le))", query, stamp(w.End), s.Metric)
		}
		x, err := strconv.ParseFloat(string(le), 64)
		if err != nil {
			return nil, nil, fmt.Errorf("prometheus query %s at %s: series %s: le: %w", query, stamp(w.End), s.Metric, err)
		}
		c := float64(s.Value)
		if math.IsNaN(c) {
			c = 0
		}
		buckets = append(buckets, bucket{x, c})
	}
	slices.SortFunc(buckets, func(a, b bucket) int { return cmp.Compare(a.le, b.le) })
	for i := 1; i < len(buckets); i++ {
		if buckets[i].le == buckets[i-1].le {
			return nil, nil, fmt.Errorf("prometheus query %s at %s: two series with le=%v (sum by (le))", query, stamp(w.End), buckets[i].le)
		}
	}
	if last := buckets[len(buckets)-1].le; !math.IsInf(last, 1) {
		return nil, nil, fmt.Errorf("prometheus query %s at %s: no le=\"+Inf\" bucket (highest %v)", query, stamp(w.End), last)
	}
	bounds = make([]float64, len(buckets))
	counts = make([]float64, len(buckets))
	prev := 0.0
	for i, b := range buckets {
		bounds[i] = b.le
		counts[i] = max(0, b.cum-prev)
		prev = max(prev, b.cum)
	}
	return bounds, counts, nil
}

// sum runs a counting query: the samples of a vector added up (no series: zero), or a scalar.
func (p *Prometheus) sum(ctx context.Context, w Window, name string, d QueryData) (float64, error) {
	query, v, err := p.query(ctx, w, name, d)
	if err != nil {
		return 0, err
	}
	samples, err := samplesOf(query, v)
	if err != nil {
		return 0, err
	}
	total := 0.0
	for _, s := range samples {
		total += float64(s.Value)
	}
	if math.IsNaN(total) || math.IsInf(total, 0) || total < 0 {
		return 0, fmt.Errorf("prometheus query %s at %s: %v, want a count", query, stamp(w.End), total)
	}
	return total, nil
}

// query renders the named template for the window and runs it at the window's end.
func (p *Prometheus) query(ctx context.Context, w Window, name string, d QueryData) (string, model.Value, error) {
	if !w.End.After(w.Start) {
		return "", nil, fmt.Errorf("prometheus query %q: window %s..%s is empty", name, stamp(w.Start), stamp(w.End))
	}
	r := w.End.Sub(w.Start).Truncate(time.Millisecond)
	if r <= 0 {
		return "", nil, fmt.Errorf("prometheus query %q: window %s..%s shorter than 1ms", name, stamp(w.Start), stamp(w.End))
	}
	d.Model, d.Version, d.Range = quoteInner(w.Model), quoteInner(w.Version), model.Duration(r).String()
	var b strings.Builder
	if err := p.queries[name].Execute(&b, d); err != nil {
		return "", nil, fmt.Errorf("prometheus query %q: %w", name, err)
	}
	query := b.String()
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	v, _, err := p.api.Query(ctx, query, w.End, promv1.WithTimeout(p.timeout))
	if err != nil {
		return query, nil, fmt.Errorf("prometheus query %s at %s: %w", query, stamp(w.End), err)
	}
	return query, v, nil
}

// samplesOf gives an instant vector's samples, or a scalar as one sample.
func samplesOf(query string, v model.Value) (model.Vector, error) {
	switch x := v.(type) {
	case model.Vector:
		return x, nil
	case *model.Scalar:
		return model.Vector{{Value: x.Value, Timestamp: x.Timestamp}}, nil
	default:
		return nil, fmt.Errorf("prometheus query %s: result of type %s, want an instant vector or a scalar", query, v.Type())
	}
}

// quoteInner escapes s for use inside a double-quoted PromQL string (PromQL string
// literals take Go's escapes).
func quoteInner(s string) string {
	q := strconv.Quote(s)
	return q[1 : len(q)-1]
}

func stamp(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }
