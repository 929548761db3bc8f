package analysis

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"sort"
	"sync"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// The model hosts' metric names (modelhost/telemetry.go; shared/design.md).
const (
	MetricRequests = "patchbay_modelhost_requests_total"
	MetricErrors   = "patchbay_modelhost_request_errors_total"
	MetricDuration = "patchbay_modelhost_request_duration_seconds"
	MetricOutput   = "patchbay_modelhost_output"
)

// maxScrapeBytes bounds one /metrics answer read.
const maxScrapeBytes = 16 << 20

// Embedded is the provider without a metrics system: it scrapes the /metrics of each
// version's model hosts (the rollout's versions[].metricsEndpoints, their admin
// listeners) itself, keeps the samples per endpoint, and answers from the difference
// between the sample at the window's start (the last one taken at or before it, else the
// first after it) and the newest, taken when a question's window ends after it. It sums
// over protocols, and reads only series with traffic="live" where the label exists
// (series without it count as live). A counter that went down (a host restarted) counts
// from zero.
type Embedded struct {
	// Endpoints gives a version's metrics endpoints (host:port).
	Endpoints func(model, version string) []string
	// TLS, when set and answering a config for a version's endpoint, makes its scrapes
	// https with that client config (serverName: the endpoint's host); nil: plain http.
	TLS func(model, version, serverName string) *tls.Config
	// Timeout bounds one scrape (default 2s).
	Timeout time.Duration
	// Keep bounds the samples kept per endpoint (default 512): the oldest go first.
	Keep int

	mu      sync.Mutex
	samples map[string][]sample // endpoint -> samples, oldest first
}

// sample is what one scrape of one endpoint gave, reduced to what the gates read, per
// model/version.
type sample struct {
	at       time.Time
	versions map[mvKey]*counts
}

type mvKey struct{ model, version string }

type counts struct {
	requests, errors float64
	duration         hist
	outputs          map[string]hist
}

type hist struct {
	buckets map[float64]float64 // upper bound -> cumulative count
	count   float64
}

func (h *hist) add(x *dto.Histogram) {
	if h.buckets == nil {
		h.buckets = map[float64]float64{}
	}
	for _, b := range x.GetBucket() {
		h.buckets[b.GetUpperBound()] += float64(b.GetCumulativeCount())
	}
	h.count += float64(x.GetSampleCount())
}

var _ Provider = (*Embedded)(nil)

// Counts implements Provider.
func (e *Embedded) Counts(ctx context.Context, w Window) (float64, float64, error) {
	var req, errs float64
	err := e.each(ctx, w, func(start, end *counts) {
		req += delta(start.requests, end.requests)
		errs += delta(start.errors, end.errors)
	})
	return req, errs, err
}

// LatencyQuantile implements Provider.
func (e *Embedded) LatencyQuantile(ctx context.Context, w Window, q float64) (float64, error) {
	sum := hist{buckets: map[float64]float64{}}
	err := e.each(ctx, w, func(start, end *counts) { sum.addDelta(start.duration, end.duration) })
	if err != nil {
		return 0, err
	}
	bounds, cs := Cumulative(sum.buckets, sum.count)
	return HistogramQuantile(q, bounds, cs), nil
}

// ScoreHistogram implements Provider.
func (e *Embedded) ScoreHistogram(ctx context.Context, w Window, output string) ([]float64, []float64, error) {
	sum := hist{buckets: map[float64]float64{}}
	err := e.each(ctx, w, func(start, end *counts) { sum.addDelta(start.outputs[output], end.outputs[output]) })
	if err != nil {
		return nil, nil, err
	}
	if len(sum.buckets) == 0 {
		return nil, nil, nil
	}
	b, c := Cumulative(sum.buckets, sum.count)
	return b, c, nil
}

func (h *hist) addDelta(start, end hist) {
	for b, v := range end.buckets {
		h.buckets[b] += delta(start.buckets[b], v)
	}
	h.count += delta(start.count, end.count)
}

// delta is a counter's increase; a counter that went down was reset (its host restarted).
func delta(start, end float64) float64 {
	if end < start {
		return end
	}
	return end - start
}

// each scrapes the version's endpoints whose newest sample is older than w.End, then
// calls fn with each endpoint's samples at the window's start and newest.
func (e *Embedded) each(ctx context.Context, w Window, fn func(start, end *counts)) error {
	if e.Endpoints == nil {
		return fmt.Errorf("no metrics endpoints known")
	}
	eps := e.Endpoints(w.Model, w.Version)
	if len(eps) == 0 {
		return fmt.Errorf("version %s of %s has no metricsEndpoints", w.Version, w.Model)
	}
	for _, ep := range eps {
		if err := e.refresh(ctx, w, ep); err != nil {
			return err
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	k := mvKey{w.Model, w.Version}
	empty := &counts{}
	for _, ep := range eps {
		ss := e.samples[ep]
		if len(ss) == 0 {
			continue
		}
		i := sort.Search(len(ss), func(i int) bool { return ss[i].at.After(w.Start) }) // first after start
		start := ss[max(i-1, 0)]
		end := ss[len(ss)-1]
		s, en := start.versions[k], end.versions[k]
		if s == nil {
			s = empty
		}
		if en == nil {
			en = empty
		}
		fn(s, en)
	}
	return nil
}

// refresh scrapes ep unless its newest sample was taken at or after the window's end.
func (e *Embedded) refresh(ctx context.Context, w Window, ep string) error {
	e.mu.Lock()
	ss := e.samples[ep]
	fresh := len(ss) > 0 && !ss[len(ss)-1].at.Before(w.End)
	e.mu.Unlock()
	if fresh {
		return nil
	}
	s, err := e.scrape(ctx, w, ep)
	if err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.samples == nil {
		e.samples = map[string][]sample{}
	}
	keep := e.Keep
	if keep <= 0 {
		keep = 512
	}
	ss = append(e.samples[ep], s)
	if len(ss) > keep {
		ss = append([]sample(nil), ss[len(ss)-keep:]...)
	}
	e.samples[ep] = ss
	return nil
}

// Forget drops the samples of endpoints not in keep (endpoints no rollout names any more).
func (e *Embedded) Forget(keep map[string]bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for ep := range e.samples {
		if !keep[ep] {
			delete(e.samples, ep)
		}
	}
}

// scrape reads one endpoint's /metrics now.
func (e *Embedded) scrape(ctx context.Context, w Window, ep string) (sample, error) {
	timeout := e.Timeout
	if timeout <= 0 {
		timeout = 2 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	scheme, client := "http", http.DefaultClient
	if e.TLS != nil {
		host := ep
		if h, _, err := net.SplitHostPort(ep); err == nil {
			host = h
		}
		if cfg := e.TLS(w.Model, w.Version, host); cfg != nil {
			scheme = "https"
			client = &http.Client{Transport: &http.Transport{TLSClientConfig: cfg, DisableKeepAlives: true}}
		}
	}
	at := time.Now()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, scheme+"://"+ep+"/metrics", nil)
	if err != nil {
		return sample{}, err
	}
	req.Header.Set("Accept", string(expfmt.NewFormat(expfmt.TypeTextPlain)))
	resp, err := client.Do(req)
	if err != nil {
		return sample{}, fmt.Errorf("scrape %s: %w", ep, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return sample{}, fmt.Errorf("scrape %s: HTTP %d", ep, resp.StatusCode)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(io.LimitReader(resp.Body, maxScrapeBytes))
	if err != nil {
		return sample{}, fmt.Errorf("scrape %s: %w", ep, err)
	}
	return sample{at: at, versions: reduce(fams)}, nil
}

// reduce sums the families the gates read by model and version, live traffic only.
func reduce(fams map[string]*dto.MetricFamily) map[mvKey]*counts {
	out := map[mvKey]*counts{}
	get := func(m *dto.Metric) (*counts, map[string]string, bool) {
		l := map[string]string{}
		for _, p := range m.GetLabel() {
			l[p.GetName()] = p.GetValue()
		}
		if t, ok := l["traffic"]; ok && t != "live" {
			return nil, nil, false
		}
		k := mvKey{l["model"], l["version"]}
		c := out[k]
		if c == nil {
			c = &counts{outputs: map[string]hist{}}
			out[k] = c
		}
		return c, l, true
	}
	value := func(m *dto.Metric) float64 {
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Untyped != nil:
			return m.Untyped.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		}
		return math.NaN()
	}
	for name, f := range fams {
		for _, m := range f.GetMetric() {
			switch name {
			case MetricRequests, MetricErrors:
				c, _, ok := get(m)
				if !ok {
					continue
				}
				v := value(m)
				if math.IsNaN(v) {
					continue
				}
				if name == MetricRequests {
					c.requests += v
				} else {
					c.errors += v
				}
			case MetricDuration, MetricOutput:
				if m.Histogram == nil {
					continue
				}
				c, l, ok := get(m)
				if !ok {
					continue
				}
				if name == MetricDuration {
					c.duration.add(m.Histogram)
				} else {
					h := c.outputs[l["output"]]
					h.add(m.Histogram)
					c.outputs[l["output"]] = h
				}
			}
		}
	}
	return out
}
