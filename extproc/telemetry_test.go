package extproc

import (
	"context"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/patchbay-io/patchbay/api/headers"
	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
	"github.com/patchbay-io/patchbay/internal/telemetry"
)

// counts sums an Int64 sum metric by the rendering of chosen attributes.
func counts(t *testing.T, rm metricdata.ResourceMetrics, name string, keys ...attribute.Key) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name != name {
				continue
			}
			for _, dp := range m.Data.(metricdata.Sum[int64]).DataPoints {
				k := ""
				for _, key := range keys {
					v, _ := dp.Attributes.Value(key)
					k += v.AsString() + "/"
				}
				out[k] += dp.Value
			}
		}
	}
	return out
}

func TestMetrics(t *testing.T) {
	t.Parallel()
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	h := startServer(t, Config{Meter: mp.Meter("test")}, testPolicy("c1"))

	treated := userIn(t, func(id string) bool {
		return slot("L1", id) < 2000 && policyv1.Hash("ltv", id)%100 >= 30 && slot("L2", id) >= 5000
	})
	nobody := userIn(t, func(id string) bool { return slot("L1", id) >= 2000 && slot("L2", id) >= 5000 })
	send := func(n int, kv ...string) {
		for range n {
			if _, err := h.exchange(t, reqHeaders(true, kv...)); err != nil {
				t.Fatal(err)
			}
		}
	}
	send(3, ":path", "/v2/models/ranker/infer", headers.UserID, treated)
	send(2, ":path", "/v2/models/ranker/infer", headers.UserID, nobody)
	send(4, ":path", "/v2/models/ranker/infer")
	send(1, ":path", "/v2/models/nope/infer")
	send(1, ":path", "/v2/models/thumbs/versions/v2", headers.UserID, "u")

	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	check := func(name string, want map[string]int64, keys ...attribute.Key) {
		t.Helper()
		got := counts(t, rm, name, keys...)
		for k, v := range want {
			if got[k] != v {
				t.Errorf("%s[%s] = %d, want %d (all: %v)", name, k, got[k], v, got)
			}
		}
	}
	check("patchbay_extproc_decisions", map[string]int64{
		"ranker/v8/experiment/": 3, "ranker//split/": 6, "thumbs/v2/pin/": 1,
	}, "model", "version", "source")
	check("patchbay_extproc_exposures", map[string]int64{"ranker/ltv/treatment/": 3}, "model", "experiment", "arm")
	check("patchbay_extproc_anonymous", map[string]int64{"ranker/": 4}, "model")
	check("patchbay_extproc_rejected", map[string]int64{"unknown_model/": 1}, "reason")
	check("patchbay_extproc_policy_updates", map[string]int64{"accepted/": 1}, "result")
	var hist int
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name == "patchbay_extproc_decision_duration_seconds" {
				for _, dp := range m.Data.(metricdata.Histogram[float64]).DataPoints {
					hist += int(dp.Count)
				}
			}
		}
	}
	if hist != 11 {
		t.Errorf("latency histogram has %d samples, want 11", hist)
	}
}

func TestTracing(t *testing.T) {
	t.Parallel()
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	h := startServer(t, Config{TracerProvider: tp}, testPolicy("c1"))

	const parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	got, err := h.exchange(t, reqHeaders(true, ":path", "/v2/models/ranker/infer", headers.UserID, "u1", "traceparent", parent))
	if err != nil {
		t.Fatal(err)
	}
	spans := rec.Ended()
	if len(spans) != 1 {
		t.Fatalf("%d spans, want 1", len(spans))
	}
	sp := spans[0]
	if sp.Parent().TraceID().String() != "4bf92f3577b34da6a3ce929d0e0e4736" || sp.Parent().SpanID().String() != "00f067aa0ba902b7" {
		t.Errorf("span parent = %v, want the request's traceparent", sp.Parent())
	}
	attrs := map[attribute.Key]attribute.Value{}
	for _, kv := range sp.Attributes() {
		attrs[kv.Key] = kv.Value
	}
	if attrs["patchbay.model"].AsString() != "ranker" || uint64(attrs["patchbay.bucket"].AsInt64()) != policyv1.Hash("ranker-salt", "u1") {
		t.Errorf("span attributes = %v", attrs)
	}
	var injected string
	for _, hv := range got[0].GetRequestHeaders().GetResponse().GetHeaderMutation().GetSetHeaders() {
		if hv.GetHeader().GetKey() == "traceparent" {
			injected = string(hv.GetHeader().GetRawValue())
			if hv.GetAppend() == nil || hv.GetAppend().GetValue() || hv.GetAppendAction() != corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD {
				t.Error("traceparent must overwrite")
			}
		}
	}
	want := "00-" + sp.SpanContext().TraceID().String() + "-" + sp.SpanContext().SpanID().String() + "-01"
	if injected != want {
		t.Errorf("injected traceparent %q, want %q", injected, want)
	}
}

// TestHandlerAllocations reports what the ext_proc layer around the zero-allocation
// decision costs: nothing, once the stream gives its answer back after Send (as
// Process does), with the no-op meter and with the OpenTelemetry SDK.
func TestHandlerAllocations(t *testing.T) {
	for _, name := range []string{"noop-meter", "sdk-meter"} {
		cfg := Config{}
		if name == "sdk-meter" {
			cfg.Meter = sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader())).Meter("test")
		}
		srv, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if err := srv.SetPolicy(testPolicy("c1")); err != nil {
			t.Fatal(err)
		}
		hdrs := benchRequest("u42")
		var st streamState
		n := testing.AllocsPerRun(1000, func() {
			if srv.requestHeaders(context.Background(), &st, hdrs.GetRequestHeaders()) == nil {
				t.Fatal("no answer")
			}
			st.release()
		})
		t.Logf("%s: %.1f allocations per headers answer", name, n)
		if n != 0 {
			t.Errorf("%s: %.1f allocations per answer, want 0", name, n)
		}
	}
}

func benchRequest(user string) *extprocv3.ProcessingRequest {
	return reqHeaders(false, ":authority", "edge.example", ":path", "/v2/models/ranker/infer", ":method", "POST", ":scheme", "http",
		"content-type", "application/json", "content-length", "412", "user-agent", "client/1.0",
		"x-request-id", "0d2b5f0e-5e9b-4a8f-9c53-1f2a3b4c5d6e", "x-forwarded-proto", "http",
		headers.UserID, user, "x-envoy-expected-rq-timeout-ms", "2000")
}

// BenchmarkHandleHeaders measures one request-headers answer: the decision, the answer
// and the metrics, with the no-op meter and with the OpenTelemetry SDK. The "-parallel"
// variants run on every P with a context as deep as a gRPC stream's (the exemplar filter
// walks it), as the server does.
func BenchmarkHandleHeaders(b *testing.B) {
	for _, name := range []string{"noop-meter", "sdk-meter", "noop-meter-parallel", "sdk-meter-parallel"} {
		b.Run(name, func(b *testing.B) {
			cfg := Config{}
			if strings.HasPrefix(name, "sdk-meter") {
				cfg.Meter = sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader())).Meter("bench")
			}
			srv, err := New(cfg)
			if err != nil {
				b.Fatal(err)
			}
			if err := srv.SetPolicy(testPolicy("c1")); err != nil {
				b.Fatal(err)
			}
			reqs := make([]*extprocv3.ProcessingRequest, 1024)
			for i := range reqs {
				reqs[i] = benchRequest("user-" + strconv.Itoa(i))
			}
			b.ReportAllocs()
			if strings.HasSuffix(name, "-parallel") {
				ctx := context.Background()
				for i := range 10 {
					ctx = context.WithValue(ctx, ctxKey(i), i)
				}
				b.RunParallel(func(pb *testing.PB) {
					var st streamState
					i := 0
					for pb.Next() {
						srv.requestHeaders(ctx, &st, reqs[i&1023].GetRequestHeaders())
						st.release()
						i++
					}
				})
				return
			}
			ctx := context.Background()
			var st streamState
			i := 0
			for b.Loop() {
				srv.requestHeaders(ctx, &st, reqs[i&1023].GetRequestHeaders())
				st.release() // as Process does once Send has marshalled the answer
				i++
			}
		})
	}
}

type ctxKey int

// TestHistogramUnits scrapes the Prometheus exposition after real decisions and checks
// every histogram's buckets against its unit (decision latency is in seconds).
func TestHistogramUnits(t *testing.T) {
	t.Parallel()
	m, err := telemetry.NewMetrics(telemetry.Service("patchbay-extproc"))
	if err != nil {
		t.Fatal(err)
	}
	h := startServer(t, Config{Meter: m.Meter("test")}, testPolicy("c1"))
	for i := range 20 {
		if _, err := h.exchange(t, reqHeaders(true, ":path", "/v2/models/ranker/infer", headers.UserID, "u"+strconv.Itoa(i))); err != nil {
			t.Fatal(err)
		}
	}
	rec := httptest.NewRecorder()
	m.Handler.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	text := rec.Body.String()
	if !strings.Contains(text, "patchbay_extproc_decision_duration_seconds_bucket") {
		t.Fatalf("no decision histogram on /metrics:\n%s", text)
	}
	telemetry.CheckHistogramUnits(t, text)
}
