//go:build cgo

package modelhost_test

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/modelhost"
	"github.com/patchbay-io/patchbay/modelhost/runtime/builtin"
	"github.com/patchbay-io/patchbay/modelhost/runtime/onnx"
	"github.com/patchbay-io/patchbay/modelhost/tensor"
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
	// fp16-native(-batched): the FP16 graph declared FP16, so FP16 travels on the wire;
	// fp16-mixed: FP32 in (converted by the runtime), FP16 out.
	for model, extra := range map[string]string{"fp16-native": "", "fp16-native-batched": "batching: {max_batch_size: 8, max_delay: 5ms, instances: 1}\n", "fp16-mixed": ""} {
		dir := filepath.Join(repo, model, "v1")
		copyDir(t, filepath.Join(onnxFixtures, "fp16"), dir)
		in := "FP16"
		if model == "fp16-mixed" {
			in = "FP32"
		}
		writeFile(t, filepath.Join(dir, "model.yaml"), `runtime: onnx
artifact: model.onnx
inputs:  [{name: x, datatype: `+in+`, shape: [-1, 4]}]
outputs: [{name: y, datatype: FP16, shape: [-1, 2]}]
`+extra)
	}
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

// backendData is Debian's libonnx-testdata: ONNX's own backend node tests (a model,
// its inputs and the outputs ONNX's reference implementation gave).
const backendData = "/usr/share/libonnx-testdata/data/node"

// backendPass lists the node tests that passed when it was written; a listed test
// failing is a regression. Regenerate: PATCHBAY_ONNX_BACKEND_WRITE=1 go test -run
// TestONNXBackendNodeTests ./modelhost/
const backendPass = onnxFixtures + "/backend-pass.txt"

// pbTensor is an onnx.TensorProto, decoded with protowire (the host has no ONNX
// protobuf types; the fields read are dims 1, data_type 2, float_data 4, int32_data 5,
// string_data 6, int64_data 7, name 8, raw_data 9, double_data 10, uint64_data 11).
type pbTensor struct {
	name     string
	dtype    int64
	dims     []int64
	f        []float64
	i        []int64
	u        []uint64
	s        [][]byte
	raw      []byte
	datatype string // OIP
}

// oipOfONNX maps ONNX's TensorProto.DataType to the OIP datatypes the host carries;
// BFLOAT16 and complex types are left out of the selection.
var oipOfONNX = map[int64]string{1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "BYTES", 9: "BOOL", 10: "FP16", 11: "FP64", 12: "UINT32", 13: "UINT64"}

func parseTensorProto(b []byte) (*pbTensor, error) {
	t := &pbTensor{}
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, protowire.ParseError(n)
		}
		b = b[n:]
		// Repeated scalars come packed (bytes) or one per tag.
		packed := typ == protowire.BytesType && (num == 1 || num == 4 || num == 5 || num == 7 || num == 10 || num == 11)
		if packed {
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return nil, protowire.ParseError(n)
			}
			b = b[n:]
			for len(v) > 0 {
				var k int
				switch num {
				case 4:
					var x uint32
					x, k = protowire.ConsumeFixed32(v)
					t.f = append(t.f, float64(math.Float32frombits(x)))
				case 10:
					var x uint64
					x, k = protowire.ConsumeFixed64(v)
					t.f = append(t.f, math.Float64frombits(x))
				default:
					var x uint64
					x, k = protowire.ConsumeVarint(v)
					switch num {
					case 1:
						t.dims = append(t.dims, int64(x))
					case 5, 7:
						t.i = append(t.i, int64(x))
					case 11:
						t.u = append(t.u, x)
					}
				}
				if k < 0 {
					return nil, protowire.ParseError(k)
				}
				v = v[k:]
			}
			continue
		}
		switch {
		case typ == protowire.VarintType:
			x, k := protowire.ConsumeVarint(b)
			if k < 0 {
				return nil, protowire.ParseError(k)
			}
			b = b[k:]
			switch num {
			case 1:
				t.dims = append(t.dims, int64(x))
			case 2:
				t.dtype = int64(x)
			case 5, 7:
				t.i = append(t.i, int64(x))
			case 11:
				t.u = append(t.u, x)
			}
		case typ == protowire.BytesType:
			v, k := protowire.ConsumeBytes(b)
			if k < 0 {
				return nil, protowire.ParseError(k)
			}
			b = b[k:]
			switch num {
			case 6:
				t.s = append(t.s, v)
			case 8:
				t.name = string(v)
			case 9:
				t.raw = v
			}
		default:
			k := protowire.ConsumeFieldValue(num, typ, b)
			if k < 0 {
				return nil, protowire.ParseError(k)
			}
			b = b[k:]
		}
	}
	t.datatype = oipOfONNX[t.dtype]
	if t.raw != nil {
		le := binary.LittleEndian
		switch t.datatype {
		case "FP32":
			for k := 0; k+4 <= len(t.raw); k += 4 {
				t.f = append(t.f, float64(math.Float32frombits(le.Uint32(t.raw[k:]))))
			}
		case "FP64":
			for k := 0; k+8 <= len(t.raw); k += 8 {
				t.f = append(t.f, math.Float64frombits(le.Uint64(t.raw[k:])))
			}
		case "FP16":
			for k := 0; k+2 <= len(t.raw); k += 2 {
				t.f = append(t.f, tensor.F16ToFloat64(le.Uint16(t.raw[k:])))
			}
		case "INT8", "UINT8", "BOOL":
			for _, x := range t.raw {
				if t.datatype == "INT8" {
					t.i = append(t.i, int64(int8(x)))
				} else {
					t.i = append(t.i, int64(x))
				}
			}
		case "INT16", "UINT16":
			for k := 0; k+2 <= len(t.raw); k += 2 {
				if x := le.Uint16(t.raw[k:]); t.datatype == "INT16" {
					t.i = append(t.i, int64(int16(x)))
				} else {
					t.i = append(t.i, int64(x))
				}
			}
		case "INT32", "UINT32":
			for k := 0; k+4 <= len(t.raw); k += 4 {
				if x := le.Uint32(t.raw[k:]); t.datatype == "INT32" {
					t.i = append(t.i, int64(int32(x)))
				} else {
					t.u = append(t.u, uint64(x))
				}
			}
		case "INT64":
			for k := 0; k+8 <= len(t.raw); k += 8 {
				t.i = append(t.i, int64(le.Uint64(t.raw[k:])))
			}
		case "UINT64":
			for k := 0; k+8 <= len(t.raw); k += 8 {
				t.u = append(t.u, le.Uint64(t.raw[k:]))
			}
		}
	}
	if t.datatype == "FP16" && len(t.i) > 0 { // int32_data holds the halves' bits
		for _, x := range t.i {
			t.f = append(t.f, tensor.F16ToFloat64(uint16(x)))
		}
		t.i = nil
	}
	if t.datatype == "UINT32" && len(t.u) > 0 {
		for _, x := range t.u {
			t.i = append(t.i, int64(x))
		}
		t.u = nil
	}
	return t, nil
}

// contents is t as typed gRPC contents.
func (t *pbTensor) contents() *oip.InferTensorContents {
	c := &oip.InferTensorContents{}
	switch t.datatype {
	case "FP32":
		for _, x := range t.f {
			c.Fp32Contents = append(c.Fp32Contents, float32(x))
		}
	case "FP64":
		c.Fp64Contents = t.f
	case "INT8", "INT16", "INT32":
		for _, x := range t.i {
			c.IntContents = append(c.IntContents, int32(x))
		}
	case "UINT8", "UINT16", "UINT32":
		for _, x := range t.i {
			c.UintContents = append(c.UintContents, uint32(x))
		}
	case "INT64":
		c.Int64Contents = t.i
	case "UINT64":
		c.Uint64Contents = t.u
	case "BOOL":
		for _, x := range t.i {
			c.BoolContents = append(c.BoolContents, x != 0)
		}
	case "BYTES":
		c.BytesContents = t.s
	}
	return c
}

// floatsOnly: the case's tensors are all FP16, FP32 or FP64 (the raw encoding here
// covers those); hasFP16: one of them is FP16, so the case goes raw (FP16 has no typed
// gRPC contents).
func (c backendCase) floatsOnly() (ok, hasFP16 bool) {
	ok = true
	for _, p := range append(slices.Clone(c.inputs), c.outputs...) {
		switch p.datatype {
		case "FP16":
			hasFP16 = true
		case "FP32", "FP64":
		default:
			ok = false
		}
	}
	return ok, hasFP16
}

// rawOf is t's raw (little-endian) contents; floats only.
func (t *pbTensor) rawOf() []byte {
	var b []byte
	le := binary.LittleEndian
	for _, x := range t.f {
		switch t.datatype {
		case "FP16":
			b = le.AppendUint16(b, tensor.F16FromFloat64(x))
		case "FP32":
			b = le.AppendUint32(b, math.Float32bits(float32(x)))
		case "FP64":
			b = le.AppendUint64(b, math.Float64bits(x))
		}
	}
	return b
}

// matchesRaw compares a raw output (floats only) with the expected tensor, with the
// same tolerance as matches.
func (t *pbTensor) matchesRaw(o *oip.ModelInferResponse_InferOutputTensor, raw []byte) error {
	if o.Datatype != t.datatype || fmt.Sprint(o.Shape) != fmt.Sprint(t.dims) {
		return fmt.Errorf("output %s %v, want %s %v", o.Datatype, o.Shape, t.datatype, t.dims)
	}
	var gf []float64
	le := binary.LittleEndian
	for k := 0; k < len(raw); {
		switch t.datatype {
		case "FP16":
			gf = append(gf, tensor.F16ToFloat64(le.Uint16(raw[k:])))
			k += 2
		case "FP32":
			gf = append(gf, float64(math.Float32frombits(le.Uint32(raw[k:]))))
			k += 4
		default:
			gf = append(gf, math.Float64frombits(le.Uint64(raw[k:])))
			k += 8
		}
	}
	return closeFloats(gf, t.f)
}

// matches compares an output with the expected tensor: floats with the ONNX backend
// tests' own tolerance (rtol 1e-3, atol 1e-7; NaN equals NaN), the rest exactly.
func (t *pbTensor) matches(o *oip.ModelInferResponse_InferOutputTensor) error {
	if o.Datatype != t.datatype || fmt.Sprint(o.Shape) != fmt.Sprint(t.dims) {
		return fmt.Errorf("output %s %v, want %s %v", o.Datatype, o.Shape, t.datatype, t.dims)
	}
	want := t.contents()
	c := o.GetContents()
	var gf, wf []float64
	switch t.datatype {
	case "FP32":
		for i := range c.GetFp32Contents() {
			gf = append(gf, float64(c.Fp32Contents[i]))
		}
		for _, x := range want.Fp32Contents {
			wf = append(wf, float64(x))
		}
	case "FP64":
		gf, wf = c.GetFp64Contents(), want.Fp64Contents
	default:
		if g, w := fmt.Sprint(c.GetIntContents(), c.GetUintContents(), c.GetInt64Contents(), c.GetUint64Contents(), c.GetBoolContents(), c.GetBytesContents()),
			fmt.Sprint(want.IntContents, want.UintContents, want.Int64Contents, want.Uint64Contents, want.BoolContents, want.BytesContents); g != w {
			return fmt.Errorf("got %.200s, want %.200s", g, w)
		}
		return nil
	}
	return closeFloats(gf, wf)
}

func closeFloats(gf, wf []float64) error {
	if len(gf) != len(wf) {
		return fmt.Errorf("%d values, want %d", len(gf), len(wf))
	}
	for i := range wf {
		if math.IsNaN(wf[i]) && math.IsNaN(gf[i]) {
			continue
		}
		if math.IsInf(wf[i], 0) && gf[i] == wf[i] {
			continue
		}
		if math.Abs(gf[i]-wf[i]) > 1e-7+1e-3*math.Abs(wf[i]) {
			return fmt.Errorf("[%d] = %v, want %v", i, gf[i], wf[i])
		}
	}
	return nil
}

type backendCase struct {
	name    string // the node test, e.g. test_abs
	model   string // its model name in the host's repository
	inputs  []*pbTensor
	outputs []*pbTensor
}

// selectBackend reads the node tests the host can carry: every input and output a
// tensor of rank >= 1 in an OIP datatype, inputs sharing their first dimension (the
// host's batch rule), no optional input left out. It writes each as <model>/v1 with a
// model.yaml of the test's exact shapes and the graph's names.
func selectBackend(t *testing.T, repo string) (cases []backendCase, skipped map[string]string) {
	skipped = map[string]string{}
	dirs, err := os.ReadDir(backendData)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range dirs {
		name := d.Name()
		dir := filepath.Join(backendData, name)
		gin, gout, err := onnx.Describe(onnx.Config{}, filepath.Join(dir, "model.onnx"))
		if err != nil {
			skipped[name] = "graph: " + err.Error()
			continue
		}
		c := backendCase{name: name, model: fmt.Sprintf("node-%04d", len(cases))}
		read := func(prefix string, n int) ([]*pbTensor, error) {
			var ts []*pbTensor
			for k := range n {
				b, err := os.ReadFile(filepath.Join(dir, "test_data_set_0", fmt.Sprintf("%s_%d.pb", prefix, k)))
				if err != nil {
					return nil, err
				}
				pt, err := parseTensorProto(b)
				if err != nil {
					return nil, err
				}
				if pt.datatype == "" || len(pt.dims) == 0 {
					return nil, fmt.Errorf("%s_%d: data type %d rank %d", prefix, k, pt.dtype, len(pt.dims))
				}
				ts = append(ts, pt)
			}
			return ts, nil
		}
		if c.inputs, err = read("input", len(gin)); err == nil {
			c.outputs, err = read("output", len(gout))
		}
		if err == nil && len(c.inputs) == 0 {
			err = fmt.Errorf("no inputs")
		}
		if err != nil {
			skipped[name] = err.Error()
			continue
		}
		var y strings.Builder
		y.WriteString("runtime: onnx\nartifact: model.onnx\ninputs:\n")
		batch := c.inputs[0].dims[0]
		for k, in := range c.inputs {
			if in.dims[0] != batch {
				err = fmt.Errorf("inputs differ in the first dimension")
			}
			fmt.Fprintf(&y, "  - {name: %q, datatype: %s, shape: %s}\n", gin[k].Name, in.datatype, yamlShape(in.dims))
		}
		y.WriteString("outputs:\n")
		for k, out := range c.outputs {
			fmt.Fprintf(&y, "  - {name: %q, datatype: %s, shape: %s}\n", gout[k].Name, out.datatype, yamlShape(out.dims))
			out.name = gout[k].Name
		}
		for k := range c.inputs {
			c.inputs[k].name = gin[k].Name
		}
		if err == nil && slices.ContainsFunc(append(slices.Clone(c.inputs), c.outputs...), func(p *pbTensor) bool { return slices.Contains(p.dims, 0) }) {
			err = fmt.Errorf("an empty dimension")
		}
		if ok, fp16 := c.floatsOnly(); err == nil && fp16 && !ok {
			err = fmt.Errorf("FP16 with non-float tensors")
		}
		if err != nil {
			skipped[name] = err.Error()
			continue
		}
		vdir := filepath.Join(repo, c.model, "v1")
		writeFile(t, filepath.Join(vdir, "model.yaml"), y.String())
		b, err := os.ReadFile(filepath.Join(dir, "model.onnx"))
		if err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(vdir, "model.onnx"), string(b))
		cases = append(cases, c)
	}
	return cases, skipped
}

func yamlShape(d []int64) string {
	s := make([]string, len(d))
	for i, x := range d {
		s[i] = strconv.FormatInt(x, 10)
	}
	return "[" + strings.Join(s, ", ") + "]"
}

// TestONNXBackendNodeTests runs ONNX's backend node tests (Debian's libonnx-testdata)
// that the host can carry through a real host over gRPC, logs how many pass, and fails
// only when a test in backend-pass.txt no longer passes.
func TestONNXBackendNodeTests(t *testing.T) {
	needONNXRuntime(t)
	if _, err := os.Stat(backendData); err != nil {
		t.Skipf("skipped: no ONNX backend test data at %s (as root: apt-get install libonnx-testdata; make onnxruntime does)", backendData)
	}
	repo := t.TempDir()
	cases, skipped := selectBackend(t, repo)
	h := startHost(t, repo, func(c *modelhost.Config) { c.MaxBodyBytes = 64 << 20 })
	var passed []string
	failed := map[string]string{}
	for _, c := range cases {
		req := &oip.ModelInferRequest{ModelName: c.model}
		_, raw := c.floatsOnly() // FP16 cases go raw
		for _, in := range c.inputs {
			pt := &oip.ModelInferRequest_InferInputTensor{Name: in.name, Datatype: in.datatype, Shape: in.dims}
			if raw {
				req.RawInputContents = append(req.RawInputContents, in.rawOf())
			} else {
				pt.Contents = in.contents()
			}
			req.Inputs = append(req.Inputs, pt)
		}
		resp, err := h.grpc.ModelInfer(context.Background(), req)
		if err == nil {
			for k, want := range c.outputs {
				if raw && len(resp.RawOutputContents) == len(c.outputs) {
					err = want.matchesRaw(resp.Outputs[k], resp.RawOutputContents[k])
				} else {
					err = want.matches(resp.Outputs[k])
				}
				if err != nil {
					err = fmt.Errorf("output %q: %w", want.name, err)
					break
				}
			}
		}
		if err != nil {
			failed[c.name] = err.Error()
			continue
		}
		passed = append(passed, c.name)
	}
	t.Logf("ONNX backend node tests through the host (gRPC): %d passed, %d failed, of %d selected; %d not selected (datatype, rank 0, optional inputs, inputs of different first dimensions, empty tensors)",
		len(passed), len(failed), len(cases), len(skipped))
	why := map[string]int{}
	for _, r := range skipped {
		switch {
		case strings.Contains(r, "data type 16 "):
			r = "BF16 tensor"
		case strings.Contains(r, " rank 0"):
			r = "rank-0 tensor (model.yaml shapes have rank >= 1)"
		case strings.HasPrefix(r, "graph: "):
			r = "graph with a non-tensor or unmapped input/output type"
		case strings.Contains(r, "no such file"):
			r = "optional input or output left out of the test data"
		}
		why[r]++
	}
	for _, r := range slices.Sorted(maps.Keys(why)) {
		t.Logf("  not selected: %d x %.120s", why[r], r)
	}
	for _, n := range slices.Sorted(maps.Keys(failed)) {
		t.Logf("  failed %s: %.300s", n, failed[n])
	}
	if os.Getenv("PATCHBAY_ONNX_BACKEND_WRITE") != "" {
		writeFile(t, backendPass, strings.Join(passed, "\n")+"\n")
		return
	}
	b, err := os.ReadFile(backendPass)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range strings.Fields(string(b)) {
		if !slices.Contains(passed, want) {
			reason := failed[want]
			if reason == "" {
				reason = "not selected: " + skipped[want]
			}
			t.Errorf("regression: %s passed before: %s", want, reason)
		}
	}
}

// halfLE is the little-endian binary16 raw contents of values that are halves.
func halfLE(t testing.TB, vals []any) []byte {
	t.Helper()
	var b []byte
	for _, v := range vals {
		f := v.(float64)
		h := tensor.F16FromFloat64(f)
		if tensor.F16ToFloat64(h) != f {
			t.Fatalf("%v is not a half", f)
		}
		b = binary.LittleEndian.AppendUint16(b, h)
	}
	return b
}

// fromHalfLE reads little-endian binary16 raw contents as JSON-like float64 values.
func fromHalfLE(t testing.TB, b []byte) []any {
	t.Helper()
	if len(b)%2 != 0 {
		t.Fatalf("raw FP16 contents of %d bytes", len(b))
	}
	var out []any
	for i := 0; i < len(b); i += 2 {
		out = append(out, tensor.F16ToFloat64(binary.LittleEndian.Uint16(b[i:])))
	}
	return out
}

// TestONNXFP16OverOIP: the FP16 fixture graph declared FP16 takes and gives FP16 on the
// wire — REST as JSON numbers, gRPC as little-endian raw contents (the OIP gRPC spec has
// no fp16 typed field) — matching numpy within the FP16 tolerance; typed gRPC contents
// for an FP16 input are InvalidArgument; dynamic batching concatenates and splits FP16.
func TestONNXFP16OverOIP(t *testing.T) {
	needONNXRuntime(t)
	h := startHost(t, onnxRepo(t), nil)
	e := readONNXExpected(t, "fp16")
	c := e.Cases[0]
	in, want := c.Inputs[0], c.Outputs[0]
	in.Datatype = "FP16" // the fixture's inputs are halves, written as FP32
	want.Datatype = "FP16"

	var rawOut []byte // the gRPC output's bits, which REST's numbers must read back as
	t.Run("grpc raw", func(t *testing.T) {
		resp, err := h.grpc.ModelInfer(context.Background(), &oip.ModelInferRequest{ModelName: "fp16-native",
			Inputs:           []*oip.ModelInferRequest_InferInputTensor{{Name: in.Name, Datatype: "FP16", Shape: in.Shape}},
			RawInputContents: [][]byte{halfLE(t, in.Data)}})
		if err != nil {
			t.Fatal(err)
		}
		o := resp.Outputs[0]
		if o.GetContents() != nil || len(resp.RawOutputContents) != 1 {
			t.Fatalf("FP16 output not in raw_output_contents: %v", resp)
		}
		compareONNX(t, e, want, o.Name, o.Datatype, o.Shape, fromHalfLE(t, resp.RawOutputContents[0]))
		rawOut = resp.RawOutputContents[0]
	})
	t.Run("rest", func(t *testing.T) {
		body, _ := json.Marshal(map[string]any{"inputs": []onnxValue{in}})
		var got restOutputs
		if resp := h.do(t, "POST", "/v2/models/fp16-native/infer", string(body), nil, &got); resp.StatusCode != http.StatusOK {
			t.Fatalf("%d: %s", resp.StatusCode, got.Error)
		}
		o := got.Outputs[0]
		compareONNX(t, e, want, o.Name, o.Datatype, o.Shape, o.Data)
		if len(rawOut) != 2*len(o.Data) {
			t.Fatalf("no gRPC output to compare with (%d bytes)", len(rawOut))
		}
		for i, d := range o.Data { // each number reads back as the very half gRPC gave
			if h, want := tensor.F16FromFloat64(d.(float64)), binary.LittleEndian.Uint16(rawOut[2*i:]); h != want {
				t.Fatalf("output[%d] = %v reads as %#04x, gRPC gave %#04x", i, d, h, want)
			}
		}
		var bad restOutputs
		resp := h.do(t, "POST", "/v2/models/fp16-native/infer", `{"inputs":[{"name":"x","datatype":"FP16","shape":[1,4],"data":[1,2,"3",4]}]}`, nil, &bad)
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(bad.Error, "not a FP16") {
			t.Fatalf("a string in FP16 data: %d %q", resp.StatusCode, bad.Error)
		}
	})
	t.Run("grpc typed request, FP16 output", func(t *testing.T) {
		// A typed FP32 input, an FP16 output: the response is all raw (no FP16 typed field).
		resp, err := h.grpc.ModelInfer(context.Background(), &oip.ModelInferRequest{ModelName: "fp16-mixed",
			Inputs: []*oip.ModelInferRequest_InferInputTensor{grpcTensor(c.Inputs[0])}})
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.RawOutputContents) != 1 || resp.Outputs[0].GetContents() != nil {
			t.Fatalf("FP16 output not raw: %v", resp)
		}
		o := resp.Outputs[0]
		compareONNX(t, e, want, o.Name, o.Datatype, o.Shape, fromHalfLE(t, resp.RawOutputContents[0]))
	})
	t.Run("grpc typed contents refused", func(t *testing.T) {
		_, err := h.grpc.ModelInfer(context.Background(), &oip.ModelInferRequest{ModelName: "fp16-native",
			Inputs: []*oip.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP16", Shape: []int64{1, 4},
				Contents: &oip.InferTensorContents{Fp32Contents: []float32{1, 2, 3, 4}}}}})
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "raw_input_contents") {
			t.Fatalf("typed FP16 contents: %v", err)
		}
		_, err = h.grpc.ModelInfer(context.Background(), &oip.ModelInferRequest{ModelName: "fp16-native",
			Inputs:           []*oip.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP16", Shape: []int64{1, 4}}},
			RawInputContents: [][]byte{make([]byte, 7)}})
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "needs 8") {
			t.Fatalf("7 raw bytes for 4 halves: %v", err)
		}
	})
	t.Run("batched", func(t *testing.T) {
		rows := int(in.Shape[0])
		var wg sync.WaitGroup
		errs := make(chan error, rows)
		for r := range rows {
			wg.Go(func() {
				resp, err := h.grpc.ModelInfer(context.Background(), &oip.ModelInferRequest{ModelName: "fp16-native-batched",
					Inputs:           []*oip.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP16", Shape: []int64{1, 4}}},
					RawInputContents: [][]byte{halfLE(t, in.Data[r*4:r*4+4])}})
				if err != nil {
					errs <- err
					return
				}
				got := fromHalfLE(t, resp.RawOutputContents[0])
				tol := e.Tolerance["FP16"]
				for j := range 2 {
					w := want.Data[r*2+j].(float64)
					if g := got[j].(float64); math.Abs(g-w) > tol.Abs+tol.Rel*math.Abs(w) {
						errs <- fmt.Errorf("row %d: y[%d] = %v, want %v", r, j, g, w)
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
	})
}

// TestONNXFP16OutputHistogram: an FP16 output's values feed patchbay_modelhost_output as
// every numeric output's do (the drift gate of canary analysis reads them).
func TestONNXFP16OutputHistogram(t *testing.T) {
	needONNXRuntime(t)
	h := startHost(t, onnxRepo(t), nil)
	e := readONNXExpected(t, "fp16")
	in := e.Cases[0].Inputs[0]
	in.Datatype = "FP16"
	body, _ := json.Marshal(map[string]any{"inputs": []onnxValue{in}})
	var got restOutputs
	if resp := h.do(t, "POST", "/v2/models/fp16-native/infer", string(body), nil, &got); resp.StatusCode != http.StatusOK {
		t.Fatalf("%d: %s", resp.StatusCode, got.Error)
	}
	n := 1
	for _, d := range got.Outputs[0].Shape {
		n *= int(d)
	}
	text := scrape(t, h.url)
	want := fmt.Sprintf(`patchbay_modelhost_output_count{model="fp16-native",output="%s",traffic="live",version="v1"} %d`, got.Outputs[0].Name, n)
	if !strings.Contains(text, want) {
		t.Fatalf("no FP16 output histogram: want %q in /metrics:\n%s", want, grepLines(text, "patchbay_modelhost_output_count"))
	}
}
