package telemetry

import (
	"bytes"
	"context"
	"io"
	"net/http/httptest"
	"strings"
	"testing"

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
