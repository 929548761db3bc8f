package onnx

import (
	"unsafe"

	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

// An FP16 graph input or output is passed to ONNX Runtime as float16 bits. Declared
// FP16 in model.yaml, the tensor's own []uint16 is handed over in place; declared FP32
// (a model served as FP32 over OIP), the runtime converts at the boundary with the
// tensor package's binary16 conversions (round to nearest even).

func f32ToF16(f float32) uint16 { return tensor.F16FromFloat32(f) }

func f16ToF32(h uint16) float32 { return tensor.F16ToFloat32(h) }

func f32ToF16s(in []float32) []uint16 {
	out := make([]uint16, len(in))
	for i, f := range in {
		out[i] = f32ToF16(f)
	}
	return out
}

func f16sToF32(in []uint16) []float32 {
	out := make([]float32, len(in))
	for i, h := range in {
		out[i] = f16ToF32(h)
	}
	return out
}

// halfBytes views halves as the bytes ONNX Runtime reads for float16: the host's
// native layout, which is what a []uint16 in memory is. No copy; hs must stay alive
// (and unmodified) while the value that wraps it is in use.
func halfBytes(hs []uint16) []byte {
	if len(hs) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&hs[0])), 2*len(hs))
}
