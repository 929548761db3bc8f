// The onnx runtime behind the model host as shipped (the patchbay binary, the default
// cgo build, in its own process with default flags) against ONNX Runtime called directly
// from Go in this process, and dynamic batching on vs off. Each figure is a ratio against
// a baseline measured in the same run; none is a pass/fail timing test.
//
//	go test -run '^$' -bench 'ONNXInfer|ONNXBatching' -benchtime 2000x ./test/bench/onnx/
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

	ort "github.com/yalue/onnxruntime_go"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/modelhost/runtime/onnx"
	"github.com/patchbay-io/patchbay/test/harness"
)

// TestMain builds the patchbay binary once (on the first harness.Binary call) and removes
// it. Run as `<test binary> noop-oip GRPC HTTP` it is the no-op floor's own process instead.
func TestMain(m *testing.M) {
	if len(os.Args) == 4 && os.Args[1] == "noop-oip" {
		os.Exit(serveNoop(os.Args[2], os.Args[3]))
	}
	os.Exit(harness.Main(m))
}

// serveNoop is the transport floor in a process of its own, like the host: grpc-go
// answering ModelInfer with a fixed response of the model's output shape (a row of 1/n),
// and GET /ready on httpAddr for the harness. It runs until it is signalled.
func serveNoop(grpcAddr, httpAddr string) int {
	gl, err := net.Listen("tcp", grpcAddr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	hl, err := net.Listen("tcp", httpAddr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	n := &noopOIP{resp: map[string]*oip.ModelInferResponse{}}
	for _, m := range []struct {
		name string
		out  int
	}{{"mlp", 3}, {"mlp-large", 10}} {
		probs := make([]float32, m.out)
		for i := range probs {
			probs[i] = 1 / float32(m.out)
		}
		n.resp[m.name] = &oip.ModelInferResponse{ModelName: m.name, ModelVersion: "v1",
			Outputs: []*oip.ModelInferResponse_InferOutputTensor{{Name: "probabilities", Datatype: "FP32", Shape: []int64{1, int64(m.out)}, Contents: &oip.InferTensorContents{Fp32Contents: probs}}}}
	}
	gs := grpc.NewServer()
	oip.RegisterGRPCInferenceServiceServer(gs, n)
	go func() { _ = http.Serve(hl, http.HandlerFunc(func(http.ResponseWriter, *http.Request) {})) }()
	return map[bool]int{true: 0, false: 1}[gs.Serve(gl) == nil]
}

// startNoop runs serveNoop in its own process (this test binary again).
func startNoop(tb testing.TB) string {
	g, h := harness.FreeAddr(tb), harness.FreeAddr(tb)
	harness.Start(tb, "noop-oip", "http://"+h+"/ready", os.Args[0], "noop-oip", g, h)
	return g
}

const fixtures = "../../fixtures/onnx"

// model is one fixture the benchmarks serve: its input and output widths and its first
// batch-1 input row (from expected.json, the numpy-checked case).
type model struct {
	name     string // fixture directory and model name in the host's repository
	in, out  int
	row      []float32
	describe string
}

// models: the fixture MLP (8 -> 16 -> 16 -> 3, ~5 µs in ONNX Runtime: the transport
// dominates) and mlp-large (256 -> 1024 -> 1024 -> 1024 -> 10, ~2.4M weights: the model
// dominates).
func models(tb testing.TB) []model {
	ms := []model{{name: "mlp", in: 8, out: 3, describe: "MLP 8-16-16-3"}, {name: "mlp-large", in: 256, out: 10, describe: "MLP 256-1024-1024-1024-10"}}
	for i := range ms {
		b, err := os.ReadFile(filepath.Join(fixtures, ms[i].name, "expected.json"))
		if err != nil {
			tb.Fatal(err)
		}
		var e struct {
			Cases []struct {
				Inputs []struct {
					Data []float32 `json:"data"`
				} `json:"inputs"`
			} `json:"cases"`
		}
		if err := json.Unmarshal(b, &e); err != nil {
			tb.Fatal(err)
		}
		ms[i].row = e.Cases[0].Inputs[0].Data
		if len(ms[i].row) != ms[i].in {
			tb.Fatalf("%s: first case has %d features, want one row of %d", ms[i].name, len(ms[i].row), ms[i].in)
		}
	}
	return ms
}

// library is the ONNX Runtime library the host and the direct baseline use, or a skip
// saying how to get it.
func library(tb testing.TB) string {
	lib, err := onnx.FindLibrary("")
	if err != nil {
		tb.Skipf("skipped: %v", err)
	}
	return lib
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

// repo: each fixture as <name> (no batching) and <name>-batched (the same behind the
// dynamic batcher, up to 64 rows, 500 µs), model.yaml otherwise as committed.
func repo(tb testing.TB, ms []model) string {
	r := tb.TempDir()
	for _, m := range ms {
		onnxFile, err := os.ReadFile(filepath.Join(fixtures, m.name, "model.onnx"))
		if err != nil {
			tb.Fatal(err)
		}
		y, err := os.ReadFile(filepath.Join(fixtures, m.name, "model.yaml"))
		if err != nil {
			tb.Fatal(err)
		}
		write(tb, filepath.Join(r, m.name, "v1", "model.onnx"), onnxFile)
		write(tb, filepath.Join(r, m.name, "v1", "model.yaml"), y)
		write(tb, filepath.Join(r, m.name+"-batched", "v1", "model.onnx"), onnxFile)
		write(tb, filepath.Join(r, m.name+"-batched", "v1", "model.yaml"), append(y, "batching: {max_batch_size: 64, max_delay: 500us}\n"...))
	}
	return r
}

type addrs struct{ http, grpc string }

// startHost runs `patchbay modelhost` (the binary built by the harness with a plain
// `go build`: cgo on, the ONNX-capable build the Dockerfile ships) in its own process,
// default flags but its addresses and --onnxruntime-lib (the library this process found),
// and waits until every model is ready.
func startHost(tb testing.TB, lib string, ms []model) addrs {
	tb.Helper()
	h, g, a := harness.FreeAddr(tb), harness.FreeAddr(tb), harness.FreeAddr(tb)
	harness.Start(tb, "modelhost", "http://"+h+"/v2/health/ready", harness.Binary(tb),
		"modelhost", "--repository", repo(tb, ms), "--http", h, "--grpc", g, "--admin", a, "--onnxruntime-lib", lib)
	for _, m := range ms {
		for _, n := range []string{m.name, m.name + "-batched"} {
			harness.Eventually(tb, harness.ReadyTimeout, n+" ready", func() bool { return harness.OK("http://" + h + "/v2/models/" + n + "/ready") })
		}
	}
	return addrs{http: "http://" + h, grpc: g}
}

// hostTime is the sum (s) and count of the host's own patchbay_modelhost_request_duration
// (decode to encode, inside the host) for model over protocol, from its /metrics.
func hostTime(tb testing.TB, base, model, protocol string) (sum, count float64) {
	tb.Helper()
	const name = "patchbay_modelhost_request_duration_seconds"
	filters := []string{`model="` + model + `"`, `protocol="` + protocol + `"`}
	return harness.MetricSum(tb, base+"/metrics", name+"_sum", filters...), harness.MetricSum(tb, base+"/metrics", name+"_count", filters...)
}

// direct is ONNX Runtime called from Go without the host: a session with the host's
// default options, the input tensor made and the output read and released per call,
// as the runtime does.
type direct struct {
	sess *ort.DynamicAdvancedSession
	in   int
}

func newDirect(tb testing.TB, name string, in int, opts onnx.Options) *direct {
	tb.Helper()
	path := filepath.Join(fixtures, name, "model.onnx")
	if _, _, err := onnx.Describe(onnx.Config{}, path); err != nil { // loads the library once
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
	s, err := ort.NewDynamicAdvancedSession(path, []string{"features"}, []string{"probabilities"}, so)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Destroy() })
	return &direct{sess: s, in: in}
}

func (d *direct) run(tb testing.TB, x []float32) {
	in, err := ort.NewTensor(ort.NewShape(int64(len(x)/d.in), int64(d.in)), x)
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

// noopOIP answers ModelInfer with a fixed response per model (the transport floor).
type noopOIP struct {
	oip.UnimplementedGRPCInferenceServiceServer
	resp map[string]*oip.ModelInferResponse
}

func (n *noopOIP) ModelInfer(_ context.Context, r *oip.ModelInferRequest) (*oip.ModelInferResponse, error) {
	if resp, ok := n.resp[r.ModelName]; ok {
		return resp, nil
	}
	return nil, status.Errorf(codes.NotFound, "no model %q", r.ModelName)
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

// BenchmarkONNXInfer, per model (model=mlp: ~5 µs in ONNX Runtime; model=mlp-large:
// compute-bound): one row at batch 1 through the shipped host over gRPC and REST, against
// ONNX Runtime called directly from Go on the same row, and against a no-op grpc-go
// ModelInfer in this process (the transport floor). ratio = direct / host time (what the
// host adds is everything but the model: loopback, HTTP/2 or HTTP/1.1, protobuf or JSON,
// the host's checks); floor-ratio = (no-op gRPC + direct) / host gRPC time: 1.0 means the
// host adds nothing beyond a bare grpc-go call and the model itself.
func BenchmarkONNXInfer(b *testing.B) {
	lib := library(b)
	ms := models(b)
	h := startHost(b, lib, ms)
	dial := func(addr string) oip.GRPCInferenceServiceClient {
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { conn.Close() })
		return oip.NewGRPCInferenceServiceClient(conn)
	}
	host, noop := dial(h.grpc), dial(startNoop(b))
	hc := &http.Client{}
	for _, m := range ms {
		b.Run("model="+m.name, func(b *testing.B) {
			d := newDirect(b, m.name, m.in, onnx.DefaultOptions())
			req := &oip.ModelInferRequest{ModelName: m.name, Inputs: []*oip.ModelInferRequest_InferInputTensor{{
				Name: "features", Datatype: "FP32", Shape: []int64{1, int64(m.in)}, Contents: &oip.InferTensorContents{Fp32Contents: m.row}}}}
			call := func(c oip.GRPCInferenceServiceClient) func() {
				return func() {
					if _, err := c.ModelInfer(context.Background(), req); err != nil {
						b.Fatal(err)
					}
				}
			}
			body, _ := json.Marshal(map[string]any{"inputs": []map[string]any{{"name": "features", "datatype": "FP32", "shape": []int{1, m.in}, "data": m.row}}})
			rest := func() {
				resp, err := hc.Post(h.http+"/v2/models/"+m.name+"/infer", "application/json", bytes.NewReader(body))
				if err != nil {
					b.Fatal(err)
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					b.Fatalf("REST infer: %d", resp.StatusCode)
				}
			}
			dr := func() { d.run(b, m.row) }
			for _, f := range []func(){dr, call(noop), call(host), rest} { // warm up
				for range 20 {
					f()
				}
			}
			s0, c0 := hostTime(b, h.http, m.name, "grpc")
			b.ResetTimer()
			t := rounds(b.N, dr, call(noop), call(host), rest)
			b.StopTimer()
			s1, c1 := hostTime(b, h.http, m.name, "grpc")
			dNs, noopNs, gNs, rNs := t[0], t[1], t[2], t[3]
			inNs := (s1 - s0) / max(c1-c0, 1) * 1e9
			// Diagnostic: the direct run timed right after a no-op gRPC round trip (the CPU
			// idles meanwhile, as a host's does between requests), against the hot loop's
			// direct-ns/req: how much of host-own-ns/req beyond direct is the run being cold.
			var after []float64
			for range min(b.N, 200) {
				call(noop)()
				t0 := time.Now()
				dr()
				after = append(after, float64(time.Since(t0).Nanoseconds()))
			}
			b.ReportMetric(median(after), "direct-after-rpc-ns/req")
			b.ReportMetric(inNs, "host-own-ns/req")
			b.ReportMetric(dNs, "direct-ns/req")
			b.ReportMetric(noopNs, "noop-grpc-ns/req")
			b.ReportMetric(gNs, "grpc-ns/req")
			b.ReportMetric(rNs, "rest-ns/req")
			b.ReportMetric(dNs/gNs, "grpc-ratio")
			b.ReportMetric(dNs/rNs, "rest-ratio")
			b.ReportMetric((noopNs+dNs)/gNs, "grpc-floor-ratio")
			if b.N >= 100 {
				b.Logf("%s batch 1: ONNX Runtime direct %.1f µs; host gRPC %.1f µs (of which inside the host, decode to encode: %.1f µs; no-op grpc-go %.1f µs), REST %.1f µs; direct/host: gRPC %.2f, REST %.2f; (no-op gRPC + direct)/host gRPC %.2f",
					m.describe, dNs/1e3, gNs/1e3, inNs/1e3, noopNs/1e3, rNs/1e3, dNs/gNs, dNs/rNs, (noopNs+dNs)/gNs)
			}
		})
	}
}

// BenchmarkONNXBatching, per model: 64 concurrent REST clients sending one row each to
// the shipped host, dynamic batching on (up to 64 rows, 500 µs) vs off. ratio = median
// over rounds of throughput on / off.
func BenchmarkONNXBatching(b *testing.B) {
	lib := library(b)
	ms := models(b)
	h := startHost(b, lib, ms)
	const clients = 64
	c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: clients, MaxConnsPerHost: clients}}
	for _, m := range ms {
		b.Run("model="+m.name, func(b *testing.B) {
			body, _ := json.Marshal(map[string]any{"inputs": []map[string]any{{"name": "features", "datatype": "FP32", "shape": []int{1, m.in}, "data": m.row}}})
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
			if b.N == 1 { // the testing package's first probe: no figures wanted from it
				run(m.name, clients)
				return
			}
			run(m.name, 256)
			run(m.name+"-batched", 256)
			b.ResetTimer()
			const nr = 6
			per := max(b.N/nr, 512)
			var offs, ons, ratios []float64
			for i := range nr {
				var off, on float64
				if i%2 == 0 {
					off, on = run(m.name, per), run(m.name+"-batched", per)
				} else {
					on, off = run(m.name+"-batched", per), run(m.name, per)
				}
				offs, ons, ratios = append(offs, off), append(ons, on), append(ratios, on/off)
			}
			b.ReportMetric(median(offs), "unbatched-req/s")
			b.ReportMetric(median(ons), "batched-req/s")
			b.ReportMetric(median(ratios), "ratio")
			if b.N >= 100 {
				b.Logf("%s, %d REST clients: batching off %.0f req/s, on %.0f req/s (medians of %d rounds), ratio %.2f", m.describe, clients, median(offs), median(ons), nr, median(ratios))
			}
		})
	}
}

// BenchmarkONNXSessionOptions measures the defaults: ONNX Runtime directly, the fixture MLP
// at batch 1 and 64, one caller and 8 concurrent callers, for intra-op threads 1, 2
// and 0 (ONNX Runtime's default: one per core) and graph optimisation all vs disable.
func BenchmarkONNXSessionOptions(b *testing.B) {
	library(b)
	row := models(b)[0].row
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
					d := newDirect(b, "mlp", 8, o)
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
