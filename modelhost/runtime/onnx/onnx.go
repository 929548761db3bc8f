//go:build cgo

package onnx

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sync"

	ort "github.com/yalue/onnxruntime_go"

	"github.com/patchbay-io/patchbay/modelhost/runtime"
	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

// env is the process' one ONNX Runtime environment, created by the first load (a host
// without onnx models never loads the library) and kept for the process' life.
// Available is true in the cgo build: onnx models load when the library is found.
const Available = true

var env struct {
	sync.Mutex
	lib string // the library it was loaded from
}

// initEnv loads the library and creates the environment once; a failed attempt may be
// retried (after `make onnxruntime`, say).
func initEnv(cfg Config) error {
	lib, err := FindLibrary(cfg.Library)
	if err != nil {
		return err
	}
	abs, err := filepath.Abs(lib)
	if err == nil {
		lib = abs
	}
	env.Lock()
	defer env.Unlock()
	if env.lib != "" {
		if env.lib != lib {
			return fmt.Errorf("ONNX Runtime is already loaded from %s; one library per process (not %s)", env.lib, lib)
		}
		return nil
	}
	ort.SetSharedLibraryPath(lib)
	// Fatal only: errors come back to us as statuses, and would otherwise also be printed.
	if err := ort.InitializeEnvironment(ort.WithLogLevelFatal()); err != nil {
		return fmt.Errorf("load ONNX Runtime from %s: %w; %s", lib, err, howToGet)
	}
	env.lib = lib
	return nil
}

// Describe reads a model's graph signature (inputs and outputs with OIP datatypes and
// -1 for dynamic dimensions); an element type without an OIP datatype is an error.
func Describe(cfg Config, path string) (in, out []tensor.Meta, err error) {
	in, out, _, err = describe(cfg, path)
	return in, out, err
}

// describe is Describe plus the graph's element types by "in/<name>" and "out/<name>",
// from the one read of the graph's signature that load needs.
func describe(cfg Config, path string) (in, out []tensor.Meta, elems map[string]ort.TensorElementDataType, err error) {
	if err := initEnv(cfg); err != nil {
		return nil, nil, nil, err
	}
	gi, gout, err := ort.GetInputOutputInfo(path)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	elems = make(map[string]ort.TensorElementDataType, len(gi)+len(gout))
	conv := func(prefix string, infos []ort.InputOutputInfo) ([]tensor.Meta, error) {
		var ms []tensor.Meta
		for _, i := range infos {
			elems[prefix+i.Name] = i.DataType
			if i.OrtValueType != ort.ONNXTypeTensor {
				return nil, fmt.Errorf("%s: %q is a %s, only tensors are served", path, i.Name, i.OrtValueType)
			}
			dt, ok := oipOf(i.DataType)
			if !ok {
				return nil, fmt.Errorf("%s: %q has element type %s, which has no OIP datatype here", path, i.Name, i.DataType)
			}
			ms = append(ms, tensor.Meta{Name: i.Name, Datatype: dt, Shape: dims(i.Dimensions)})
		}
		return ms, nil
	}
	if in, err = conv("in/", gi); err != nil {
		return nil, nil, nil, err
	}
	if out, err = conv("out/", gout); err != nil {
		return nil, nil, nil, err
	}
	return in, out, elems, nil
}

// dims maps the graph's dimensions to model.yaml's: symbolic and unknown ones are -1.
func dims(s ort.Shape) []int64 {
	d := make([]int64, len(s))
	for i, v := range s {
		if v < 0 {
			v = -1
		}
		d[i] = v
	}
	return d
}

// oipOf is the OIP datatype an element type is served as. model.yaml may also declare
// a float16 input or output FP32, converted at the boundary (see checkMeta).
func oipOf(e ort.TensorElementDataType) (tensor.Datatype, bool) {
	switch e {
	case ort.TensorElementDataTypeFloat:
		return tensor.FP32, true
	case ort.TensorElementDataTypeFloat16:
		return tensor.FP16, true
	case ort.TensorElementDataTypeDouble:
		return tensor.FP64, true
	case ort.TensorElementDataTypeInt64:
		return tensor.INT64, true
	case ort.TensorElementDataTypeInt32:
		return tensor.INT32, true
	case ort.TensorElementDataTypeInt16:
		return tensor.INT16, true
	case ort.TensorElementDataTypeInt8:
		return tensor.INT8, true
	case ort.TensorElementDataTypeUint8:
		return tensor.UINT8, true
	case ort.TensorElementDataTypeUint16:
		return tensor.UINT16, true
	case ort.TensorElementDataTypeUint32:
		return tensor.UINT32, true
	case ort.TensorElementDataTypeUint64:
		return tensor.UINT64, true
	case ort.TensorElementDataTypeBool:
		return tensor.BOOL, true
	case ort.TensorElementDataTypeString:
		return tensor.BYTES, true
	}
	return tensor.Invalid, false
}

// port is one input or output: model.yaml's name and datatype, the graph's element type.
type port struct {
	name  string
	dt    tensor.Datatype
	elem  ort.TensorElementDataType
	shape []int64 // the graph's, -1 dynamic
}

// Model is a loaded ONNX model: one session, run concurrently (ONNX Runtime's Run is
// thread-safe), released by Close.
type Model struct {
	mu   sync.RWMutex // Predict holds it shared; Close exclusively
	sess *ort.DynamicAdvancedSession
	ins  []port
	outs []port
}

// Load is Loader(Config{}).
func Load(spec runtime.Spec) (runtime.Model, error) { return Loader(Config{})(spec) }

// Loader returns the onnx runtime's Loader for cfg.
func Loader(cfg Config) runtime.Loader {
	return func(spec runtime.Spec) (runtime.Model, error) { return load(cfg, spec) }
}

func load(cfg Config, spec runtime.Spec) (*Model, error) {
	opts, err := ReadOptions(spec.Dir)
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(spec.Artifact); err != nil {
		return nil, err
	}
	gin, gout, elems, err := describe(cfg, spec.Artifact)
	if err != nil {
		return nil, err
	}
	art := filepath.Base(spec.Artifact)
	m := &Model{}
	var errs []error
	used := map[string]bool{}
	match := func(kind string, want []tensor.Meta, graph []tensor.Meta, gelem func(string) ort.TensorElementDataType) []port {
		var ps []port
		for _, w := range want {
			var g *tensor.Meta
			for i := range graph {
				if graph[i].Name == w.Name {
					g = &graph[i]
				}
			}
			if g == nil {
				errs = append(errs, fmt.Errorf("%s: model.yaml's %s %q is not in the graph (graph %ss: %s)", art, kind, w.Name, kind, sig(graph)))
				continue
			}
			used[kind+"/"+w.Name] = true
			if err := checkMeta(w, *g, gelem(w.Name)); err != nil {
				errs = append(errs, fmt.Errorf("%s: %s %q: %w", art, kind, w.Name, err))
			}
			p := port{name: w.Name, dt: w.Datatype, elem: gelem(w.Name), shape: g.Shape}
			if kind == "output" && p.elem == ort.TensorElementDataTypeFloat16 && slices.Contains(g.Shape[min(1, len(g.Shape)):], -1) {
				// onnxruntime_go v1.27.0 copies an FP16 output it allocates with half its
				// bytes (createTensorFromOrtValue sizes the copy in elements), so FP16
				// outputs are allocated here, which needs their shape before the run.
				errs = append(errs, fmt.Errorf("%s: output %q: an FP16 output needs fixed dimensions after the first (the graph's shape is %s)", art, w.Name, tensor.FormatShape(g.Shape)))
			}
			ps = append(ps, p)
		}
		return ps
	}
	m.ins = match("input", spec.Inputs, gin, func(n string) ort.TensorElementDataType { return elems["in/"+n] })
	m.outs = match("output", spec.Outputs, gout, func(n string) ort.TensorElementDataType { return elems["out/"+n] })
	for _, g := range gin {
		if !used["input/"+g.Name] {
			errs = append(errs, fmt.Errorf("%s: the graph's input %q (%s %s) is missing from model.yaml's inputs", art, g.Name, g.Datatype, tensor.FormatShape(g.Shape)))
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	so, err := sessionOptions(opts)
	if err != nil {
		return nil, err
	}
	defer so.Destroy()
	inNames, outNames := make([]string, len(m.ins)), make([]string, len(m.outs))
	for i, p := range m.ins {
		inNames[i] = p.name
	}
	for i, p := range m.outs {
		outNames[i] = p.name
	}
	m.sess, err = ort.NewDynamicAdvancedSession(spec.Artifact, inNames, outNames, so)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", art, err)
	}
	return m, nil
}

func sig(ms []tensor.Meta) string {
	s := ""
	for i, m := range ms {
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprintf("%s %s %s", m.Name, m.Datatype, tensor.FormatShape(m.Shape))
	}
	return s
}

// checkMeta compares model.yaml's entry with the graph's: same datatype (or FP32 for a
// float16 one, converted at the boundary) and rank; a dimension the graph fixes must be
// that size in model.yaml, a dynamic one may be -1 or any size.
func checkMeta(want, graph tensor.Meta, elem ort.TensorElementDataType) error {
	if want.Datatype != graph.Datatype && (elem != ort.TensorElementDataTypeFloat16 || want.Datatype != tensor.FP32) {
		extra := ""
		if elem == ort.TensorElementDataTypeFloat16 {
			extra = " (a float16 tensor is served as FP16, or as FP32 converted at the boundary)"
		}
		return fmt.Errorf("model.yaml says datatype %s, the graph's is %s%s", want.Datatype, graph.Datatype, extra)
	}
	if len(want.Shape) != len(graph.Shape) {
		return fmt.Errorf("model.yaml says shape %s, the graph's is %s (rank %d, not %d)", tensor.FormatShape(want.Shape), tensor.FormatShape(graph.Shape), len(graph.Shape), len(want.Shape))
	}
	for i, g := range graph.Shape {
		if g >= 0 && want.Shape[i] != g {
			return fmt.Errorf("model.yaml says shape %s, the graph's is %s: dimension %d is fixed at %d", tensor.FormatShape(want.Shape), tensor.FormatShape(graph.Shape), i, g)
		}
	}
	return nil
}

func sessionOptions(o Options) (*ort.SessionOptions, error) {
	so, err := ort.NewSessionOptions()
	if err != nil {
		return nil, err
	}
	level := map[string]ort.GraphOptimizationLevel{
		"disable":  ort.GraphOptimizationLevelDisableAll,
		"basic":    ort.GraphOptimizationLevelEnableBasic,
		"extended": ort.GraphOptimizationLevelEnableExtended,
		"all":      ort.GraphOptimizationLevelEnableAll,
	}[o.GraphOptimization]
	for _, err := range []error{
		so.SetIntraOpNumThreads(o.IntraOpThreads),
		so.SetInterOpNumThreads(o.InterOpThreads),
		so.SetGraphOptimizationLevel(level),
	} {
		if err != nil {
			so.Destroy()
			return nil, fmt.Errorf("session options: %w", err)
		}
	}
	return so, nil
}

// Close releases the session; it waits for running predictions.
func (m *Model) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.sess == nil {
		return nil
	}
	err := m.sess.Destroy()
	m.sess = nil
	return err
}

// Predict runs the session on inputs (in model.yaml's order, already checked by the host).
func (m *Model) Predict(ctx context.Context, inputs []*tensor.Tensor) ([]*tensor.Tensor, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.sess == nil {
		return nil, errors.New("onnx: model unloaded")
	}
	if len(inputs) != len(m.ins) {
		return nil, fmt.Errorf("onnx: %d inputs, model has %d", len(inputs), len(m.ins))
	}
	in := make([]ort.Value, len(inputs))
	defer destroy(in)
	for i, t := range inputs {
		v, err := toORT(m.ins[i], t)
		if err != nil {
			return nil, fmt.Errorf("input %q: %w", m.ins[i].name, err)
		}
		in[i] = v
	}
	out := make([]ort.Value, len(m.outs))
	defer destroy(out)
	halves := make([][]uint16, len(m.outs)) // FP16 outputs' memory, allocated here
	for i, p := range m.outs {
		if p.elem != ort.TensorElementDataTypeFloat16 {
			continue // allocated by the run
		}
		shape := ort.NewShape(p.shape...)
		if len(shape) > 0 && shape[0] < 0 {
			shape[0] = inputs[0].Shape[0]
		}
		n := shape.FlattenedSize()
		if n == 0 {
			return nil, fmt.Errorf("output %q: an empty FP16 tensor is not supported", p.name)
		}
		halves[i] = make([]uint16, n)
		v, err := wrap(ort.NewCustomDataTensor(shape, halfBytes(halves[i]), ort.TensorElementDataTypeFloat16))
		if err != nil {
			return nil, fmt.Errorf("output %q: %w", p.name, err)
		}
		out[i] = v
	}
	if err := m.run(ctx, in, out); err != nil {
		return nil, err
	}
	res := make([]*tensor.Tensor, len(out))
	for i, v := range out {
		t, err := fromORT(m.outs[i], v, halves[i])
		if err != nil {
			return nil, fmt.Errorf("output %q: %w", m.outs[i].name, err)
		}
		res[i] = t
	}
	return res, nil
}

func convert[T, U int8 | int16 | int32 | uint8 | uint16 | uint32 | int64 | float32](in []U) []T {
	out := make([]T, len(in))
	for i, v := range in {
		out[i] = T(v)
	}
	return out
}

// toORT wraps t for the session: FP32, FP64, FP16, INT64, UINT64 and BOOL without a
// copy; narrower integers, FP32 for a float16 input and strings converted.
func toORT(p port, t *tensor.Tensor) (ort.Value, error) {
	shape := ort.NewShape(t.Shape...)
	if len(shape) == 0 {
		return nil, errors.New("rank-0 tensors are not supported")
	}
	switch p.elem {
	case ort.TensorElementDataTypeFloat:
		return wrap(ort.NewTensor(shape, t.F32))
	case ort.TensorElementDataTypeFloat16:
		hs := t.F16
		if t.Datatype == tensor.FP32 {
			hs = f32ToF16s(t.F32)
		}
		if len(hs) == 0 {
			return nil, errors.New("an empty FP16 tensor is not supported")
		}
		return wrap(ort.NewCustomDataTensor(shape, halfBytes(hs), ort.TensorElementDataTypeFloat16))
	case ort.TensorElementDataTypeDouble:
		return wrap(ort.NewTensor(shape, t.F64))
	case ort.TensorElementDataTypeInt64:
		return wrap(ort.NewTensor(shape, t.I64))
	case ort.TensorElementDataTypeInt32:
		return wrap(ort.NewTensor(shape, convert[int32](t.I64)))
	case ort.TensorElementDataTypeInt16:
		return wrap(ort.NewTensor(shape, convert[int16](t.I64)))
	case ort.TensorElementDataTypeInt8:
		return wrap(ort.NewTensor(shape, convert[int8](t.I64)))
	case ort.TensorElementDataTypeUint8:
		return wrap(ort.NewTensor(shape, convert[uint8](t.I64)))
	case ort.TensorElementDataTypeUint16:
		return wrap(ort.NewTensor(shape, convert[uint16](t.I64)))
	case ort.TensorElementDataTypeUint32:
		return wrap(ort.NewTensor(shape, convert[uint32](t.I64)))
	case ort.TensorElementDataTypeUint64:
		return wrap(ort.NewTensor(shape, t.U64))
	case ort.TensorElementDataTypeBool:
		return wrap(ort.NewTensor(shape, t.Bool))
	case ort.TensorElementDataTypeString:
		st, err := ort.NewStringTensor(shape)
		if err != nil {
			return nil, err
		}
		ss := make([]string, len(t.Bytes))
		for i, b := range t.Bytes {
			ss[i] = string(b)
		}
		if err := st.SetContents(ss); err != nil {
			_ = st.Destroy()
			return nil, err
		}
		return st, nil
	}
	return nil, fmt.Errorf("element type %s unsupported", p.elem)
}

// destroy releases values, skipping nil ones and the typed nils onnxruntime_go leaves
// in outputs it failed to convert.
func destroy(vs []ort.Value) {
	for _, v := range vs {
		if v != nil && !reflect.ValueOf(v).IsNil() {
			_ = v.Destroy()
		}
	}
}

// run runs the session; a context that ends stops the run (ONNX Runtime's terminate
// flag, checked between operators) and the error says why.
//
// It runs on the caller's goroutine, as measured (BenchmarkPredictLatency, mlp-large at
// batch 1, 2-core VM, medians of 1000 calls, 2 runs): Predict here 366/375 µs back to back
// (the bench's direct baseline: ~372 µs), so the runtime adds nothing measurable. Handing
// the run to a goroutine locked to its OS thread (so ONNX Runtime always runs on one warm
// thread) measured 424/441 µs: the channel hand-off and the parked thread's wake-up cost
// more than any thread-local warmth gives back, so there is no such pool. The RunOptions
// made for a cancellable context (every gRPC and REST request's) cost nothing measurable
// (362/363 µs). After an idle gap (as between a host's requests) a run is ~15–25 µs
// slower (391/400 µs), whichever thread runs it. Session options tried for this
// (BenchmarkPredictLatency after a gap, 2 runs each): CPU memory arena off 416/353 µs,
// memory pattern off 358/354 µs, ONNX Runtime's defaults 377/383 µs: noise, so they stay
// ONNX Runtime's defaults and are not in model.yaml; with intra_op_threads 1 there is no
// intra-op pool to spin.
func (m *Model) run(ctx context.Context, in, out []ort.Value) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if ctx.Done() == nil {
		if err := m.sess.Run(in, out); err != nil {
			return fmt.Errorf("onnx: %w", err)
		}
		return nil
	}
	ro, err := ort.NewRunOptions()
	if err != nil {
		return fmt.Errorf("onnx: %w", err)
	}
	defer ro.Destroy()
	stop := context.AfterFunc(ctx, func() { _ = ro.Terminate() })
	err = m.sess.RunWithOptions(in, out, ro)
	if !stop() && ctx.Err() != nil {
		return fmt.Errorf("onnx: run stopped: %w", ctx.Err())
	}
	if err != nil {
		return fmt.Errorf("onnx: %w", err)
	}
	return nil
}

// wrap keeps a failed constructor's typed nil out of the ort.Value interface.
func wrap[V ort.Value](v V, err error) (ort.Value, error) {
	if err != nil {
		return nil, err
	}
	return v, nil
}

// fromORT copies an output into a tensor of the port's OIP datatype. Numeric outputs
// come from onnxruntime_go already copied into Go memory, which the tensor keeps; a
// float16 one is in half, the memory Predict allocated for it.
func fromORT(p port, v ort.Value, half []uint16) (*tensor.Tensor, error) {
	t := &tensor.Tensor{Name: p.name, Datatype: p.dt, Shape: []int64(v.GetShape().Clone())}
	switch x := v.(type) {
	case *ort.Tensor[float32]:
		t.F32 = x.GetData()
	case *ort.Tensor[float64]:
		t.F64 = x.GetData()
	case *ort.Tensor[int64]:
		t.I64 = x.GetData()
	case *ort.Tensor[int32]:
		t.I64 = convert[int64](x.GetData())
	case *ort.Tensor[int16]:
		t.I64 = convert[int64](x.GetData())
	case *ort.Tensor[int8]:
		t.I64 = convert[int64](x.GetData())
	case *ort.Tensor[uint8]:
		t.I64 = convert[int64](x.GetData())
	case *ort.Tensor[uint16]:
		t.I64 = convert[int64](x.GetData())
	case *ort.Tensor[uint32]:
		t.I64 = convert[int64](x.GetData())
	case *ort.Tensor[uint64]:
		t.U64 = x.GetData()
	case *ort.Tensor[bool]:
		t.Bool = x.GetData()
	case *ort.CustomDataTensor:
		if x.DataType() != ort.TensorElementDataTypeFloat16 || len(half) != int(x.GetShape().FlattenedSize()) {
			return nil, fmt.Errorf("element type %d unsupported", x.DataType())
		}
		if p.dt == tensor.FP16 {
			t.F16 = half
		} else {
			t.F32 = f16sToF32(half)
		}
	case *ort.StringTensor:
		ss, err := x.GetContents()
		if err != nil {
			return nil, err
		}
		t.Bytes = make([][]byte, len(ss))
		for i, s := range ss {
			t.Bytes[i] = []byte(s)
		}
	default:
		return nil, fmt.Errorf("value %T unsupported", v)
	}
	if t.Datatype == tensor.FP32 && t.F32 == nil {
		return nil, fmt.Errorf("the graph's output is not float (%T)", v)
	}
	return t, nil
}
