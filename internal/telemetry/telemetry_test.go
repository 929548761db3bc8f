package telemetry

import (
	"bytes"
	"context"
	"io"
	"net/http/httptest"
	"strings"
	"testing"

	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

func TestMetricsExposeOwnRegistry(t *testing.T) {
	a, err := NewMetrics()
	if err != nil {
		t.Fatal(err)
	}
	b, err := NewMetrics()
	if err != nil {
		t.Fatal(err)
	}
	c, _ := a.Meter("t").Int64Counter("only_in_a")
	c.Add(context.Background(), 3)
	get := func(m *Metrics) string {
		rec := httptest.NewRecorder()
		m.Handler.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
		body, _ := io.ReadAll(rec.Body)
		return string(body)
	}
	for _, runtimeGauge := range []string{"go_goroutines ", "go_memstats_heap_inuse_bytes ", "process_open_fds ", "process_resident_memory_bytes "} {
		if !strings.Contains(get(a), runtimeGauge) {
			t.Fatalf("/metrics has no %q (the Go runtime's and the process's gauges)", runtimeGauge)
		}
	}
	if !strings.Contains(get(a), "only_in_a_total 3") {
		t.Fatalf("counter missing:\n%s", get(a))
	}
	if strings.Contains(get(b), "only_in_a") {
		t.Fatal("registries are shared between processes' providers")
	}
}

func TestLogger(t *testing.T) {
	var buf bytes.Buffer
	log, err := NewLogger(&buf, "warn")
	if err != nil {
		t.Fatal(err)
	}
	log.Info().Msg("hidden")
	log.Warn().Msg("shown")
	if strings.Contains(buf.String(), "hidden") || !strings.Contains(buf.String(), "shown") {
		t.Fatalf("level not applied: %s", buf.String())
	}
	if _, err := NewLogger(&buf, "loud"); err == nil {
		t.Fatal("bad level accepted")
	}
}

func TestTracerProvider(t *testing.T) {
	tp, stop, err := NewTracerProvider(context.Background(), "t", "", 1)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := tp.(noop.TracerProvider); !ok {
		t.Fatalf("no endpoint gave %T, want a no-op provider", tp)
	}
	stop(context.Background())
	tp, stop, err = NewTracerProvider(context.Background(), "t", "127.0.0.1:4317", 1)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := tp.(*sdktrace.TracerProvider); !ok {
		t.Fatalf("endpoint gave %T, want the SDK provider", tp)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // do not wait for the absent collector
	stop(ctx)
}

// scrape returns the Prometheus text the handler serves.
func scrape(t *testing.T, m *Metrics) string {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	return string(body)
}

func TestMetricsCarryServiceName(t *testing.T) {
	t.Setenv("OTEL_SERVICE_NAME", "")
	t.Setenv("OTEL_RESOURCE_ATTRIBUTES", "")
	m, err := NewMetrics(Service("patchbay-test"))
	if err != nil {
		t.Fatal(err)
	}
	c, _ := m.Meter("t").Int64Counter("some")
	c.Add(context.Background(), 1)
	text := scrape(t, m)
	var info string
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, "target_info{") {
			info = line
		}
	}
	if !strings.Contains(info, `service_name="patchbay-test"`) {
		t.Fatalf("target_info = %q, want service_name=\"patchbay-test\"\n%s", info, text)
	}
	if strings.Contains(text, "unknown_service") {
		t.Fatalf("unknown_service still exported:\n%s", text)
	}
}

func TestServiceNameFromEnvironmentWins(t *testing.T) {
	t.Setenv("OTEL_SERVICE_NAME", "from-env")
	if got := Resource("patchbay-test").Attributes(); !hasAttr(got, "service.name", "from-env") {
		t.Fatalf("resource %v: OTEL_SERVICE_NAME not honoured", got)
	}
	t.Setenv("OTEL_SERVICE_NAME", "")
	if got := Resource("patchbay-test").Attributes(); !hasAttr(got, "service.name", "patchbay-test") {
		t.Fatalf("resource %v, want service.name=patchbay-test", got)
	}
}

func hasAttr(kvs []attribute.KeyValue, key, value string) bool {
	for _, kv := range kvs {
		if string(kv.Key) == key && kv.Value.AsString() == value {
			return true
		}
	}
	return false
}
