// Package telemetry builds the per-process logger and OpenTelemetry meter provider that
// every patchbay component is given. Each process owns its own Prometheus registry:
// there are no package-level metric globals.
package telemetry

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rs/zerolog"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/metric"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/resource"
	semconv "go.opentelemetry.io/otel/semconv/v1.37.0"
)

// NewLogger returns a JSON zerolog logger at level ("debug", "info", "warn", "error").
func NewLogger(w io.Writer, level string) (zerolog.Logger, error) {
	lvl, err := zerolog.ParseLevel(strings.ToLower(level))
	if err != nil || level == "" {
		return zerolog.Logger{}, fmt.Errorf("log level %q: want debug, info, warn or error", level)
	}
	return zerolog.New(w).Level(lvl).With().Timestamp().Logger(), nil
}

// Metrics is a process's meter provider and the HTTP handler that exposes it.
type Metrics struct {
	Provider *sdkmetric.MeterProvider
	Handler  http.Handler
}

// Option configures NewMetrics.
type Option func(*options)

type options struct{ service string }

// Service sets the OpenTelemetry service.name of a process's metrics (the resource,
// exported on /metrics as target_info{service_name="..."}). Each part passes its own:
// patchbay-xds, patchbay-extproc, patchbay-modelhost.
func Service(name string) Option { return func(o *options) { o.service = name } }

// Resource describes the process as service (service.name) plus the SDK's attributes.
// OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, when set, take precedence, as the
// OpenTelemetry spec asks. An empty service leaves the SDK's default
// (unknown_service:<executable>).
func Resource(service string) *resource.Resource {
	if service == "" {
		return resource.Default()
	}
	res, err := resource.New(context.Background(),
		resource.WithTelemetrySDK(),
		resource.WithAttributes(semconv.ServiceName(service)),
		resource.WithFromEnv(), // detected last, so the environment wins
	)
	if err != nil {
		// A malformed OTEL_RESOURCE_ATTRIBUTES gives a partial resource or a schema
		// conflict; the service name is what must not be lost.
		return resource.NewSchemaless(semconv.ServiceName(service))
	}
	return res
}

// NewMetrics builds a meter provider exporting to a fresh Prometheus registry.
func NewMetrics(opts ...Option) (*Metrics, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	reg := prometheus.NewRegistry()
	// The Go runtime's and the process's own gauges (go_memstats_*, go_goroutines,
	// process_resident_memory_bytes, process_open_fds ...): heap, goroutines and file
	// descriptors are what a soak or a capacity check watches.
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	exp, err := otelprom.New(otelprom.WithRegisterer(reg), otelprom.WithoutScopeInfo())
	if err != nil {
		return nil, fmt.Errorf("prometheus exporter: %w", err)
	}
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exp), sdkmetric.WithResource(Resource(o.service)))
	return &Metrics{
		Provider: mp,
		Handler:  promhttp.HandlerFor(reg, promhttp.HandlerOpts{}),
	}, nil
}

// Meter returns a named meter from the provider.
func (m *Metrics) Meter(name string) metric.Meter { return m.Provider.Meter(name) }

// Shutdown flushes and stops the provider.
func (m *Metrics) Shutdown(ctx context.Context) error { return m.Provider.Shutdown(ctx) }
