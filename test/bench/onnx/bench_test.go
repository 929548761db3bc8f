//go:build cgo

// The onnx runtime behind the model host against ONNX
// Runtime called directly from Go, and dynamic batching on vs off. Each figure is a
// ratio against a baseline measured in the same run; none is a pass/fail timing test.
//
//	go test -run '^$' -bench . -benchtime 2000x ./test/bench/onnx/
package onnxbench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	ort "github.com/yalue/onnxruntime_go"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/modelhost"
	"github.com/patchbay-io/patchbay/modelhost/runtime/onnx"
)

const mlp = "../../fixtures/onnx/mlp"

func need(tb testing.TB) {
	if _, err := onnx.FindLibrary(""); err != nil {
		tb.Skipf("skipped: %v", err)
	}
}

func write(tb testing.TB, path string, b []byte) {
	tb.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		tb.Fatal(err)
	}
}

// repo: mlp (the fixture MLP, 8 features -> 3 classes) and mlp-batched (the same behind
// the dynamic batcher, up to 64 rows, 500 µs).
func repo(tb testing.TB) string {
	r := tb.TempDir()
	m, err := os.ReadFile(filepath.Join(mlp, "model.onnx"))
	if err != nil {
		tb.Fatal(err)
	}
	y, err := os.ReadFile(filepath.Join(mlp, "model.yaml"))
	if err != nil {
		tb.Fatal(err)
	}
	write(tb, filepath.Join(r, "mlp", "v1", "model.onnx"), m)
	write(tb, filepath.Join(r, "mlp", "v1", "model.yaml"), y)
	write(tb, filepath.Join(r, "mlp-batched", "v1", "model.onnx"), m)
	write(tb, filepath.Join(r, "mlp-batched", "v1", "model.yaml"), append(y, "batching: {max_batch_size: 64, max_delay: 500us}\n"...))
	return r
}

type addrs struct{ http, grpc string }

func startHost(tb testing.TB) addrs {
	tb.Helper()
	srv, err := modelhost.New(modelhost.Config{Repository: repo(tb), Logger: zerolog.Nop()})
	if err != nil {
		tb.Fatal(err)
	}
	hl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	gl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = srv.Serve(ctx, hl, gl); close(done) }()
	tb.Cleanup(func() { cancel(); <-done })
	return addrs{http: "http://" + hl.Addr().String(), grpc: gl.Addr().String()}
}

// row is one MLP input row (the fixture's first batch-1 case).
var row = []float32{0.5, -0.25, 1, 0, 1.5, -1, 0.25, 2}

// direct is ONNX Runtime called from Go without the host: a session with the host's
// default options, the input tensor made and the output read and released per call,
// as the runtime does.
type direct struct {
	sess *ort.DynamicAdvancedSession
}

func newDirect(tb testing.TB, opts onnx.Options) *direct {
	tb.Helper()
	if _, _, err := onnx.Describe(onnx.Config{}, filepath.Join(mlp, "model.onnx")); err != nil { // loads the library once
		tb.Fatal(err)
	}
	so, err := ort.NewSessionOptions()
	if err != nil {
		tb.Fatal(err)
	}
	defer so.Destroy()
	level := map[string]ort.GraphOptimizationLevel{"disable": ort.GraphOptimizationLevelDisableAll, "basic": ort.GraphOptimizationLevelEnableBasic,
		"extended": ort.GraphOptimizationLevelEnableExtended, "all": ort.GraphOptimizationLevelEnableAll}[opts.GraphOptimization]
	if err := so.SetIntraOpNumThreads(opts.IntraOpThreads); err != nil {
		tb.Fatal(err)
	}
	if err := so.SetInterOpNumThreads(opts.InterOpThreads); err != nil {
		tb.Fatal(err)
	}
	if err := so.SetGraphOptimizationLevel(level); err != nil {
		tb.Fatal(err)
	}
	s, err := ort.NewDynamicAdvancedSession(filepath.Join(mlp, "model.onnx"), []string{"features"}, []string{"probabilities"}, so)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Destroy() })
	return &direct{sess: s}
}

func (d *direct) run(tb testing.TB, x []float32) {
	in, err := ort.NewTensor(ort.NewShape(int64(len(x)/8), 8), x)
	if err != nil {
		tb.Fatal(err)
	}
	out := []ort.Value{nil}
	if err := d.sess.Run([]ort.Value{in}, out); err != nil {
		tb.Fatal(err)
	}
	_ = out[0].(*ort.Tensor[float32]).GetData()
	out[0].Destroy()
	in.Destroy()
}

// noopOIP answers ModelInfer with a fixed response (the transport floor).
type noopOIP struct {
	oip.UnimplementedGRPCInferenceServiceServer
	resp *oip.ModelInferResponse
}

func (n *noopOIP) ModelInfer(context.Context, *oip.ModelInferRequest) (*oip.ModelInferResponse, error) {
	return n.resp, nil
}

// rounds times each function k calls at a time, rotating which goes first, and returns
// the median ns per call of each over the rounds (robust to load spikes).
func rounds(n int, fns ...func()) []float64 {
	per := make([][]float64, len(fns))
	for i, done := 0, 0; done < n; i++ {
		k := min(50, n-done)
		for j := range fns {
			f := (i + j) % len(fns)
			start := time.Now()
			for range k {
				fns[f]()
			}
			per[f] = append(per[f], float64(time.Since(start).Nanoseconds())/float64(k))
		}
		done += k
	}
	out := make([]float64, len(fns))
	for i := range per {
		out[i] = median(per[i])
	}
	return out
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	return s[len(s)/2]
}

// BenchmarkONNXInfer: the MLP at batch 1 through the host over gRPC and REST, against
// ONNX Runtime called directly from Go on the same row, and against a no-op grpc-go
// ModelInfer (the transport floor). ratio = direct / host time (what the host adds is
// everything but the model: loopback, HTTP/2 or HTTP/1.1, protobuf or JSON, the host's
// checks); floor-ratio = (no-op gRPC + direct) / host gRPC time: 1.0 means the host adds
// nothing beyond a bare grpc-go call and the model itself.
func BenchmarkONNXInfer(b *testing.B) {
	need(b)
	h := startHost(b)
	d := newDirect(b, onnx.DefaultOptions())
	gs := grpc.NewServer()
	oip.RegisterGRPCInferenceServiceServer(gs, &noopOIP{resp: &oip.ModelInferResponse{ModelName: "mlp", ModelVersion: "v1",
		Outputs: []*oip.ModelInferResponse_InferOutputTensor{{Name: "probabilities", Datatype: "FP32", Shape: []int64{1, 3}, Contents: &oip.InferTensorContents{Fp32Contents: []float32{0.2, 0.3, 0.5}}}}}})
	nl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	go func() { _ = gs.Serve(nl) }()
	defer gs.Stop()
	dial := func(addr string) oip.GRPCInferenceServiceClient {
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { conn.Close() })
		return oip.NewGRPCInferenceServiceClient(conn)
	}
	noop, host := dial(nl.Addr().String()), dial(h.grpc)
	req := &oip.ModelInferRequest{ModelName: "mlp", Inputs: []*oip.ModelInferRequest_InferInputTensor{{
		Name: "features", Datatype: "FP32", Shape: []int64{1, 8}, Contents: &oip.InferTensorContents{Fp32Contents: row}}}}
	call := func(c oip.GRPCInferenceServiceClient) func() {
		return func() {
			if _, err := c.ModelInfer(context.Background(), req); err != nil {
				b.Fatal(err)
			}
		}
	}
	body, _ := json.Marshal(map[string]any{"inputs": []map[string]any{{"name": "features", "datatype": "FP32", "shape": []int{1, 8}, "data": row}}})
	hc := &http.Client{}
	rest := func() {
		resp, err := hc.Post(h.http+"/v2/models/mlp/infer", "application/json", bytes.NewReader(body))
		if err != nil {
			b.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			b.Fatalf("REST infer: %d", resp.StatusCode)
		}
	}
	dr := func() { d.run(b, row) }
	for _, f := range []func(){dr, call(noop), call(host), rest} { // warm up
		for range 20 {
			f()
		}
	}
	b.ResetTimer()
	t := rounds(b.N, dr, call(noop), call(host), rest)
	dNs, noopNs, gNs, rNs := t[0], t[1], t[2], t[3]
	b.ReportMetric(dNs, "direct-ns/req")
	b.ReportMetric(noopNs, "noop-grpc-ns/req")
	b.ReportMetric(gNs, "grpc-ns/req")
	b.ReportMetric(rNs, "rest-ns/req")
	b.ReportMetric(dNs/gNs, "grpc-ratio")
	b.ReportMetric(dNs/rNs, "rest-ratio")
	b.ReportMetric((noopNs+dNs)/gNs, "grpc-floor-ratio")
	if b.N >= 100 {
		b.Logf("MLP batch 1: ONNX Runtime direct %.1f µs; host gRPC %.1f µs (no-op grpc-go %.1f µs), REST %.1f µs; direct/host: gRPC %.2f, REST %.2f; (no-op gRPC + direct)/host gRPC %.2f",
			dNs/1e3, gNs/1e3, noopNs/1e3, rNs/1e3, dNs/gNs, dNs/rNs, (noopNs+dNs)/gNs)
	}
}

// BenchmarkONNXBatching: 64 concurrent REST clients sending one row each, the MLP with
// dynamic batching on (up to 64 rows, 500 µs) vs off. ratio = median over rounds of
// throughput on / off.
func BenchmarkONNXBatching(b *testing.B) {
	need(b)
	h := startHost(b)
	const clients = 64
	body, _ := json.Marshal(map[string]any{"inputs": []map[string]any{{"name": "features", "datatype": "FP32", "shape": []int{1, 8}, "data": row}}})
	c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: clients, MaxConnsPerHost: clients}}
	run := func(model string, total int) float64 {
		url := h.http + "/v2/models/" + model + "/infer"
		var next atomic.Int64
		var wg sync.WaitGroup
		start := time.Now()
		for range clients {
			wg.Go(func() {
				for next.Add(1) <= int64(total) {
					resp, err := c.Post(url, "application/json", bytes.NewReader(body))
					if err != nil {
						b.Error(err)
						return
					}
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						b.Errorf("%s: %d", model, resp.StatusCode)
						return
					}
				}
			})
		}
		wg.Wait()
		return float64(total) / time.Since(start).Seconds()
	}
	run("mlp", 256)
	run("mlp-batched", 256)
	b.ResetTimer()
	const nr = 6
	per := max(b.N/nr, 512)
	var offs, ons, ratios []float64
	for i := range nr {
		var off, on float64
		if i%2 == 0 {
			off, on = run("mlp", per), run("mlp-batched", per)
		} else {
			on, off = run("mlp-batched", per), run("mlp", per)
		}
		offs, ons, ratios = append(offs, off), append(ons, on), append(ratios, on/off)
	}
	b.ReportMetric(median(offs), "unbatched-req/s")
	b.ReportMetric(median(ons), "batched-req/s")
	b.ReportMetric(median(ratios), "ratio")
	if b.N >= 100 {
		b.Logf("MLP, %d REST clients: batching off %.0f req/s, on %.0f req/s (medians of %d rounds), ratio %.2f", clients, median(offs), median(ons), nr, median(ratios))
	}
}

// BenchmarkONNXSessionOptions measures the defaults: ONNX Runtime directly, the MLP
// at batch 1 and 64, one caller and 8 concurrent callers, for intra-op threads 1, 2
// and 0 (ONNX Runtime's default: one per core) and graph optimisation all vs disable.
func BenchmarkONNXSessionOptions(b *testing.B) {
	need(b)
	x64 := make([]float32, 64*8)
	for i := range x64 {
		x64[i] = row[i%8]
	}
	for _, o := range []onnx.Options{
		{IntraOpThreads: 1, InterOpThreads: 1, GraphOptimization: "all"},
		{IntraOpThreads: 2, InterOpThreads: 1, GraphOptimization: "all"},
		{IntraOpThreads: 0, InterOpThreads: 0, GraphOptimization: "all"},
		{IntraOpThreads: 1, InterOpThreads: 1, GraphOptimization: "disable"},
	} {
		for _, batch := range []struct {
			name string
			x    []float32
		}{{"batch1", row}, {"batch64", x64}} {
			for _, callers := range []int{1, 8} {
				b.Run(fmt.Sprintf("intra%d/opt-%s/%s/callers%d", o.IntraOpThreads, o.GraphOptimization, batch.name, callers), func(b *testing.B) {
					d := newDirect(b, o)
					b.SetParallelism(1)
					if callers == 1 {
						for range b.N {
							d.run(b, batch.x)
						}
						return
					}
					b.SetParallelism(callers) // x GOMAXPROCS goroutines
					b.RunParallel(func(pb *testing.PB) {
						for pb.Next() {
							d.run(b, batch.x)
						}
					})
				})
			}
		}
	}
}
