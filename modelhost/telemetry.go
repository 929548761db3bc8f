package modelhost

import (
	"context"
	"math"
	"strconv"
	"strings"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

// instruments are the host's OpenTelemetry instruments. Per-version attribute sets
// are built once at load, so recording on the hot path does not allocate them.
type instruments struct {
	meterProvider metric.MeterProvider
	requests      metric.Int64Counter
	errors        metric.Int64Counter
	latency       metric.Float64Histogram
	batchRows     metric.Int64Histogram
	queue         metric.Float64Histogram
	// refused counts requests turned away by the in-flight bounds (or a full batch queue)
	// before they reached a model, by protocol.
	refused                  metric.Int64Counter
	refusedREST, refusedGRPC metric.MeasurementOption
	// shadowDropped counts prediction records dropped because the queue to the control
	// plane was full (the stream slow or down).
	shadowDropped metric.Int64Counter
	shadowSent    metric.Int64Counter
	// contractRefusals counts requests refused because an input broke the model's
	// contract.yaml, by model, version and input.
	contractRefusals metric.Int64Counter
	// outputs holds one patchbay_modelhost_output histogram per bucket layout (see
	// outputHistogram); written only under Server.mu (loads are serialised).
	outputs map[string]metric.Float64Histogram
}

// traffic says whether a request is live or a copy Envoy mirrored to a shadow.
type traffic uint8

const (
	live traffic = iota
	shadow
)

func (t traffic) String() string {
	if t == shadow {
		return "shadow"
	}
	return "live"
}

// trafficOfHost tells a mirrored request by its Host / :authority. Envoy's shadow writer
// appends "-shadow" to the host part, before any port ("ranker:8000" becomes
// "ranker-shadow:8000"): envoy source/common/router/shadow_writer_impl.cc,
// shadowAppendedHost, applied unless the mirror policy sets
// disable_shadow_host_suffix_append (then a mirror passes as live).
func trafficOfHost(host string) traffic {
	if host == "" {
		return live
	}
	h := host
	if h[0] == '[' { // [v6]:port, [v6]-shadow:port or [v6]
		if i, j := strings.LastIndexByte(h, ']'), strings.LastIndexByte(h, ':'); i >= 0 && j > i {
			h = h[:j]
		}
	} else if i := strings.LastIndexByte(h, ':'); i >= 0 && strings.IndexByte(h, ':') == i {
		h = h[:i]
	}
	if strings.HasSuffix(h, "-shadow") {
		return shadow
	}
	return live
}

// versionAttrs are a version's attribute sets as ready option slices: passing a slice with
// ... costs no allocation, where a fresh variadic slice escaping through the instrument's
// interface call costs one per Add or Record (3 a request: BenchmarkGRPCInferServed, 200 ->
// 197 allocs/op with the client's).
type versionAttrs struct {
	base []metric.RecordOption // model, version
	// rest and grpc are indexed by traffic: model, version, protocol, traffic.
	rest, grpc     [2]protoAttrs
	model, version string
}

// protoAttrs holds one attribute set for the counters (add) and the histograms (rec).
type protoAttrs struct {
	add []metric.AddOption
	rec []metric.RecordOption
}

// outputHist records the values of one output tensor of a version.
type outputHist struct {
	h metric.Float64Histogram
	// attrs holds, by traffic, the options (model, version, output, traffic) as a ready
	// slice: passing it with ... costs no allocation, where a fresh variadic slice escaping
	// through the interface call would cost one per value.
	attrs  [2][]metric.RecordOption
	counts bool // numeric datatype: its values are recorded
}

// DefaultOutputBuckets are the output histogram's bounds when model.yaml gives none: 20
// equal buckets over [0, 1] (scores and probabilities), +Inf implied.
func DefaultOutputBuckets() []float64 {
	b := make([]float64, 20)
	for i := range b {
		b[i] = float64(i+1) / 20
	}
	return b
}

func newInstruments(mp metric.MeterProvider) (*instruments, error) {
	m := mp.Meter("github.com/patchbay-io/patchbay/modelhost")
	in := instruments{meterProvider: mp, outputs: map[string]metric.Float64Histogram{}}
	var err error
	if in.requests, err = m.Int64Counter("patchbay_modelhost_requests",
		metric.WithDescription("Inference requests, by model, version, protocol and traffic (live or shadow).")); err != nil {
		return nil, err
	}
	if in.errors, err = m.Int64Counter("patchbay_modelhost_request_errors",
		metric.WithDescription("Inference requests that failed, by model, version, protocol, code and traffic.")); err != nil {
		return nil, err
	}
	if in.latency, err = m.Float64Histogram("patchbay_modelhost_request_duration", metric.WithUnit("s"),
		metric.WithDescription("Inference request latency, decode to encode."),
		// 5 µs (a small built-in model answers in tens of µs) to 10 s (a large one).
		metric.WithExplicitBucketBoundaries(0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)); err != nil {
		return nil, err
	}
	if in.batchRows, err = m.Int64Histogram("patchbay_modelhost_batch_size",
		metric.WithDescription("Rows per model call (after dynamic batching)."),
		metric.WithExplicitBucketBoundaries(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)); err != nil {
		return nil, err
	}
	if in.queue, err = m.Float64Histogram("patchbay_modelhost_queue_duration", metric.WithUnit("s"),
		metric.WithDescription("Time a request waited in the dynamic batcher."),
		// Up to 1 s: batching.max_delay may be as long, and a busy queue waits longer.
		metric.WithExplicitBucketBoundaries(0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)); err != nil {
		return nil, err
	}
	if in.refused, err = m.Int64Counter("patchbay_modelhost_refused",
		metric.WithDescription("Inference requests refused because the host was at its in-flight bounds, by protocol.")); err != nil {
		return nil, err
	}
	if in.shadowDropped, err = m.Int64Counter("patchbay_modelhost_shadow_records_dropped",
		metric.WithDescription("Sampled prediction records dropped because the queue to the control plane was full.")); err != nil {
		return nil, err
	}
	if in.contractRefusals, err = m.Int64Counter("patchbay_modelhost_contract_refusals",
		metric.WithDescription("Inference requests refused because an input broke the model's contract.yaml, by model, version and input.")); err != nil {
		return nil, err
	}
	if in.shadowSent, err = m.Int64Counter("patchbay_modelhost_shadow_records_sent",
		metric.WithDescription("Prediction records sent to the control plane's shadow comparison.")); err != nil {
		return nil, err
	}
	in.refusedREST = metric.WithAttributeSet(attribute.NewSet(attribute.String("protocol", "rest")))
	in.refusedGRPC = metric.WithAttributeSet(attribute.NewSet(attribute.String("protocol", "grpc")))
	return &in, nil
}

func (in *instruments) versionAttrs(model, version string) versionAttrs {
	mv := []attribute.KeyValue{attribute.String("model", model), attribute.String("version", version)}
	with := func(proto string, t traffic) protoAttrs {
		o := metric.WithAttributeSet(attribute.NewSet(append(mv[:2:2], attribute.String("protocol", proto), attribute.String("traffic", t.String()))...))
		return protoAttrs{add: []metric.AddOption{o}, rec: []metric.RecordOption{o}}
	}
	return versionAttrs{base: []metric.RecordOption{metric.WithAttributeSet(attribute.NewSet(mv...))},
		rest:  [2]protoAttrs{with("rest", live), with("rest", shadow)},
		grpc:  [2]protoAttrs{with("grpc", live), with("grpc", shadow)},
		model: model, version: version}
}

// outputHistogram returns the patchbay_modelhost_output instrument for a bucket layout.
// An OpenTelemetry instrument has one layout, so each layout gets its own meter (scope)
// under the same metric name; the Prometheus exporter runs without scope labels
// (internal/telemetry), so they expose as one metric family whose series (one per model,
// version, output) each keep their own buckets. Called under Server.mu.
func (in *instruments) outputHistogram(bounds []float64) (metric.Float64Histogram, error) {
	var key strings.Builder
	for i, b := range bounds {
		if i > 0 {
			key.WriteByte(',')
		}
		key.WriteString(strconv.FormatFloat(b, 'g', -1, 64))
	}
	if h, ok := in.outputs[key.String()]; ok {
		return h, nil
	}
	m := in.meterProvider.Meter("github.com/patchbay-io/patchbay/modelhost/output", metric.WithInstrumentationVersion("buckets:"+key.String()))
	h, err := m.Float64Histogram("patchbay_modelhost_output",
		metric.WithDescription("Values of each numeric output tensor of successful inferences, by model, version, output and traffic (buckets: model.yaml outputs[].buckets)."),
		metric.WithExplicitBucketBoundaries(bounds...))
	if err != nil {
		return nil, err
	}
	in.outputs[key.String()] = h
	return h, nil
}

// outputHists builds the per-output histograms and attribute sets of a loaded version.
func (in *instruments) outputHists(spec *versionSpec) ([]outputHist, error) {
	out := make([]outputHist, len(spec.Outputs))
	for i, o := range spec.Outputs {
		bounds := DefaultOutputBuckets()
		if i < len(spec.OutputBuckets) && spec.OutputBuckets[i] != nil {
			bounds = spec.OutputBuckets[i]
		}
		h, err := in.outputHistogram(bounds)
		if err != nil {
			return nil, err
		}
		kv := func(t traffic) []metric.RecordOption {
			return []metric.RecordOption{metric.WithAttributeSet(attribute.NewSet(attribute.String("model", spec.Model), attribute.String("version", spec.Version),
				attribute.String("output", o.Name), attribute.String("traffic", t.String())))}
		}
		out[i] = outputHist{h: h, attrs: [2][]metric.RecordOption{kv(live), kv(shadow)}, counts: numeric(o.Datatype)}
	}
	return out, nil
}

func numeric(dt tensor.Datatype) bool {
	switch dt {
	case tensor.BOOL, tensor.BYTES:
		return false
	}
	return true
}

// record observes every value of an output tensor; NaN and infinities are skipped (they
// have no bucket). One OpenTelemetry Record per value, no allocation of our own.
func (o *outputHist) record(ctx context.Context, t *tensor.Tensor, tr traffic) {
	if !o.counts {
		return
	}
	opt := o.attrs[tr]
	switch {
	case t.F32 != nil:
		for _, x := range t.F32 {
			if f := float64(x); !math.IsNaN(f) && !math.IsInf(f, 0) {
				o.h.Record(ctx, f, opt...)
			}
		}
	case t.F64 != nil:
		for _, f := range t.F64 {
			if !math.IsNaN(f) && !math.IsInf(f, 0) {
				o.h.Record(ctx, f, opt...)
			}
		}
	case t.F16 != nil:
		for _, x := range t.F16 {
			if f := tensor.F16ToFloat64(x); !math.IsNaN(f) && !math.IsInf(f, 0) {
				o.h.Record(ctx, f, opt...)
			}
		}
	case t.I64 != nil:
		for _, x := range t.I64 {
			o.h.Record(ctx, float64(x), opt...)
		}
	case t.U64 != nil:
		for _, x := range t.U64 {
			o.h.Record(ctx, float64(x), opt...)
		}
	}
}

// errorAttrs is built per failed request (not the hot path).
func errorAttrs(model, version, protocol, code string, t traffic) metric.MeasurementOption {
	return metric.WithAttributes(attribute.String("model", model), attribute.String("version", version),
		attribute.String("protocol", protocol), attribute.String("code", code), attribute.String("traffic", t.String()))
}
