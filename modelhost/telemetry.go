package modelhost

import (
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// instruments are the host's OpenTelemetry instruments. Per-version attribute sets
// are built once at load, so recording on the hot path does not allocate them.
type instruments struct {
	requests  metric.Int64Counter
	errors    metric.Int64Counter
	latency   metric.Float64Histogram
	batchRows metric.Int64Histogram
	queue     metric.Float64Histogram
	// refused counts requests turned away by the in-flight bounds (or a full batch queue)
	// before they reached a model, by protocol.
	refused                  metric.Int64Counter
	refusedREST, refusedGRPC metric.MeasurementOption
}

type versionAttrs struct {
	base           metric.MeasurementOption // model, version
	rest           metric.MeasurementOption // + protocol=rest
	grpc           metric.MeasurementOption // + protocol=grpc
	model, version string
}

func newInstruments(m metric.Meter) (*instruments, error) {
	var in instruments
	var err error
	if in.requests, err = m.Int64Counter("patchbay_modelhost_requests",
		metric.WithDescription("Inference requests, by model, version and protocol.")); err != nil {
		return nil, err
	}
	if in.errors, err = m.Int64Counter("patchbay_modelhost_request_errors",
		metric.WithDescription("Inference requests that failed, by model, version, protocol and code.")); err != nil {
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
	in.refusedREST = metric.WithAttributeSet(attribute.NewSet(attribute.String("protocol", "rest")))
	in.refusedGRPC = metric.WithAttributeSet(attribute.NewSet(attribute.String("protocol", "grpc")))
	return &in, nil
}

func (in *instruments) versionAttrs(model, version string) versionAttrs {
	mv := []attribute.KeyValue{attribute.String("model", model), attribute.String("version", version)}
	with := func(proto string) metric.MeasurementOption {
		return metric.WithAttributeSet(attribute.NewSet(append(mv[:2:2], attribute.String("protocol", proto))...))
	}
	return versionAttrs{base: metric.WithAttributeSet(attribute.NewSet(mv...)), rest: with("rest"), grpc: with("grpc"), model: model, version: version}
}

// errorAttrs is built per failed request (not the hot path).
func errorAttrs(model, version, protocol, code string) metric.MeasurementOption {
	return metric.WithAttributes(attribute.String("model", model), attribute.String("version", version),
		attribute.String("protocol", protocol), attribute.String("code", code))
}
