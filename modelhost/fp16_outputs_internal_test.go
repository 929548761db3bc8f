package modelhost

import (
	"testing"

	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

// An FP16 output keeps its values in a shadow record, as FP32 and FP64 ones do: without
// them the shadow comparison of an FP16 model would compare nothing.
func TestShadowRecordKeepsFP16Values(t *testing.T) {
	want := []float64{0.5, -2, 0.1}
	bits := make([]uint16, len(want))
	for i, f := range want {
		bits[i] = tensor.F16FromFloat64(f)
	}
	o := recordOutput(&tensor.Tensor{Name: "p", Datatype: tensor.FP16, Shape: []int64{1, 3}, F16: bits})
	if len(o.Values) != 3 {
		t.Fatalf("values %v, want 3", o.Values)
	}
	for i, f := range want {
		if got := o.Values[i]; got != tensor.F16ToFloat64(bits[i]) || got-f > 1e-3 || f-got > 1e-3 {
			t.Errorf("value %d = %v, want %v (half of %v)", i, got, tensor.F16ToFloat64(bits[i]), f)
		}
	}
	if !o.HasClass || o.ClassIndex != 0 {
		t.Errorf("class %v/%d, want the argmax 0 of the first row", o.HasClass, o.ClassIndex)
	}
}
