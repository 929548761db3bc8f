package tensor

import (
	"math"
	"testing"
)

// Every binary16 widens exactly and rounds back to itself; NaNs stay NaN with their sign.
func TestF16RoundTripAll(t *testing.T) {
	for i := range 1 << 16 {
		h := uint16(i)
		f := F16ToFloat64(h)
		back := F16FromFloat64(f)
		if math.IsNaN(f) {
			if back&0x7c00 != 0x7c00 || back&0x3ff == 0 || back&0x8000 != h&0x8000 {
				t.Fatalf("NaN %#04x came back as %#04x", h, back)
			}
			continue
		}
		if back != h {
			t.Fatalf("%#04x -> %v -> %#04x", h, f, back)
		}
		if F16FromFloat32(F16ToFloat32(h)) != h {
			t.Fatalf("float32 path: %#04x", h)
		}
	}
}

// Between each pair of adjacent finite halves: the exact midpoint rounds to the even
// one, a hair either side to the nearer one. This checks round-to-nearest-even over
// every interval, subnormals and the carry into the next binade included.
func TestF16RoundsToNearestEven(t *testing.T) {
	for i := range 0x7bff { // positive finite halves but the largest
		lo, hi := uint16(i), uint16(i+1)
		a, b := F16ToFloat64(lo), F16ToFloat64(hi)
		mid := (a + b) / 2 // exact in float64
		even := lo
		if lo&1 == 1 {
			even = hi
		}
		for _, sign := range []float64{1, -1} {
			s := uint16(0)
			if sign < 0 {
				s = 0x8000
			}
			if got := F16FromFloat64(sign * mid); got != s|even {
				t.Fatalf("midpoint %v of %#04x,%#04x: %#04x, want %#04x", sign*mid, lo, hi, got, s|even)
			}
			if got := F16FromFloat64(sign * math.Nextafter(mid, a)); got != s|lo {
				t.Fatalf("below midpoint %v: %#04x, want %#04x", mid, got, s|lo)
			}
			if got := F16FromFloat64(sign * math.Nextafter(mid, b)); got != s|hi {
				t.Fatalf("above midpoint %v: %#04x, want %#04x", mid, got, s|hi)
			}
		}
	}
}

func TestF16Edges(t *testing.T) {
	for _, tc := range []struct {
		f    float64
		want uint16
	}{
		{0, 0}, {math.Copysign(0, -1), 0x8000},
		{1, 0x3c00}, {-2, 0xc000}, {0.1, 0x2e66}, {1.0 / 3, 0x3555},
		{65504, 0x7bff},
		{65519.99, 0x7bff}, // below the midpoint to "65536": the largest half
		{65520, 0x7c00},    // the midpoint, ties to even = Inf (IEEE overflow)
		{1e10, 0x7c00}, {-1e300, 0xfc00},
		{math.Inf(1), 0x7c00}, {math.Inf(-1), 0xfc00},
		{math.Ldexp(1, -24), 0x0001}, // the smallest subnormal
		{math.Ldexp(1, -25), 0},      // half of it: tie to even = 0
		{math.Nextafter(math.Ldexp(1, -25), 1), 0x0001},
		{math.Ldexp(1, -14), 0x0400},      // the smallest normal
		{math.Ldexp(1023.5, -24), 0x0400}, // rounds up out of the subnormals
		{5e-324, 0}, {-1e-30, 0x8000},
	} {
		if got := F16FromFloat64(tc.f); got != tc.want {
			t.Errorf("F16FromFloat64(%v) = %#04x, want %#04x", tc.f, got, tc.want)
		}
	}
	if h := F16FromFloat64(math.NaN()); h&0x7c00 != 0x7c00 || h&0x3ff == 0 {
		t.Errorf("NaN -> %#04x", h)
	}
	if h := F16FromFloat64(math.Copysign(math.NaN(), -1)); h&0x8000 == 0 || h&0x3ff == 0 {
		t.Errorf("-NaN -> %#04x", h)
	}
}

func TestF16Len(t *testing.T) {
	x := Tensor{Datatype: FP16, Shape: []int64{2}, F16: []uint16{1, 2}}
	m := Meta{Name: "h", Datatype: FP16, Shape: []int64{2}}
	if err := m.Check(&x, 10); err != nil {
		t.Fatal(err)
	}
	x.Reset()
	if len(x.F16) != 0 || cap(x.F16) != 2 {
		t.Fatalf("Reset: %v cap %d", x.F16, cap(x.F16))
	}
}
