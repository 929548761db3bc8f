package tensor

import (
	"math"
	"strings"
	"testing"
)

func TestCheck(t *testing.T) {
	m := Meta{Name: "x", Datatype: FP32, Shape: []int64{-1, 2}}
	for _, tc := range []struct {
		t    Tensor
		want string
	}{
		{Tensor{Datatype: FP32, Shape: []int64{2, 2}, F32: make([]float32, 4)}, ""},
		{Tensor{Datatype: FP32, Shape: []int64{0, 2}}, ""},
		{Tensor{Datatype: FP64, Shape: []int64{1, 2}, F64: make([]float64, 2)}, "datatype FP64, model expects FP32"},
		{Tensor{Datatype: FP32, Shape: []int64{2}, F32: make([]float32, 2)}, "rank 1"},
		{Tensor{Datatype: FP32, Shape: []int64{1, 3}, F32: make([]float32, 3)}, "model expects [-1, 2]"},
		{Tensor{Datatype: FP32, Shape: []int64{2, 2}, F32: make([]float32, 3)}, "needs 4 elements, got 3"},
		{Tensor{Datatype: FP32, Shape: []int64{math.MaxInt64, 2}}, "more than 100 elements"},
		{Tensor{Datatype: FP32, Shape: []int64{-3, 2}}, "dimension 0 is -3"},
	} {
		err := m.Check(&tc.t, 100)
		if (tc.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("Check(%v) = %v, want %q", tc.t.Shape, err, tc.want)
		}
	}
}

func TestDatatypes(t *testing.T) {
	for d := BOOL; d <= BYTES; d++ {
		got, ok := ParseDatatype(d.String())
		if !ok || got != d {
			t.Errorf("round trip %v", d)
		}
		if b, ok := ParseDatatypeBytes([]byte(d.String())); !ok || b != d {
			t.Errorf("bytes round trip %v", d)
		}
	}
	if _, ok := ParseDatatype("FLOAT"); ok {
		t.Error("FLOAT parsed")
	}
	if lo, hi := UINT8.IntRange(); lo != 0 || hi != 255 {
		t.Errorf("UINT8 range %d..%d", lo, hi)
	}
}
