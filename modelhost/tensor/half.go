package tensor

import "math"

// FP16 elements are held as IEEE 754 binary16 bit patterns (Tensor.F16): what the
// gRPC raw contents and ONNX Runtime's float16 carry, two bytes each, with no
// conversion on the way through. JSON and the runtimes that compute in float32 or
// float64 convert with the functions here.

// F16FromFloat64 rounds f to the nearest binary16, ties to even (IEEE 754's default
// rounding); magnitudes beyond the largest half (65504) that round up become ±Inf,
// tiny ones ±0 or a subnormal; NaN stays NaN (quiet, sign and the payload's top bits
// kept).
func F16FromFloat64(f float64) uint16 {
	b := math.Float64bits(f)
	sign := uint16(b>>48) & 0x8000
	exp := int(b>>52) & 0x7ff
	man := b & (1<<52 - 1)
	if exp == 0x7ff {
		if man != 0 {
			return sign | 0x7e00 | uint16(man>>42)
		}
		return sign | 0x7c00
	}
	e := exp - 1023
	switch {
	case e > 15:
		return sign | 0x7c00
	case e >= -14: // normal: keep 10 of the 52 fraction bits
		h := uint64(e+15)<<10 | man>>42
		return sign | uint16(roundEven(h, man&(1<<42-1), 1<<41)) // a carry may reach Inf: correct
	case e >= -25: // subnormal: the implicit bit joins the fraction
		m := man | 1<<52
		shift := uint(42 + (-14 - e))
		return sign | uint16(roundEven(m>>shift, m&(1<<shift-1), 1<<(shift-1)))
	}
	return sign // below half the smallest subnormal: ±0
}

// roundEven rounds the truncated h up when the dropped bits rest exceed half an
// ulp, or equal it and h is odd.
func roundEven(h, rest, half uint64) uint64 {
	if rest > half || rest == half && h&1 == 1 {
		h++
	}
	return h
}

// F16FromFloat32 is F16FromFloat64 for a float32 (widening is exact, so there is one
// rounding).
func F16FromFloat32(f float32) uint16 { return F16FromFloat64(float64(f)) }

// F16ToFloat32 widens a binary16 exactly.
func F16ToFloat32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	man := uint32(h & 0x3ff)
	switch {
	case exp == 0x1f:
		return math.Float32frombits(sign | 0x7f800000 | man<<13)
	case exp == 0:
		f := float32(man) / (1 << 24) // man × 2^-24, exact
		if sign != 0 {
			f = -f
		}
		return f
	}
	return math.Float32frombits(sign | (exp+127-15)<<23 | man<<13)
}

// F16ToFloat64 widens a binary16 exactly.
func F16ToFloat64(h uint16) float64 { return float64(F16ToFloat32(h)) }
