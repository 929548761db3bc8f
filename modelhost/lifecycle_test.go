package modelhost_test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/patchbay-io/patchbay/api/headers"
	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/internal/telemetry"
	"github.com/patchbay-io/patchbay/modelhost"
	"github.com/patchbay-io/patchbay/modelhost/runtime"
	"github.com/patchbay-io/patchbay/modelhost/runtime/builtin"
	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

const rankerBody = `{"inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":[0.5,-0.25,1,0,1.5,-1,0.25,2]}]}`

// TestLoadWhileServing adds a version and reloads a changed one while clients call
// the model over REST and gRPC; no request may fail.
func TestLoadWhileServing(t *testing.T) {
	h := startHost(t, testRepo(t), nil)
	ctx, stop := context.WithCancel(context.Background())
	var ok, failed atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	client := &http.Client{}
	for i := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; n < 5000 && ctx.Err() == nil; n++ {
				var err error
				if i%3 == 2 {
					_, err = h.grpc.ModelInfer(context.Background(), &oip.ModelInferRequest{ModelName: "ranker", ModelVersion: "v8",
						Inputs: []*oip.ModelInferRequest_InferInputTensor{{Name: "features", Datatype: "FP32", Shape: []int64{1, 8},
							Contents: &oip.InferTensorContents{Fp32Contents: make([]float32, 8)}}}})
				} else {
					req, _ := http.NewRequest("POST", h.url+"/v2/models/ranker/infer", strings.NewReader(rankerBody))
					if i%3 == 1 {
						req.Header.Set(headers.Version, "v8")
					}
					var resp *http.Response
					if resp, err = client.Do(req); err == nil {
						resp.Body.Close()
						if resp.StatusCode != 200 {
							err = fmt.Errorf("status %d", resp.StatusCode)
						}
					}
				}
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
				} else {
					ok.Add(1)
				}
			}
		}()
	}
	waitFor(t, func() bool { return ok.Load() > 50 })
	// A new version appears and is loaded.
	copyDir(t, filepath.Join(h.repo, "ranker", "v8"), filepath.Join(h.repo, "ranker", "v9"))
	if r := h.adminDo(t, "POST", "/v2/repository/models/ranker/load", "", nil); r.StatusCode != 200 {
		t.Fatalf("load: %d", r.StatusCode)
	}
	before := ok.Load()
	waitFor(t, func() bool { return ok.Load() > before+50 })
	// v8 changes on disk (retrained artifact): reloaded next to the old one, swapped.
	future := time.Now().Add(time.Minute)
	if err := os.Chtimes(filepath.Join(h.repo, "ranker", "v8", "model.json"), future, future); err != nil {
		t.Fatal(err)
	}
	if _, err := h.adminGRPC.RepositoryModelLoad(h.adminCtx(), &oip.RepositoryModelLoadRequest{ModelName: "ranker"}); err != nil {
		t.Fatalf("gRPC load: %v", err)
	}
	before = ok.Load()
	waitFor(t, func() bool { return ok.Load() > before+50 })
	stop()
	wg.Wait()
	if failed.Load() != 0 {
		t.Fatalf("%d of %d requests failed during load (first: %v)", failed.Load(), ok.Load()+failed.Load(), firstErr.Load())
	}
	var out inferResponse
	if r := h.do(t, "POST", "/v2/models/ranker/versions/v9/infer", rankerBody, nil, &out); r.StatusCode != 200 || out.ModelVersion != "v9" {
		t.Fatalf("v9: %d %+v", r.StatusCode, out)
	}
	var m struct{ Versions []string }
	h.do(t, "GET", "/v2/models/ranker", "", nil, &m)
	if fmt.Sprint(m.Versions) != "[v7 v8 v9]" {
		t.Errorf("versions after load: %v", m.Versions)
	}
	t.Logf("%d requests served during two loads, none failed", ok.Load())
}

func waitFor(t testing.TB, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// gate is a runtime whose Predict blocks until released, to hold requests in flight.
type gate struct {
	started chan struct{}
	release chan struct{}
}

func (g *gate) load(spec runtime.Spec) (runtime.Model, error) { return g, nil }

func (g *gate) Predict(ctx context.Context, in []*tensor.Tensor) ([]*tensor.Tensor, error) {
	g.started <- struct{}{}
	<-g.release
	out := &tensor.Tensor{Datatype: tensor.FP32, Shape: []int64{in[0].Shape[0]}, F32: make([]float32, in[0].Shape[0])}
	return []*tensor.Tensor{out}, nil
}

// TestUnloadWaitsForInFlight: unload returns only after the request already running
// has finished (successfully); later requests get NotFound; load brings it back.
func TestUnloadWaitsForInFlight(t *testing.T) {
	repo := testRepo(t)
	writeFile(t, filepath.Join(repo, "slow", "v1", "model.yaml"), `runtime: gate
inputs:  [{name: x, datatype: FP32, shape: [-1, 1]}]
outputs: [{name: y, datatype: FP32, shape: [-1]}]
`)
	g := &gate{started: make(chan struct{}, 4), release: make(chan struct{})}
	h := startHost(t, repo, func(c *modelhost.Config) {
		c.Runtimes = builtin.Loaders()
		c.Runtimes["gate"] = g.load
	})
	body := `{"inputs":[{"name":"x","datatype":"FP32","shape":[1,1],"data":[1]}]}`
	status := make(chan int, 1)
	go func() {
		resp, err := http.Post(h.url+"/v2/models/slow/infer", "application/json", strings.NewReader(body))
		if err != nil {
			status <- -1
			return
		}
		resp.Body.Close()
		status <- resp.StatusCode
	}()
	<-g.started
	unloaded := make(chan error, 1)
	go func() {
		_, err := h.adminGRPC.RepositoryModelUnload(h.adminCtx(), &oip.RepositoryModelUnloadRequest{ModelName: "slow"})
		unloaded <- err
	}()
	select {
	case err := <-unloaded:
		t.Fatalf("unload returned (%v) while a request was in flight", err)
	case <-time.After(100 * time.Millisecond):
	}
	// New requests no longer reach the model while it drains.
	if r := h.do(t, "POST", "/v2/models/slow/infer", body, nil, nil); r.StatusCode != 404 {
		t.Errorf("request during unload: %d, want 404", r.StatusCode)
	}
	close(g.release)
	if code := <-status; code != 200 {
		t.Fatalf("in-flight request: %d, want 200", code)
	}
	if err := <-unloaded; err != nil {
		t.Fatalf("unload: %v", err)
	}
	idx, err := h.adminGRPC.RepositoryIndex(h.adminCtx(), &oip.RepositoryIndexRequest{})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, m := range idx.Models {
		if m.Name == "slow" {
			found = m.State == "UNAVAILABLE" && m.Reason == "not loaded"
		}
	}
	if !found {
		t.Errorf("index after unload: %v", idx.Models)
	}
	if _, err := h.adminGRPC.RepositoryModelUnload(h.adminCtx(), &oip.RepositoryModelUnloadRequest{ModelName: "slow"}); statusCode(err) != codes.NotFound {
		t.Errorf("second unload: %v", err)
	}
	if r := h.adminDo(t, "POST", "/v2/repository/models/slow/load", "", nil); r.StatusCode != 200 {
		t.Fatalf("reload: %d", r.StatusCode)
	}
	go func() { <-g.started }()
	if r := h.do(t, "POST", "/v2/models/slow/infer", body, nil, nil); r.StatusCode != 200 {
		t.Fatalf("after reload: %d", r.StatusCode)
	}
	if r := h.adminDo(t, "POST", "/v2/repository/models/missing/load", "", nil); r.StatusCode != 404 {
		t.Errorf("load of a model not in the repository: %d, want 404", r.StatusCode)
	}
}

func statusCode(err error) codes.Code { return status.Code(err) }

// TestFailedVersionReported: a broken version is listed as unavailable with its reason
// (file:line), answers not ready, and the model's other versions keep serving.
func TestFailedVersionReported(t *testing.T) {
	repo := testRepo(t)
	writeFile(t, filepath.Join(repo, "ranker", "v9", "model.yaml"), `runtime: xgboost
artifact: model.json
inputz: []
`)
	writeFile(t, filepath.Join(repo, "churn", "v3", "model.yaml"), `runtime: linear
artifact: linear.json
inputs:  [{name: features, datatype: FP32, shape: [-1, 4]}]
outputs: [{name: probability, datatype: FP32, shape: [-1]}]
`)
	writeFile(t, filepath.Join(repo, "broken", "v1", "model.yaml"), `runtime: tensorflow
inputs:  [{name: x, datatype: FP32, shape: [-1, 4]}]
outputs: [{name: y, datatype: FP32, shape: [-1]}]
`)
	h := startHost(t, repo, nil)
	var idx []struct{ Name, Version, State, Reason string }
	h.adminDo(t, "POST", "/v2/repository/index", "", &idx)
	reasons := map[string]string{}
	for _, e := range idx {
		reasons[e.Name+"/"+e.Version] = e.State + " " + e.Reason
	}
	for key, want := range map[string]string{
		"ranker/v9": "model.yaml:3: field inputz not found",
		"churn/v3":  "linear.json: no such file",
		"broken/v1": `model.yaml:1: runtime "tensorflow" unknown`,
		"ranker/v8": "READY",
	} {
		if !strings.Contains(reasons[key], want) {
			t.Errorf("%s: %q, want it to contain %q", key, reasons[key], want)
		}
	}
	var ready []struct{ Name, Version string }
	h.adminDo(t, "POST", "/v2/repository/index", `{"ready":true}`, &ready)
	for _, e := range ready {
		if e.Version == "v9" || e.Name == "broken" {
			t.Errorf("ready index lists %v", e)
		}
	}
	if r := h.do(t, "GET", "/v2/models/ranker/versions/v9/ready", "", nil, nil); r.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("v9 ready: %d, want 503", r.StatusCode)
	}
	var out inferResponse
	if r := h.do(t, "POST", "/v2/models/ranker/versions/v9/infer", rankerBody, nil, &out); r.StatusCode != 503 || !strings.Contains(out.Error, "not ready") {
		t.Errorf("v9 infer: %d %q", r.StatusCode, out.Error)
	}
	if r := h.do(t, "POST", "/v2/models/ranker/infer", rankerBody, nil, &out); r.StatusCode != 200 || out.ModelVersion != "v7" {
		t.Errorf("ranker default with a broken v9: %d %+v", r.StatusCode, out)
	}
	// churn's highest version is broken: the default falls back to the highest ready.
	if r := h.do(t, "POST", "/v2/models/churn/infer", `{"inputs":[{"name":"features","datatype":"FP32","shape":[1,4],"data":[1,1,1,1]}]}`, nil, &out); r.StatusCode != 200 || out.ModelVersion != "v2" {
		t.Errorf("churn default with a broken v3: %d %+v", r.StatusCode, out)
	}
	var lerr struct{ Error string }
	if r := h.adminDo(t, "POST", "/v2/repository/models/broken/load", "", &lerr); r.StatusCode != 400 || !strings.Contains(lerr.Error, "no version is ready") {
		t.Errorf("load broken: %d %q", r.StatusCode, lerr.Error)
	}
	if r, err := h.grpc.ModelReady(context.Background(), &oip.ModelReadyRequest{Name: "broken"}); err != nil || r.Ready {
		t.Errorf("ModelReady broken: %v %v", r, err)
	}
}

// TestTraceContextContinued: the host's server span joins the caller's trace (W3C
// traceparent) over REST and gRPC.
func TestTraceContextContinued(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	h := startHost(t, testRepo(t), func(c *modelhost.Config) { c.TracerProvider = tp })
	parent := trace.NewSpanContext(trace.SpanContextConfig{
		TraceID: trace.TraceID{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16},
		SpanID:  trace.SpanID{1, 2, 3, 4, 5, 6, 7, 8}, TraceFlags: trace.FlagsSampled, Remote: true})
	carrier := propagation.MapCarrier{}
	propagation.TraceContext{}.Inject(trace.ContextWithSpanContext(context.Background(), parent), carrier)
	h.do(t, "POST", "/v2/models/ranker/infer", rankerBody, map[string]string{"traceparent": carrier["traceparent"]}, nil)
	ctx := metadata.AppendToOutgoingContext(context.Background(), "traceparent", carrier["traceparent"])
	if _, err := h.grpc.ModelInfer(ctx, &oip.ModelInferRequest{ModelName: "churn", Inputs: []*oip.ModelInferRequest_InferInputTensor{{
		Name: "features", Datatype: "FP32", Shape: []int64{1, 4}, Contents: &oip.InferTensorContents{Fp32Contents: make([]float32, 4)}}}}); err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, s := range rec.Ended() {
		if s.Parent().TraceID() == parent.TraceID() && s.Parent().SpanID() == parent.SpanID() && s.SpanKind() == trace.SpanKindServer {
			for _, a := range s.Attributes() {
				if a.Key == "patchbay.model" {
					got[s.Name()+" "+a.Value.AsString()] = true
				}
			}
		}
	}
	if !got["oip.rest.infer ranker"] || !got["oip.grpc.infer churn"] {
		t.Errorf("spans continuing the caller's trace: %v", got)
	}
}

// TestMetricsExposed: per model/version request, error, latency, batch-size and
// queue-time series appear on /metrics.
func TestMetricsExposed(t *testing.T) {
	h := startHost(t, testRepo(t), nil)
	for range 3 {
		h.do(t, "POST", "/v2/models/ranker/infer", rankerBody, nil, nil)
	}
	h.do(t, "POST", "/v2/models/ranker/versions/v8/infer", `{"inputs":[]}`, nil, nil)
	h.do(t, "POST", "/v2/models/churn/infer", `{"inputs":[{"name":"features","datatype":"FP32","shape":[1,4],"data":[1,1,1,1]}]}`, nil, nil)
	resp := h.do(t, "GET", "/metrics", "", nil, nil)
	var sb strings.Builder
	buf := make([]byte, 1<<16)
	for {
		n, err := resp.Body.Read(buf)
		sb.Write(buf[:n])
		if err != nil {
			break
		}
	}
	text := sb.String()
	for _, want := range []string{
		`patchbay_modelhost_requests_total{model="ranker",protocol="rest",traffic="live",version="v7"} 3`,
		`patchbay_modelhost_requests_total{model="ranker",protocol="rest",traffic="live",version="v8"} 1`,
		`patchbay_modelhost_request_errors_total{code="InvalidArgument",model="ranker",protocol="rest",traffic="live",version="v8"} 1`,
		`patchbay_modelhost_request_duration_seconds_count{model="ranker",protocol="rest",traffic="live",version="v7"} 3`,
		`patchbay_modelhost_batch_size_count{model="churn",version="v2"} 1`,
		`patchbay_modelhost_queue_duration_seconds_count{model="ranker",version="v7"} 3`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	telemetry.CheckHistogramUnits(t, text)
	if t.Failed() {
		for _, l := range strings.Split(text, "\n") {
			if strings.HasPrefix(l, "patchbay_") {
				t.Log(l)
			}
		}
	}
}

// panicky is a runtime that panics on a negative input.
type panicky struct{}

func (panicky) Predict(_ context.Context, in []*tensor.Tensor) ([]*tensor.Tensor, error) {
	if in[0].F32[0] < 0 {
		panic("negative input")
	}
	return []*tensor.Tensor{{Datatype: tensor.FP32, Shape: []int64{in[0].Shape[0]}, F32: make([]float32, in[0].Shape[0])}}, nil
}

// TestRuntimePanicFailsOnlyTheRequest: a runtime panic becomes a 500 / Internal for
// that request (batched or not) and the host keeps serving.
func TestRuntimePanicFailsOnlyTheRequest(t *testing.T) {
	repo := testRepo(t)
	for _, m := range []struct{ name, batching string }{{"boom", ""}, {"boom-batched", "batching: {max_batch_size: 4, max_delay: 1ms}\n"}} {
		writeFile(t, filepath.Join(repo, m.name, "v1", "model.yaml"), "runtime: panicky\n"+
			"inputs: [{name: x, datatype: FP32, shape: [-1, 1]}]\noutputs: [{name: y, datatype: FP32, shape: [-1]}]\n"+m.batching)
	}
	h := startHost(t, repo, func(c *modelhost.Config) {
		c.Runtimes = builtin.Loaders()
		c.Runtimes["panicky"] = func(runtime.Spec) (runtime.Model, error) { return panicky{}, nil }
	})
	for _, model := range []string{"boom", "boom-batched"} {
		var out struct{ Error string }
		r := h.do(t, "POST", "/v2/models/"+model+"/infer", `{"inputs":[{"name":"x","datatype":"FP32","shape":[1,1],"data":[-1]}]}`, nil, &out)
		if r.StatusCode != 500 || !strings.Contains(out.Error, "runtime panicked: negative input") {
			t.Errorf("%s: %d %q, want 500 runtime panicked", model, r.StatusCode, out.Error)
		}
		_, err := h.grpc.ModelInfer(context.Background(), &oip.ModelInferRequest{ModelName: model, Inputs: []*oip.ModelInferRequest_InferInputTensor{{
			Name: "x", Datatype: "FP32", Shape: []int64{1, 1}, Contents: &oip.InferTensorContents{Fp32Contents: []float32{-1}}}}})
		if statusCode(err) != codes.Internal {
			t.Errorf("%s over gRPC: %v, want Internal", model, err)
		}
		if r := h.do(t, "POST", "/v2/models/"+model+"/infer", `{"inputs":[{"name":"x","datatype":"FP32","shape":[1,1],"data":[1]}]}`, nil, nil); r.StatusCode != 200 {
			t.Errorf("%s after a panic: %d", model, r.StatusCode)
		}
	}
}
