package onnx

import (
	"math"
	"testing"
)

// TestFP16RoundTrip checks the conversion against binary16's definition on every one
// of its 65536 values (exact widening, and narrowing back gives the same bits), and
// rounding to nearest even between neighbours.
func TestFP16RoundTrip(t *testing.T) {
	for h := 0; h < 1<<16; h++ {
		f := f16ToF32(uint16(h))
		if math.IsNaN(float64(f)) {
			if g := f32ToF16(f); g&0x7c00 != 0x7c00 || g&0x3ff == 0 {
				t.Fatalf("NaN %#04x -> %#04x", h, g)
			}
			continue
		}
		if g := f32ToF16(f); g != uint16(h) {
			t.Fatalf("%#04x -> %v -> %#04x", h, f, g)
		}
	}
	cases := []struct {
		f    float32
		want uint16
	}{
		{1, 0x3c00}, {-2, 0xc000}, {65504, 0x7bff}, {65520, 0x7c00}, {1e-8, 0},
		{1 + 1.0/2048, 0x3c00},               // halfway, to even (down)
		{1 + 3.0/2048, 0x3c02},               // halfway, to even (up)
		{float32(math.Pow(2, -24)), 0x0001},  // smallest subnormal
		{float32(math.Pow(2, -25)) * 1.5, 1}, // above half the smallest subnormal
	}
	for _, c := range cases {
		if got := f32ToF16(c.f); got != c.want {
			t.Errorf("f32ToF16(%v) = %#04x, want %#04x", c.f, got, c.want)
		}
	}
}
