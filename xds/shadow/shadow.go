// Package shadow is the control plane's side of shadow comparison: model hosts stream
// sampled prediction records (patchbay.shadow.v1.Records/Send), and a Comparator pairs
// each shadow record (a request Envoy mirrored to a shadow version) with the live record
// of the same request id, then keeps, per model, shadow version and output, the class
// agreement, the absolute differences of values and the latency difference.
//
// Memory is bounded whatever the rate: at most MaxPending requests wait for their
// partner (the oldest give way, counted as evicted) and a request waits at most Expiry
// (then counted as expired).
package shadow

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"sort"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	shadowv1 "github.com/patchbay-io/patchbay/api/shadow/v1"
)

// Defaults of Config.
const (
	DefaultMaxPending = 4096
	DefaultExpiry     = 30 * time.Second
)

// Bounds on one record (a record outside them is rejected and counted).
const (
	maxIDLen      = 256
	maxNameLen    = 128
	maxOutputs    = 16
	maxValues     = 16
	maxShadowsPer = 8 // shadow records of one request waiting for its live record
	// maxValue and maxLatency keep the sums finite whatever the rate.
	maxValue   = 1e12
	maxLatency = 3600.0
)

// Config configures a Comparator. Zero values take the defaults.
type Config struct {
	// MaxPending bounds the requests whose records wait for their partner (default
	// DefaultMaxPending); beyond it the oldest is dropped.
	MaxPending int
	// Expiry is how long a record waits for its partner (default DefaultExpiry). A live
	// record stays this long after pairing too, for further shadows of the same request.
	Expiry time.Duration
	// Meter, if set, receives the patchbay_xds_shadow_* metrics (see RegisterMetrics).
	Meter metric.Meter
	// Authorize, if set, is called at the start of each Send stream (e.g. to check the
	// peer's certificate role); an error refuses the stream with it.
	Authorize func(ctx context.Context) error
	// Now is the clock (default time.Now); tests move it.
	Now func() time.Time
}

// Comparator implements patchbay.shadow.v1.Records and compares the records it receives.
type Comparator struct {
	shadowv1.UnimplementedRecordsServer
	cfg Config

	mu      sync.Mutex
	pending map[pendingKey]*entry
	order   list.List // *entry, oldest first (arrival order, so also expiry order)
	stats   map[statKey]*stat
	counts  Counters
}

type pendingKey struct{ model, id string }

type entry struct {
	key     pendingKey
	live    *shadowv1.Record
	shadows []*shadowv1.Record
	paired  bool
	at      time.Time
	elem    *list.Element
}

type statKey struct{ model, version, output string }

type stat struct {
	pairs, classPairs, classAgree, values uint64
	absSum, absMax, latSum                float64
}

// Counters are the comparator's record counts since start.
type Counters struct {
	Received uint64 `json:"received"`
	Rejected uint64 `json:"rejected"` // malformed or over the bounds
	Pairs    uint64 `json:"pairs"`    // shadow records paired with their live record
	Expired  uint64 `json:"expired"`  // requests whose records waited Expiry without a partner
	Evicted  uint64 `json:"evicted"`  // unpaired requests dropped for MaxPending
	Pending  int    `json:"pending"`  // requests held now (paired live records included)
	Unpaired int    `json:"unpaired"` // of those, still waiting for a partner
}

// Result is the comparison of one output of one shadow version against the live
// version(s) of the same requests. The sums are cumulative, so a caller can take deltas
// over a window (an analysis step); the means are over all time.
type Result struct {
	Model   string `json:"model"`
	Version string `json:"version"` // the shadow version
	Output  string `json:"output"`
	Pairs   uint64 `json:"pairs"`
	// Class outputs: requests whose class (both sides) was compared, and agreed.
	ClassPairs      uint64   `json:"classPairs"`
	ClassAgreements uint64   `json:"classAgreements"`
	Agreement       *float64 `json:"agreement,omitempty"` // ClassAgreements / ClassPairs
	// Values compared position by position (the first up to 16 of each tensor).
	ValuesCompared uint64  `json:"valuesCompared"`
	AbsDiffSum     float64 `json:"absDiffSum"`
	MeanAbsDiff    float64 `json:"meanAbsDiff"`
	MaxAbsDiff     float64 `json:"maxAbsDiff"`
	// Shadow latency minus live latency, summed over pairs, and its mean (seconds).
	LatencyDiffSum         float64 `json:"latencyDiffSumSeconds"`
	MeanLatencyDiffSeconds float64 `json:"meanLatencyDiffSeconds"`
}

// Status is what /status shows.
type Status struct {
	Records Counters `json:"records"`
	Outputs []Result `json:"outputs"`
}

// New returns a Comparator; with cfg.Meter set its metrics are registered.
func New(cfg Config) (*Comparator, error) {
	if cfg.MaxPending <= 0 {
		cfg.MaxPending = DefaultMaxPending
	}
	if cfg.Expiry <= 0 {
		cfg.Expiry = DefaultExpiry
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	c := &Comparator{cfg: cfg, pending: map[pendingKey]*entry{}, stats: map[statKey]*stat{}}
	if cfg.Meter != nil {
		if err := c.RegisterMetrics(cfg.Meter); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// Register serves patchbay.shadow.v1.Records on g (the control plane's ADS server).
func (c *Comparator) Register(g *grpc.Server) { shadowv1.RegisterRecordsServer(g, c) }

// Send receives one host's stream of records and answers with what it made of them.
func (c *Comparator) Send(st grpc.ClientStreamingServer[shadowv1.Record, shadowv1.Summary]) error {
	if c.cfg.Authorize != nil {
		if err := c.cfg.Authorize(st.Context()); err != nil {
			if _, ok := status.FromError(err); ok {
				return err
			}
			return status.Error(codes.PermissionDenied, err.Error())
		}
	}
	var sum shadowv1.Summary
	for {
		rec, err := st.Recv()
		if errors.Is(err, io.EOF) {
			return st.SendAndClose(&sum)
		}
		if err != nil {
			return err
		}
		sum.Received++
		if c.Add(rec) != nil {
			sum.Rejected++
		}
	}
}

// Validate checks a record against the protocol's bounds.
func Validate(r *shadowv1.Record) error {
	switch {
	case r.GetRequestId() == "" || len(r.GetRequestId()) > maxIDLen:
		return fmt.Errorf("request_id: %d bytes, want 1..%d", len(r.GetRequestId()), maxIDLen)
	case r.GetModel() == "" || len(r.GetModel()) > maxNameLen:
		return fmt.Errorf("model: %d bytes, want 1..%d", len(r.GetModel()), maxNameLen)
	case r.GetVersion() == "" || len(r.GetVersion()) > maxNameLen:
		return fmt.Errorf("version: %d bytes, want 1..%d", len(r.GetVersion()), maxNameLen)
	case r.GetTraffic() != shadowv1.Traffic_TRAFFIC_LIVE && r.GetTraffic() != shadowv1.Traffic_TRAFFIC_SHADOW:
		return fmt.Errorf("traffic: %v, want live or shadow", r.GetTraffic())
	case len(r.GetOutputs()) > maxOutputs:
		return fmt.Errorf("outputs: %d, at most %d", len(r.GetOutputs()), maxOutputs)
	case !(r.GetLatencySeconds() >= 0 && r.GetLatencySeconds() <= maxLatency):
		return fmt.Errorf("latency_seconds: %v, want 0..%v", r.GetLatencySeconds(), maxLatency)
	}
	for i, o := range r.GetOutputs() {
		switch {
		case o.GetName() == "" || len(o.GetName()) > maxNameLen:
			return fmt.Errorf("outputs[%d].name: %d bytes, want 1..%d", i, len(o.GetName()), maxNameLen)
		case len(o.GetValues()) > maxValues:
			return fmt.Errorf("outputs[%d].values: %d, at most %d", i, len(o.GetValues()), maxValues)
		}
		for j, v := range o.GetValues() {
			if math.Abs(v) > maxValue { // NaN (a missing value) passes and is not compared
				return fmt.Errorf("outputs[%d].values[%d]: %v, want a magnitude up to %v", i, j, v, maxValue)
			}
		}
		for _, p := range r.GetOutputs()[:i] {
			if p.GetName() == o.GetName() {
				return fmt.Errorf("outputs[%d].name: %q twice", i, o.GetName())
			}
		}
	}
	return nil
}

// Add takes one record: it is paired with the waiting record of the same model and
// request id of the other traffic, or waits for it. A malformed record is rejected.
func (c *Comparator) Add(r *shadowv1.Record) error {
	err := Validate(r)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.counts.Received++
	if err != nil {
		c.counts.Rejected++
		return err
	}
	now := c.cfg.Now()
	c.expire(now)
	k := pendingKey{r.GetModel(), r.GetRequestId()}
	e := c.pending[k]
	if e == nil {
		e = &entry{key: k, at: now}
		e.elem = c.order.PushBack(e)
		c.pending[k] = e
		for len(c.pending) > c.cfg.MaxPending {
			c.drop(c.order.Front().Value.(*entry), &c.counts.Evicted)
		}
	}
	if r.GetTraffic() == shadowv1.Traffic_TRAFFIC_LIVE {
		if e.live != nil {
			c.counts.Rejected++
			return errors.New("a live record of this request was already received")
		}
		e.live = r
		for _, s := range e.shadows {
			c.pair(e.live, s)
			e.paired = true
		}
		e.shadows = nil
		return nil
	}
	if e.live != nil {
		c.pair(e.live, r)
		e.paired = true
		return nil
	}
	if len(e.shadows) >= maxShadowsPer {
		c.counts.Rejected++
		return fmt.Errorf("more than %d shadow records of one request", maxShadowsPer)
	}
	e.shadows = append(e.shadows, r)
	return nil
}

// expire drops the requests that have waited Expiry, oldest first.
func (c *Comparator) expire(now time.Time) {
	for f := c.order.Front(); f != nil; f = c.order.Front() {
		e := f.Value.(*entry)
		if now.Sub(e.at) < c.cfg.Expiry {
			return
		}
		c.drop(e, &c.counts.Expired)
	}
}

// drop removes a pending request; one still unpaired is counted in lost.
func (c *Comparator) drop(e *entry, lost *uint64) {
	c.order.Remove(e.elem)
	delete(c.pending, e.key)
	if !e.paired {
		*lost++
	}
}

// pair compares a shadow record with the live record of the same request.
func (c *Comparator) pair(live, sh *shadowv1.Record) {
	c.counts.Pairs++
	lat := sh.GetLatencySeconds() - live.GetLatencySeconds()
	for _, so := range sh.GetOutputs() {
		var lo *shadowv1.Output
		for _, o := range live.GetOutputs() {
			if o.GetName() == so.GetName() {
				lo = o
				break
			}
		}
		if lo == nil {
			continue
		}
		k := statKey{sh.GetModel(), sh.GetVersion(), so.GetName()}
		st := c.stats[k]
		if st == nil {
			st = &stat{}
			c.stats[k] = st
		}
		st.pairs++
		st.latSum += lat
		if so.GetHasClass() && lo.GetHasClass() {
			st.classPairs++
			if so.GetClassIndex() == lo.GetClassIndex() {
				st.classAgree++
			}
		}
		a, b := so.GetValues(), lo.GetValues()
		for i := range min(len(a), len(b)) {
			d := math.Abs(a[i] - b[i])
			if math.IsNaN(d) || math.IsInf(d, 0) {
				continue
			}
			st.values++
			st.absSum += d
			st.absMax = max(st.absMax, d)
		}
	}
}

// Results returns the record counters and the comparison of every output, ordered by
// model, shadow version and output.
func (c *Comparator) Results() Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.expire(c.cfg.Now())
	out := Status{Records: c.counts, Outputs: make([]Result, 0, len(c.stats))}
	out.Records.Pending = len(c.pending)
	for _, e := range c.pending {
		if !e.paired {
			out.Records.Unpaired++
		}
	}
	for k, st := range c.stats {
		r := Result{Model: k.model, Version: k.version, Output: k.output, Pairs: st.pairs, ClassPairs: st.classPairs,
			ClassAgreements: st.classAgree, ValuesCompared: st.values, AbsDiffSum: st.absSum, MaxAbsDiff: st.absMax, LatencyDiffSum: st.latSum}
		if st.classPairs > 0 {
			a := float64(st.classAgree) / float64(st.classPairs)
			r.Agreement = &a
		}
		if st.values > 0 {
			r.MeanAbsDiff = st.absSum / float64(st.values)
		}
		if st.pairs > 0 {
			r.MeanLatencyDiffSeconds = st.latSum / float64(st.pairs)
		}
		out.Outputs = append(out.Outputs, r)
	}
	sort.Slice(out.Outputs, func(i, j int) bool {
		a, b := out.Outputs[i], out.Outputs[j]
		if a.Model != b.Model {
			return a.Model < b.Model
		}
		if a.Version != b.Version {
			return a.Version < b.Version
		}
		return a.Output < b.Output
	})
	return out
}

// RegisterMetrics registers the comparator's metrics on m (New does it when Config.Meter
// is set): by model, version (the shadow's) and output, the counters
// patchbay_xds_shadow_pairs_total, _class_pairs_total, _class_agreements_total,
// _values_compared_total, _abs_diff_sum_total and the gauges patchbay_xds_shadow_agreement
// (ratio), _abs_diff_mean, _abs_diff_max, _latency_diff_seconds (mean, shadow - live);
// patchbay_xds_shadow_records_total{result=received|rejected|expired|evicted} and the
// gauge patchbay_xds_shadow_pending{state=paired|unpaired}.
func (c *Comparator) RegisterMetrics(m metric.Meter) error {
	var errs []error
	ic := func(name, desc string) metric.Int64ObservableCounter {
		i, err := m.Int64ObservableCounter(name, metric.WithDescription(desc))
		errs = append(errs, err)
		return i
	}
	fc := func(name, desc string) metric.Float64ObservableCounter {
		i, err := m.Float64ObservableCounter(name, metric.WithDescription(desc))
		errs = append(errs, err)
		return i
	}
	fg := func(name, desc string, opts ...metric.Float64ObservableGaugeOption) metric.Float64ObservableGauge {
		i, err := m.Float64ObservableGauge(name, append(opts, metric.WithDescription(desc))...)
		errs = append(errs, err)
		return i
	}
	pairs := ic("patchbay_xds_shadow_pairs", "Shadow records paired with the live record of the same request, by model, shadow version and output.")
	classPairs := ic("patchbay_xds_shadow_class_pairs", "Pairs whose class output was compared, by model, shadow version and output.")
	agreements := ic("patchbay_xds_shadow_class_agreements", "Pairs whose shadow and live classes agreed, by model, shadow version and output.")
	values := ic("patchbay_xds_shadow_values_compared", "Output values compared position by position, by model, shadow version and output.")
	absSum := fc("patchbay_xds_shadow_abs_diff_sum", "Sum of absolute differences of compared output values, by model, shadow version and output.")
	agreement := fg("patchbay_xds_shadow_agreement", "Class agreement of the shadow with the live version (0..1), by model, shadow version and output.")
	absMean := fg("patchbay_xds_shadow_abs_diff_mean", "Mean absolute difference of compared output values, by model, shadow version and output.")
	absMax := fg("patchbay_xds_shadow_abs_diff_max", "Largest absolute difference of compared output values, by model, shadow version and output.")
	latency := fg("patchbay_xds_shadow_latency_diff", "Mean host latency of the shadow minus the live version's over pairs, by model, shadow version and output.", metric.WithUnit("s"))
	records := ic("patchbay_xds_shadow_records", "Prediction records by result: received, rejected (malformed), expired and evicted (unpaired, dropped after the expiry or for the pending bound).")
	pending, err := m.Int64ObservableGauge("patchbay_xds_shadow_pending", metric.WithDescription("Requests whose records the comparator holds, by state (paired: a live record kept for further shadows; unpaired: waiting for a partner)."))
	errs = append(errs, err)
	if err := errors.Join(errs...); err != nil {
		return err
	}
	_, err = m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		st := c.Results()
		for _, r := range st.Outputs {
			at := metric.WithAttributeSet(attribute.NewSet(attribute.String("model", r.Model), attribute.String("version", r.Version), attribute.String("output", r.Output)))
			o.ObserveInt64(pairs, int64(r.Pairs), at)
			o.ObserveInt64(classPairs, int64(r.ClassPairs), at)
			o.ObserveInt64(agreements, int64(r.ClassAgreements), at)
			o.ObserveInt64(values, int64(r.ValuesCompared), at)
			o.ObserveFloat64(absSum, r.AbsDiffSum, at)
			if r.Agreement != nil {
				o.ObserveFloat64(agreement, *r.Agreement, at)
			}
			if r.ValuesCompared > 0 {
				o.ObserveFloat64(absMean, r.MeanAbsDiff, at)
				o.ObserveFloat64(absMax, r.MaxAbsDiff, at)
			}
			o.ObserveFloat64(latency, r.MeanLatencyDiffSeconds, at)
		}
		for res, n := range map[string]uint64{"received": st.Records.Received, "rejected": st.Records.Rejected, "expired": st.Records.Expired, "evicted": st.Records.Evicted} {
			o.ObserveInt64(records, int64(n), metric.WithAttributes(attribute.String("result", res)))
		}
		o.ObserveInt64(pending, int64(st.Records.Pending-st.Records.Unpaired), metric.WithAttributes(attribute.String("state", "paired")))
		o.ObserveInt64(pending, int64(st.Records.Unpaired), metric.WithAttributes(attribute.String("state", "unpaired")))
		return nil
	}, pairs, classPairs, agreements, values, absSum, agreement, absMean, absMax, latency, records, pending)
	return err
}
