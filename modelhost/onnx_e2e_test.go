//go:build cgo

package modelhost_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/modelhost"
	"github.com/patchbay-io/patchbay/modelhost/runtime/builtin"
	"github.com/patchbay-io/patchbay/modelhost/runtime/onnx"
)

const onnxFixtures = "../test/fixtures/onnx"

// onnxCases maps the fixtures (test/fixtures/onnx, made by gen.py) to model names.
var onnxCases = map[string]string{"mlp": "mlp", "two_inputs": "two-inputs", "masked": "masked", "fp16": "fp16", "strings": "strings"}

// needONNXRuntime skips when ONNX Runtime cannot be found (make test installs it).
func needONNXRuntime(t testing.TB) {
	t.Helper()
	if _, err := onnx.FindLibrary(""); err != nil {
		t.Skipf("skipped: %v", err)
	}
}

// onnxValue is one tensor of expected.json, in OIP JSON form.
type onnxValue struct {
	Name      string  `json:"name"`
	Datatype  string  `json:"datatype"`
	Shape     []int64 `json:"shape"`
	Data      []any   `json:"data"`
	Tolerance string  `json:"tolerance,omitempty"`
}

type onnxExpected struct {
	Tolerance map[string]struct{ Abs, Rel float64 } `json:"tolerance"`
	Cases     []struct {
		Name    string      `json:"name"`
		Inputs  []onnxValue `json:"inputs"`
		Outputs []onnxValue `json:"outputs"`
	} `json:"cases"`
}

func readONNXExpected(t testing.TB, fixture string) onnxExpected {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(onnxFixtures, fixture, "expected.json"))
	if err != nil {
		t.Fatal(err)
	}
	var e onnxExpected
	if err := json.Unmarshal(b, &e); err != nil {
		t.Fatal(err)
	}
	return e
}

// onnxRepo is a repository holding every fixture as <model>/v1, plus mlp-batched: the
// MLP behind the dynamic batcher.
func onnxRepo(t testing.TB) string {
	repo := t.TempDir()
	for fixture, model := range onnxCases {
		copyDir(t, filepath.Join(onnxFixtures, fixture), filepath.Join(repo, model, "v1"))
	}
	dir := filepath.Join(repo, "mlp-batched", "v1")
	copyDir(t, filepath.Join(onnxFixtures, "mlp"), dir)
	y, err := os.ReadFile(filepath.Join(dir, "model.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "model.yaml"), string(y)+"batching: {max_batch_size: 16, max_delay: 2ms, instances: 1}\n")
	return repo
}

// compareONNX checks an output against numpy's within expected.json's tolerance for
// its datatype (FP32: abs 1e-5 + rel 1e-4; FP16 graphs: abs 2e-3 + rel 2e-3; integers,
// BOOL and BYTES exactly).
func compareONNX(t testing.TB, e onnxExpected, want onnxValue, name, datatype string, shape []int64, data []any) {
	t.Helper()
	if name != want.Name || datatype != want.Datatype || fmt.Sprint(shape) != fmt.Sprint(want.Shape) || len(data) != len(want.Data) {
		t.Fatalf("output %s %s %v (%d values), want %s %s %v (%d values)", name, datatype, shape, len(data), want.Name, want.Datatype, want.Shape, len(want.Data))
	}
	tolName := want.Tolerance
	if tolName == "" {
		tolName = want.Datatype
	}
	tol := e.Tolerance[tolName]
	for i, w := range want.Data {
		switch wv := w.(type) {
		case float64:
			g, ok := data[i].(float64)
			if !ok || math.Abs(g-wv) > tol.Abs+tol.Rel*math.Abs(wv) {
				t.Fatalf("output %s[%d] = %v, want %v (tolerance %s: abs %g + rel %g)", name, i, data[i], wv, tolName, tol.Abs, tol.Rel)
			}
		default:
			if data[i] != w {
				t.Fatalf("output %s[%d] = %#v, want %#v", name, i, data[i], w)
			}
		}
	}
}

// grpcTensor turns an expected.json tensor into a typed gRPC input.
func grpcTensor(v onnxValue) *oip.ModelInferRequest_InferInputTensor {
	c := &oip.InferTensorContents{}
	for _, d := range v.Data {
		switch v.Datatype {
		case "FP32":
			c.Fp32Contents = append(c.Fp32Contents, float32(d.(float64)))
		case "INT32":
			c.IntContents = append(c.IntContents, int32(d.(float64)))
		case "INT64":
			c.Int64Contents = append(c.Int64Contents, int64(d.(float64)))
		case "BOOL":
			c.BoolContents = append(c.BoolContents, d.(bool))
		case "BYTES":
			c.BytesContents = append(c.BytesContents, []byte(d.(string)))
		}
	}
	return &oip.ModelInferRequest_InferInputTensor{Name: v.Name, Datatype: v.Datatype, Shape: v.Shape, Contents: c}
}

// grpcData flattens a typed gRPC output into JSON-like values (numbers as float64).
func grpcData(o *oip.ModelInferResponse_InferOutputTensor) []any {
	var out []any
	c := o.GetContents()
	for _, x := range c.GetFp32Contents() {
		out = append(out, float64(x))
	}
	for _, x := range c.GetInt64Contents() {
		out = append(out, float64(x))
	}
	for _, x := range c.GetIntContents() {
		out = append(out, float64(x))
	}
	for _, x := range c.GetBoolContents() {
		out = append(out, x)
	}
	for _, x := range c.GetBytesContents() {
		out = append(out, string(x))
	}
	return out
}

type restOutputs struct {
	Outputs []onnxValue `json:"outputs"`
	Error   string      `json:"error"`
}

// TestONNXFixturesOverOIP serves every ONNX fixture from a real host and checks each
// output over REST and gRPC against the numpy reference computed from the model's own
// weights: FP32 MLP (batch 1, 5, 32), FP32+INT32 inputs with FP32/BOOL/INT64 outputs,
// a BOOL input, an FP16 graph served as FP32, and a string (BYTES) input and output.
func TestONNXFixturesOverOIP(t *testing.T) {
	needONNXRuntime(t)
	h := startHost(t, onnxRepo(t), nil)
	for fixture, model := range onnxCases {
		e := readONNXExpected(t, fixture)
		for _, c := range e.Cases {
			t.Run(model+"/"+c.Name+"/rest", func(t *testing.T) {
				body, _ := json.Marshal(map[string]any{"inputs": c.Inputs})
				var got restOutputs
				resp := h.do(t, "POST", "/v2/models/"+model+"/infer", string(body), nil, &got)
				if resp.StatusCode != http.StatusOK {
					t.Fatalf("%d: %s", resp.StatusCode, got.Error)
				}
				if len(got.Outputs) != len(c.Outputs) {
					t.Fatalf("%d outputs, want %d", len(got.Outputs), len(c.Outputs))
				}
				for i, w := range c.Outputs {
					o := got.Outputs[i]
					compareONNX(t, e, w, o.Name, o.Datatype, o.Shape, o.Data)
				}
			})
			t.Run(model+"/"+c.Name+"/grpc", func(t *testing.T) {
				req := &oip.ModelInferRequest{ModelName: model}
				for _, in := range c.Inputs {
					req.Inputs = append(req.Inputs, grpcTensor(in))
				}
				resp, err := h.grpc.ModelInfer(context.Background(), req)
				if err != nil {
					t.Fatal(err)
				}
				for i, w := range c.Outputs {
					o := resp.Outputs[i]
					compareONNX(t, e, w, o.Name, o.Datatype, o.Shape, grpcData(o))
				}
			})
		}
	}
	// The model's metadata is model.yaml's, which the runtime checked against the graph.
	var meta struct {
		Inputs []onnxValue `json:"inputs"`
	}
	h.do(t, "GET", "/v2/models/two-inputs", "", nil, &meta)
	if len(meta.Inputs) != 2 || meta.Inputs[1].Name != "b" || meta.Inputs[1].Datatype != "INT32" {
		t.Fatalf("metadata inputs %+v", meta.Inputs)
	}
}

// TestONNXDynamicBatching: 32 concurrent one-row requests to the MLP behind the
// batcher (max 16 rows) each get their own row's answer.
func TestONNXDynamicBatching(t *testing.T) {
	needONNXRuntime(t)
	// A gRPC request holds its largest possible size of the in-flight byte budget (16 x
	// the body limit by default): a larger budget lets all 32 be in flight.
	h := startHost(t, onnxRepo(t), func(c *modelhost.Config) { c.MaxBodyBytes, c.MaxInflightBytes = 1<<16, 64<<20 })
	e := readONNXExpected(t, "mlp")
	c := e.Cases[2] // batch32
	in, want := c.Inputs[0], c.Outputs[0]
	n := int(in.Shape[0])
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for r := range n {
		wg.Go(func() {
			row := onnxValue{Name: in.Name, Datatype: in.Datatype, Shape: []int64{1, 8}, Data: in.Data[r*8 : r*8+8]}
			resp, err := h.grpc.ModelInfer(context.Background(), &oip.ModelInferRequest{ModelName: "mlp-batched",
				Inputs: []*oip.ModelInferRequest_InferInputTensor{grpcTensor(row)}})
			if err != nil {
				errs <- err
				return
			}
			got := grpcData(resp.Outputs[0])
			for j := range 3 {
				w := want.Data[r*3+j].(float64)
				if g := got[j].(float64); math.Abs(g-w) > 1e-5+1e-4*math.Abs(w) {
					errs <- fmt.Errorf("row %d: output[%d] = %v, want %v", r, j, g, w)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// The batcher ran: its rows-per-batch histogram has series for the model.
	resp := h.do(t, "GET", "/metrics", "", nil, nil)
	raw, _ := io.ReadAll(resp.Body)
	if !strings.Contains(string(raw), "patchbay_modelhost_batch_size") || !strings.Contains(string(raw), `model="mlp-batched"`) {
		t.Fatalf("no mlp-batched series in /metrics")
	}
}

// TestONNXLoadFailsCleanly: without the library, or with a model.yaml the graph
// contradicts, the version is unavailable with the reason, and the host serves on.
func TestONNXLoadFailsCleanly(t *testing.T) {
	repo := testRepo(t)
	copyDir(t, filepath.Join(onnxFixtures, "mlp"), filepath.Join(repo, "mlp", "v1"))
	dir := filepath.Join(repo, "mlp-wrong", "v1")
	copyDir(t, filepath.Join(onnxFixtures, "mlp"), dir)
	writeFile(t, filepath.Join(dir, "model.yaml"), `runtime: onnx
artifact: model.onnx
inputs:  [{name: features, datatype: FP32, shape: [-1, 9]}]
outputs: [{name: probabilities, datatype: FP32, shape: [-1, 3]}]
`)
	check := func(t *testing.T, h *host, model, want string) {
		t.Helper()
		var got restOutputs
		resp := h.do(t, "POST", "/v2/models/"+model+"/versions/v1/infer", `{"inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":[1,2,3,4,5,6,7,8]}]}`, nil, &got)
		if resp.StatusCode == http.StatusOK || !strings.Contains(got.Error, want) {
			t.Fatalf("%s: %d %q, want an error containing %q", model, resp.StatusCode, got.Error, want)
		}
		// The other runtimes still serve.
		var ok restOutputs
		if resp := h.do(t, "POST", "/v2/models/parity/infer", `{"inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":[1,2,3,4,5,6,7,8]}]}`, nil, &ok); resp.StatusCode != http.StatusOK {
			t.Fatalf("parity: %d %s", resp.StatusCode, ok.Error)
		}
	}
	t.Run("no library", func(t *testing.T) {
		h := startHost(t, repo, func(c *modelhost.Config) {
			c.Runtimes = builtin.LoadersWith(builtin.Options{ONNXRuntimeLib: "/nonexistent/libonnxruntime.so"})
		})
		check(t, h, "mlp", "make onnxruntime")
	})
	t.Run("signature", func(t *testing.T) {
		needONNXRuntime(t)
		h := startHost(t, repo, nil)
		check(t, h, "mlp-wrong", "dimension 1 is fixed at 8")
	})
}
