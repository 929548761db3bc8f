//go:build cgo

package onnx

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	rt "github.com/patchbay-io/patchbay/modelhost/runtime"
	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

const fixtures = "../../../test/fixtures/onnx"

// needLibrary skips when ONNX Runtime cannot be found (make test installs it first).
func needLibrary(t testing.TB) {
	t.Helper()
	if _, err := FindLibrary(""); err != nil {
		t.Skipf("skipped: %v", err)
	}
}

// Expected is test/fixtures/onnx/<case>/expected.json (written by gen.py with numpy).
type Expected struct {
	Tolerance map[string]struct{ Abs, Rel float64 } `json:"tolerance"`
	Cases     []struct {
		Name    string      `json:"name"`
		Inputs  []JSONValue `json:"inputs"`
		Outputs []JSONValue `json:"outputs"`
	} `json:"cases"`
}

// JSONValue is one tensor in expected.json; Tolerance names a tolerance other than
// the datatype's (FP16 outputs served as FP32).
type JSONValue struct {
	Name      string            `json:"name"`
	Datatype  string            `json:"datatype"`
	Shape     []int64           `json:"shape"`
	Data      []json.RawMessage `json:"data"`
	Tolerance string            `json:"tolerance"`
}

func readExpected(t testing.TB, name string) Expected {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(fixtures, name, "expected.json"))
	if err != nil {
		t.Fatal(err)
	}
	var e Expected
	if err := json.Unmarshal(b, &e); err != nil {
		t.Fatal(err)
	}
	return e
}

func (v JSONValue) tensor(t testing.TB) *tensor.Tensor {
	t.Helper()
	dt, ok := tensor.ParseDatatype(v.Datatype)
	if !ok {
		t.Fatalf("datatype %q", v.Datatype)
	}
	x := &tensor.Tensor{Name: v.Name, Datatype: dt, Shape: v.Shape}
	for _, raw := range v.Data {
		var err error
		switch dt {
		case tensor.FP32:
			var f float64
			err = json.Unmarshal(raw, &f)
			x.F32 = append(x.F32, float32(f))
		case tensor.BOOL:
			var b bool
			err = json.Unmarshal(raw, &b)
			x.Bool = append(x.Bool, b)
		case tensor.BYTES:
			var s string
			err = json.Unmarshal(raw, &s)
			x.Bytes = append(x.Bytes, []byte(s))
		default:
			var n int64
			err = json.Unmarshal(raw, &n)
			x.I64 = append(x.I64, n)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	return x
}

// compare checks got against want within the datatype's tolerance from expected.json.
func compare(t testing.TB, e Expected, want JSONValue, got *tensor.Tensor) {
	t.Helper()
	w := want.tensor(t)
	if got.Name != w.Name || got.Datatype != w.Datatype || tensor.FormatShape(got.Shape) != tensor.FormatShape(w.Shape) {
		t.Fatalf("output %s %s %s, want %s %s %s", got.Name, got.Datatype, tensor.FormatShape(got.Shape), w.Name, w.Datatype, tensor.FormatShape(w.Shape))
	}
	tolName := want.Tolerance
	if tolName == "" {
		tolName = want.Datatype
	}
	tol := e.Tolerance[tolName]
	switch w.Datatype {
	case tensor.FP32:
		for i := range w.F32 {
			if d := math.Abs(float64(got.F32[i] - w.F32[i])); d > tol.Abs+tol.Rel*math.Abs(float64(w.F32[i])) {
				t.Fatalf("output %s[%d] = %v, want %v (tolerance %s: abs %g + rel %g)", w.Name, i, got.F32[i], w.F32[i], tolName, tol.Abs, tol.Rel)
			}
		}
	case tensor.BOOL:
		for i := range w.Bool {
			if got.Bool[i] != w.Bool[i] {
				t.Fatalf("output %s[%d] = %v, want %v", w.Name, i, got.Bool[i], w.Bool[i])
			}
		}
	case tensor.BYTES:
		for i := range w.Bytes {
			if string(got.Bytes[i]) != string(w.Bytes[i]) {
				t.Fatalf("output %s[%d] = %q, want %q", w.Name, i, got.Bytes[i], w.Bytes[i])
			}
		}
	default:
		for i := range w.I64 {
			if got.I64[i] != w.I64[i] {
				t.Fatalf("output %s[%d] = %d, want %d", w.Name, i, got.I64[i], w.I64[i])
			}
		}
	}
}

// specOf reads a fixture's model.yaml signature (the tests here bypass the host).
func specOf(t testing.TB, dir string) rt.Spec {
	t.Helper()
	e := readExpected(t, filepath.Base(dir))
	s := rt.Spec{Dir: dir, Artifact: filepath.Join(dir, "model.onnx")}
	for _, v := range e.Cases[0].Inputs {
		dt, _ := tensor.ParseDatatype(v.Datatype)
		s.Inputs = append(s.Inputs, tensor.Meta{Name: v.Name, Datatype: dt, Shape: batchDim(v.Shape)})
	}
	for _, v := range e.Cases[0].Outputs {
		dt, _ := tensor.ParseDatatype(v.Datatype)
		s.Outputs = append(s.Outputs, tensor.Meta{Name: v.Name, Datatype: dt, Shape: batchDim(v.Shape)})
	}
	return s
}

func batchDim(s []int64) []int64 {
	s = append([]int64(nil), s...)
	s[0] = -1
	return s
}

// TestFixtures runs every fixture through the runtime directly and compares with the
// numpy reference: FP32, FP16 (served as FP32), INT32 and BOOL inputs; FP32, BOOL,
// INT64 and BYTES outputs; string inputs through ai.onnx.ml's LabelEncoder.
func TestFixtures(t *testing.T) {
	needLibrary(t)
	for _, name := range []string{"mlp", "two_inputs", "masked", "fp16", "strings", "mlp-large"} {
		t.Run(name, func(t *testing.T) {
			dir := filepath.Join(fixtures, name)
			m, err := Load(specOf(t, dir))
			if err != nil {
				t.Fatal(err)
			}
			defer m.(*Model).Close()
			e := readExpected(t, name)
			for _, c := range e.Cases {
				var in []*tensor.Tensor
				for _, v := range c.Inputs {
					in = append(in, v.tensor(t))
				}
				out, err := m.Predict(context.Background(), in)
				if err != nil {
					t.Fatalf("%s: %v", c.Name, err)
				}
				if len(out) != len(c.Outputs) {
					t.Fatalf("%s: %d outputs, want %d", c.Name, len(out), len(c.Outputs))
				}
				for i, w := range c.Outputs {
					compare(t, e, w, out[i])
				}
			}
		})
	}
}

// TestSignatureChecked: model.yaml must match the graph, and each mismatch is named.
func TestSignatureChecked(t *testing.T) {
	needLibrary(t)
	dir := filepath.Join(fixtures, "mlp")
	good := specOf(t, dir)
	for _, c := range []struct {
		name   string
		mutate func(*rt.Spec)
		want   string
	}{
		{"datatype", func(s *rt.Spec) { s.Inputs[0].Datatype = tensor.FP64 }, `input "features": model.yaml says datatype FP64, the graph's is FP32`},
		{"fixed dim", func(s *rt.Spec) { s.Inputs[0].Shape = []int64{-1, 9} }, "dimension 1 is fixed at 8"},
		{"rank", func(s *rt.Spec) { s.Outputs[0].Shape = []int64{-1} }, "rank 2, not 1"},
		{"unknown input", func(s *rt.Spec) { s.Inputs[0].Name = "x" }, `model.yaml's input "x" is not in the graph (graph inputs: features FP32 [-1, 8])`},
		{"missing input", func(s *rt.Spec) { s.Inputs[0].Name = "x" }, `the graph's input "features" (FP32 [-1, 8]) is missing from model.yaml's inputs`},
		{"unknown output", func(s *rt.Spec) { s.Outputs[0].Name = "probs" }, `model.yaml's output "probs" is not in the graph`},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := good
			s.Inputs = append([]tensor.Meta(nil), good.Inputs...)
			s.Outputs = append([]tensor.Meta(nil), good.Outputs...)
			c.mutate(&s)
			_, err := Load(s)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want it to contain %q", err, c.want)
			}
		})
	}
	// A fixed batch in model.yaml is fine where the graph's dimension is dynamic.
	s := good
	s.Inputs = []tensor.Meta{{Name: "features", Datatype: tensor.FP32, Shape: []int64{2, 8}}}
	m, err := Load(s)
	if err != nil {
		t.Fatal(err)
	}
	m.(*Model).Close()
	// A float16 tensor is FP16 or FP32 in model.yaml; anything else says so.
	fs := specOf(t, filepath.Join(fixtures, "fp16"))
	fs.Inputs[0].Datatype = tensor.FP64
	if _, err := Load(fs); err == nil || !strings.Contains(err.Error(), "served as FP16, or as FP32") {
		t.Fatalf("FP64 declared over float16: %v", err)
	}
}

// TestFP16Native: the fixture's float16 graph declared FP16 in and out takes and gives
// binary16 bits with no FP32 step, and matches numpy within the FP16 tolerance.
func TestFP16Native(t *testing.T) {
	needLibrary(t)
	dir := filepath.Join(fixtures, "fp16")
	s := specOf(t, dir)
	s.Inputs[0].Datatype, s.Outputs[0].Datatype = tensor.FP16, tensor.FP16
	m, err := Load(s)
	if err != nil {
		t.Fatal(err)
	}
	defer m.(*Model).Close()
	e := readExpected(t, "fp16")
	for _, c := range e.Cases {
		in := c.Inputs[0].tensor(t)
		x := &tensor.Tensor{Name: in.Name, Datatype: tensor.FP16, Shape: in.Shape}
		for _, f := range in.F32 {
			h := tensor.F16FromFloat32(f)
			if tensor.F16ToFloat32(h) != f {
				t.Fatalf("input %v is not a half", f)
			}
			x.F16 = append(x.F16, h)
		}
		out, err := m.Predict(context.Background(), []*tensor.Tensor{x})
		if err != nil {
			t.Fatal(err)
		}
		got := out[0]
		if got.Datatype != tensor.FP16 || len(got.F16) == 0 || got.F32 != nil {
			t.Fatalf("output %s F16 %d F32 %d", got.Datatype, len(got.F16), len(got.F32))
		}
		as32 := &tensor.Tensor{Name: got.Name, Datatype: tensor.FP32, Shape: got.Shape}
		for _, h := range got.F16 {
			as32.F32 = append(as32.F32, tensor.F16ToFloat32(h))
		}
		compare(t, e, c.Outputs[0], as32)
	}
}

// TestSessionOptions: model.yaml's onnx: section is applied and checked with file:line.
func TestSessionOptions(t *testing.T) {
	needLibrary(t)
	src := filepath.Join(fixtures, "mlp")
	write := func(t *testing.T, extra string) rt.Spec {
		dir := t.TempDir()
		b, _ := os.ReadFile(filepath.Join(src, "model.onnx"))
		y, _ := os.ReadFile(filepath.Join(src, "model.yaml"))
		os.WriteFile(filepath.Join(dir, "model.onnx"), b, 0o644)
		os.WriteFile(filepath.Join(dir, "model.yaml"), append(y, extra...), 0o644)
		s := specOf(t, src)
		s.Dir, s.Artifact = dir, filepath.Join(dir, "model.onnx")
		return s
	}
	s := write(t, "onnx: {intra_op_threads: 2, inter_op_threads: 1, graph_optimization_level: basic}\n")
	o, err := ReadOptions(s.Dir)
	if err != nil || o != (Options{IntraOpThreads: 2, InterOpThreads: 1, GraphOptimization: "basic"}) {
		t.Fatalf("options %+v, %v", o, err)
	}
	m, err := Load(s)
	if err != nil {
		t.Fatal(err)
	}
	m.(*Model).Close()
	if o, _ := ReadOptions(write(t, "").Dir); o != DefaultOptions() {
		t.Fatalf("no onnx section: %+v, want the defaults", o)
	}
	for _, c := range []struct{ yaml, want string }{
		{"onnx:\n  intra_op_threads: many\n", `model.yaml:7: onnx.intra_op_threads: "many", want a thread count`},
		{"onnx:\n  graph_optimization_level: max\n", `model.yaml:7: onnx.graph_optimization_level: "max", want disable, basic, extended or all`},
		{"onnx:\n  threads: 2\n", "model.yaml:7: onnx.threads: unknown session option"},
		{"onnx: 3\n", "model.yaml:6: onnx: want a mapping"},
	} {
		if _, err := Load(write(t, c.yaml)); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: error %v, want %q", c.yaml, err, c.want)
		}
	}
}

// TestMissingLibrary: a library that is not there is a load error naming how to get it.
func TestMissingLibrary(t *testing.T) {
	t.Setenv(EnvLibrary, "")
	_, err := Loader(Config{Library: "/nonexistent/libonnxruntime.so"})(specOf(t, filepath.Join(fixtures, "mlp")))
	if err == nil || !strings.Contains(err.Error(), "make onnxruntime") || !strings.Contains(err.Error(), "--onnxruntime-lib") {
		t.Fatalf("error %v, want one naming make onnxruntime and --onnxruntime-lib", err)
	}
	t.Setenv(EnvLibrary, "/nonexistent/env.so")
	if _, err := FindLibrary(""); err == nil || !strings.Contains(err.Error(), "$"+EnvLibrary) {
		t.Fatalf("env: %v", err)
	}
}

// TestUnloadReleases loads, runs and closes the MLP in a loop: the process' RSS must
// stay bounded, and a closed model refuses. The same loop without Close is measured
// first, so the test shows it would see a leaked session.
func TestUnloadReleases(t *testing.T) {
	needLibrary(t)
	s := specOf(t, filepath.Join(fixtures, "mlp"))
	x := readExpected(t, "mlp").Cases[1].Inputs[0].tensor(t)
	var leaked []*Model
	cycle := func(close bool) {
		m, err := Load(s)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := m.Predict(context.Background(), []*tensor.Tensor{x}); err != nil {
			t.Fatal(err)
		}
		if !close {
			leaked = append(leaked, m.(*Model))
			return
		}
		if err := m.(*Model).Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := m.Predict(context.Background(), []*tensor.Tensor{x}); err == nil || !strings.Contains(err.Error(), "unloaded") {
			t.Fatalf("predict after close: %v", err)
		}
	}
	growth := func(n int, close bool) int64 {
		runtime.GC()
		before := rss(t)
		for range n {
			cycle(close)
		}
		runtime.GC()
		return rss(t) - before
	}
	growth(50, true) // warm up: arenas, thread pools, the Go heap
	const n = 300
	leak := growth(n, false)
	for _, m := range leaked {
		m.Close()
	}
	closed := growth(n, true)
	t.Logf("RSS growth over %d load/predict cycles: %d KiB without Close, %d KiB with Close", n, leak>>10, closed>>10)
	if leak < 4<<20 {
		t.Fatalf("the loop without Close grew only %d KiB: too small a model to see a leak", leak>>10)
	}
	if closed > leak/4 {
		t.Fatalf("RSS grew %d KiB over %d cycles with Close (%d KiB without)", closed>>10, n, leak>>10)
	}
}

// rss reads VmRSS from /proc/self/status.
func rss(t testing.TB) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skipf("skipped: no /proc/self/status: %v", err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			n, _ := strconv.ParseInt(f[1], 10, 64)
			return n << 10
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// TestCloseWaitsForPredictions: Close during concurrent predictions neither crashes nor
// frees the session under a running call; each call succeeds or says the model is gone.
func TestCloseWaitsForPredictions(t *testing.T) {
	needLibrary(t)
	s := specOf(t, filepath.Join(fixtures, "mlp"))
	x := readExpected(t, "mlp").Cases[2].Inputs[0].tensor(t)
	for range 20 {
		m, err := Load(s)
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		errs := make(chan error, 8*20)
		for range 8 {
			wg.Go(func() {
				for range 20 {
					out, err := m.Predict(context.Background(), []*tensor.Tensor{x})
					switch {
					case err != nil && !strings.Contains(err.Error(), "unloaded"):
						errs <- err
					case err == nil && len(out[0].F32) != 32*3:
						errs <- fmt.Errorf("%d values", len(out[0].F32))
					}
				}
			})
		}
		if err := m.(*Model).Close(); err != nil {
			t.Fatal(err)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
	}
}

// TestContextEnds: an ended context stops the prediction with its error; a live one
// with a deadline runs as usual.
func TestContextEnds(t *testing.T) {
	needLibrary(t)
	m, err := Load(specOf(t, filepath.Join(fixtures, "mlp")))
	if err != nil {
		t.Fatal(err)
	}
	defer m.(*Model).Close()
	x := readExpected(t, "mlp").Cases[0].Inputs[0].tensor(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := m.Predict(ctx, []*tensor.Tensor{x}); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v", err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := m.Predict(ctx, []*tensor.Tensor{x}); err != nil {
		t.Fatal(err)
	}
}
