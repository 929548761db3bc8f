package modelhost_test

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/internal/telemetry"
	"github.com/patchbay-io/patchbay/modelhost"
)

// nopWriter is a ResponseWriter that keeps nothing, so the measurement is the host's.
type nopWriter struct {
	h    http.Header
	code int
}

func (w *nopWriter) Header() http.Header         { return w.h }
func (w *nopWriter) Write(b []byte) (int, error) { return len(b), nil }
func (w *nopWriter) WriteHeader(code int)        { w.code = code }

func lin16Repo(t testing.TB, batching string) string {
	repo := t.TempDir()
	writeFile(t, filepath.Join(repo, "lin", "v1", "linear.json"), `{"link":"logistic","weights":[`+strings.Repeat("0.1,", 15)+`0.1],"bias":0}`)
	writeFile(t, filepath.Join(repo, "lin", "v1", "model.yaml"), "runtime: linear\nartifact: linear.json\n"+
		"inputs: [{name: x, datatype: FP32, shape: [-1, 16]}]\noutputs: [{name: y, datatype: FP32, shape: [-1]}]\n"+batching)
	return repo
}

func inferBody(rows int) []byte {
	var b strings.Builder
	b.WriteString(`{"id":"a","inputs":[{"name":"x","datatype":"FP32","shape":[`)
	b.WriteString(strings.TrimSpace(strings.Repeat(" ", 0)) + itoa(rows) + `,16],"data":[`)
	for i := range rows * 16 {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString("0.25")
	}
	b.WriteString("]}]}")
	return []byte(b.String())
}

func itoa(n int) string {
	if n == 0 {
		return "0"
	}
	var d []byte
	for ; n > 0; n /= 10 {
		d = append([]byte{byte('0' + n%10)}, d...)
	}
	return string(d)
}

func newHandler(t testing.TB, repo string) http.Handler {
	srv, err := modelhost.New(modelhost.Config{Repository: repo, Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	return srv.Handler()
}

// BenchmarkRESTHandler is the host's own cost of a 16-float REST infer, in process
// (routing, decode, checks, model, encode), without the network.
func BenchmarkRESTHandler(b *testing.B) {
	h := newHandler(b, lin16Repo(b, ""))
	body := inferBody(1)
	req := httptest.NewRequest("POST", "/v2/models/lin/infer", nil)
	w := &nopWriter{h: http.Header{}}
	rd := bytes.NewReader(body)
	b.ReportAllocs()
	for b.Loop() {
		rd.Reset(body)
		req.Body = nopCloser{rd}
		h.ServeHTTP(w, req)
	}
	if w.code != 0 && w.code != 200 {
		b.Fatalf("status %d", w.code)
	}
}

type nopCloser struct{ *bytes.Reader }

func (nopCloser) Close() error { return nil }

// TestRESTInferAllocsBounded: the REST infer path's allocations do not grow with the
// tensor size (1 row vs 256 rows of 16 floats) and stay small.
func TestRESTInferAllocsBounded(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts are not meaningful under the race detector")
	}
	for _, meter := range []string{"noop", "sdk"} {
		t.Run(meter, func(t *testing.T) { restAllocs(t, meter == "sdk") })
	}
}

// restAllocs measures a REST infer's allocations; with sdk, through the real OpenTelemetry
// SDK and Prometheus exporter, so the output histogram (one Record per value) is counted.
func restAllocs(t *testing.T, sdk bool) {
	var h http.Handler
	if sdk {
		metrics, err := telemetry.NewMetrics()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { metrics.Shutdown(context.Background()) })
		srv, err := modelhost.New(modelhost.Config{Repository: lin16Repo(t, ""), Logger: zerolog.Nop(), MeterProvider: metrics.Provider})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(srv.Close)
		h = srv.Handler()
	} else {
		h = newHandler(t, lin16Repo(t, ""))
	}
	measure := func(rows int) float64 {
		body := inferBody(rows)
		req := httptest.NewRequest("POST", "/v2/models/lin/infer", nil)
		w := &nopWriter{h: http.Header{}}
		rd := bytes.NewReader(body)
		run := func() {
			rd.Reset(body)
			req.Body = nopCloser{rd}
			h.ServeHTTP(w, req)
		}
		run()
		if w.code != 0 && w.code != 200 {
			t.Fatalf("status %d", w.code)
		}
		return testing.AllocsPerRun(200, run)
	}
	small, large := measure(1), measure(256)
	t.Logf("allocs per REST infer: 1 row %.0f, 256 rows %.0f", small, large)
	// 13 before the metric options were prebuilt and untraced requests stopped making a
	// span context, 7 after.
	if small > 9 || large > small+2 {
		t.Errorf("allocs: %v for 1 row, %v for 256 rows; want <= 9 and not growing with the data", small, large)
	}
}

// BenchmarkRESTHandlerMetrics is BenchmarkRESTHandler through the real OpenTelemetry SDK
// (what a deployed host pays for its metrics, the output histogram's Record per value
// included), with 1 and 64 rows.
func BenchmarkRESTHandlerMetrics(b *testing.B) {
	for _, rows := range []int{1, 64} {
		b.Run(itoa(rows)+"rows", func(b *testing.B) {
			metrics, err := telemetry.NewMetrics()
			if err != nil {
				b.Fatal(err)
			}
			defer metrics.Shutdown(context.Background())
			srv, err := modelhost.New(modelhost.Config{Repository: lin16Repo(b, ""), Logger: zerolog.Nop(), MeterProvider: metrics.Provider})
			if err != nil {
				b.Fatal(err)
			}
			defer srv.Close()
			h := srv.Handler()
			body := inferBody(rows)
			req := httptest.NewRequest("POST", "/v2/models/lin/infer", nil)
			w := &nopWriter{h: http.Header{}}
			rd := bytes.NewReader(body)
			b.ReportAllocs()
			for b.Loop() {
				rd.Reset(body)
				req.Body = nopCloser{rd}
				h.ServeHTTP(w, req)
			}
			if w.code != 0 && w.code != 200 {
				b.Fatalf("status %d", w.code)
			}
		})
	}
}

// BenchmarkGRPCInferServed is a 16-float ModelInfer over a real loopback gRPC connection to a
// served host with the SDK meter provider (as `patchbay modelhost` runs): the transport, the
// tap, telemetry and the handler. It is what to profile (-cpuprofile) for the host's
// per-request cost; test/bench/modelhost compares it with a no-op grpc-go server.
func BenchmarkGRPCInferServed(b *testing.B) {
	h := startHost(b, lin16Repo(b, ""), nil)
	x := make([]float32, 16)
	req := &oip.ModelInferRequest{ModelName: "lin", Id: "bench", Inputs: []*oip.ModelInferRequest_InferInputTensor{{
		Name: "x", Datatype: "FP32", Shape: []int64{1, 16}, Contents: &oip.InferTensorContents{Fp32Contents: x}}}}
	if _, err := h.grpc.ModelInfer(context.Background(), req); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := h.grpc.ModelInfer(context.Background(), req); err != nil {
			b.Fatal(err)
		}
	}
}
