package modelhost

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/tap"

	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/internal/telemetry"
)

// BenchmarkGRPCModelInferMethod is the host's own cost of a 16-float ModelInfer
// (conversion, checks, model, response), without grpc-go's transport.
func BenchmarkGRPCModelInferMethod(b *testing.B) {
	repo := b.TempDir()
	dir := filepath.Join(repo, "lin", "v1")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "linear.json"), []byte(`{"link":"logistic","weights":[`+strings.Repeat("0.1,", 15)+`0.1],"bias":0}`), 0o644)
	os.WriteFile(filepath.Join(dir, "model.yaml"), []byte("runtime: linear\nartifact: linear.json\ninputs: [{name: x, datatype: FP32, shape: [-1, 16]}]\noutputs: [{name: y, datatype: FP32, shape: [-1]}]\n"), 0o644)
	s, err := New(Config{Repository: repo, Logger: zerolog.Nop()})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	g := &grpcService{s: s}
	req := &oip.ModelInferRequest{ModelName: "lin", Id: "x", Inputs: []*oip.ModelInferRequest_InferInputTensor{{
		Name: "x", Datatype: "FP32", Shape: []int64{1, 16}, Contents: &oip.InferTensorContents{Fp32Contents: make([]float32, 16)}}}}
	ctx := grpc.NewContextWithServerTransportStream(context.Background(), nopStream{})
	b.ReportAllocs()
	for b.Loop() {
		if _, err := g.ModelInfer(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
}

// TestGRPCModelInferAllocsBounded bounds the host's own allocations for a 16-float
// ModelInfer through the OpenTelemetry SDK (the meter `patchbay modelhost` runs with) and
// the no-op tracer (no --otlp): the request's tensors, the response, the model's output.
// The counters' and histograms' option slices are built at load and an untraced request
// makes no span context, so none of those allocates (17 allocations before, 11 after).
func TestGRPCModelInferAllocsBounded(t *testing.T) {
	if raceInternal {
		t.Skip("allocation counts are not meaningful under the race detector")
	}
	metrics, err := telemetry.NewMetrics()
	if err != nil {
		t.Fatal(err)
	}
	defer metrics.Shutdown(context.Background())
	repo := t.TempDir()
	dir := filepath.Join(repo, "lin", "v1")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "linear.json"), []byte(`{"link":"logistic","weights":[`+strings.Repeat("0.1,", 15)+`0.1],"bias":0}`), 0o644)
	os.WriteFile(filepath.Join(dir, "model.yaml"), []byte("runtime: linear\nartifact: linear.json\ninputs: [{name: x, datatype: FP32, shape: [-1, 16]}]\noutputs: [{name: y, datatype: FP32, shape: [-1]}]\n"), 0o644)
	s, err := New(Config{Repository: repo, Logger: zerolog.Nop(), MeterProvider: metrics.Provider})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	g := &grpcService{s: s}
	req := &oip.ModelInferRequest{ModelName: "lin", Id: "x", Inputs: []*oip.ModelInferRequest_InferInputTensor{{
		Name: "x", Datatype: "FP32", Shape: []int64{1, 16}, Contents: &oip.InferTensorContents{Fp32Contents: make([]float32, 16)}}}}
	ctx := metadata.NewIncomingContext(grpc.NewContextWithServerTransportStream(context.Background(), nopStream{}),
		metadata.Pairs(":authority", "lin:8001", "content-type", "application/grpc", "user-agent", "grpc-go"))
	run := func() {
		if _, err := g.ModelInfer(ctx, req); err != nil {
			t.Fatal(err)
		}
	}
	run()
	n := testing.AllocsPerRun(200, run)
	t.Logf("allocs per gRPC ModelInfer (host's own): %.0f", n)
	if n > 12 {
		t.Errorf("%v allocations per ModelInfer, want <= 12", n)
	}
}

// nopStream stands in for grpc-go's stream so SetHeader works as in a real call.
type nopStream struct{}

func (nopStream) Method() string               { return "/inference.GRPCInferenceService/ModelInfer" }
func (nopStream) SetHeader(metadata.MD) error  { return nil }
func (nopStream) SendHeader(metadata.MD) error { return nil }
func (nopStream) SetTrailer(metadata.MD) error { return nil }

// TestTrafficOfHost: Envoy's shadow suffix sits before the port (shadow_writer_impl.cc,
// shadowAppendedHost), also for IPv6 literals.
func TestTrafficOfHost(t *testing.T) {
	for host, want := range map[string]traffic{
		"": live, "ranker": live, "ranker-shadow": shadow, "ranker-shadow:8000": shadow, "ranker:8000-shadow": live,
		"[::1]-shadow:80": shadow, "[::1]:80": live, "10.0.0.1-shadow:9": shadow, "shadow": live, "x-shadow": shadow,
	} {
		if got := trafficOfHost(host); got != want {
			t.Errorf("trafficOfHost(%q) = %v, want %v", host, got, want)
		}
	}
}

// BenchmarkGRPCTap is the in-flight admission of one ModelInfer stream (the tap grpc-go runs
// under its transport lock) and its end, on a context made as grpc-go makes a stream's.
func BenchmarkGRPCTap(b *testing.B) {
	s, err := New(Config{Repository: b.TempDir(), Logger: zerolog.Nop()})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	info := &tap.Info{FullMethodName: modelInferMethod}
	md := metadata.Pairs(":authority", "lin:8001")
	b.ReportAllocs()
	for b.Loop() {
		sctx, cancel := context.WithCancel(context.Background())
		ctx, err := s.tap(metadata.NewIncomingContext(sctx, md), info)
		if err != nil {
			b.Fatal(err)
		}
		if end := received(ctx); end != nil {
			end()
		}
		cancel()
	}
}
