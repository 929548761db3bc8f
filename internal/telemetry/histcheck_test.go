package telemetry

import (
	"context"
	"strings"
	"testing"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// TestHistogramUnitProblems records into real histograms, scrapes the Prometheus
// handler and checks that each kind of unit mistake is named and good ones are not.
func TestHistogramUnitProblems(t *testing.T) {
	m, err := NewMetrics(Service("patchbay-test"))
	if err != nil {
		t.Fatal(err)
	}
	meter := m.Meter("t")
	ctx := context.Background()
	hist := func(name string, opts ...metric.Float64HistogramOption) metric.Float64Histogram {
		h, err := meter.Float64Histogram(name, opts...)
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	secs := metric.WithExplicitBucketBoundaries(0.001, 0.01, 0.1, 1, 10)
	// The SDK's default bounds (0, 5, …, 10000) on a seconds metric: xds's old apply histogram.
	hist("a_default_bounds_seconds", metric.WithUnit("s")).Record(ctx, 0.003)
	// Millisecond values recorded into second bounds.
	hist("b_ms_values_seconds", metric.WithUnit("s"), secs).Record(ctx, 250)
	// Everything in the first bucket.
	hist("c_coarse_seconds", metric.WithUnit("s"), metric.WithExplicitBucketBoundaries(1, 2, 5)).Record(ctx, 0.0002)
	// No unit on a duration.
	hist("d_request_duration", secs).Record(ctx, 0.02)
	// Good: second bounds, values spread, two series.
	good := hist("e_good_seconds", metric.WithUnit("s"), secs)
	good.Record(ctx, 0.0005, metric.WithAttributes(attribute.String("model", "a")))
	good.Record(ctx, 0.05, metric.WithAttributes(attribute.String("model", "a")))
	good.Record(ctx, 0.05, metric.WithAttributes(attribute.String("model", "b")))
	// Good: an unobserved seconds histogram and a count histogram.
	hist("f_idle_seconds", metric.WithUnit("s"), secs)
	hist("g_batch_size", metric.WithExplicitBucketBoundaries(1, 2, 4)).Record(ctx, 3)

	text := scrape(t, m)
	problems := strings.Join(HistogramUnitProblems(text), "\n")
	for _, want := range []string{
		"a_default_bounds_seconds{}: largest bucket bound 10000 s looks like milliseconds",
		"b_ms_values_seconds{}: all 1 observations are above the largest bound 10 s",
		"c_coarse_seconds{}: all 1 observations fall into the first bucket (le=1)",
		"d_request_duration measures time but has no unit suffix",
	} {
		if !strings.Contains(problems, want) {
			t.Errorf("problems lack %q:\n%s\n--- scrape:\n%s", want, problems, text)
		}
	}
	for _, ok := range []string{"e_good", "f_idle", "g_batch"} {
		if strings.Contains(problems, ok) {
			t.Errorf("%s wrongly reported:\n%s", ok, problems)
		}
	}
	if n := len(HistogramUnitProblems(text)); n != 4 {
		t.Errorf("%d problems, want 4:\n%s", n, problems)
	}
}
