package contract

import (
	"strings"
	"testing"
)

func TestAddedRequiredInputBreaks(t *testing.T) {
	c := &Contract{Inputs: []Tensor{{Name: "x", Datatype: "FP32", Shape: []int64{-1, 4}}}}
	x := Tensor{Name: "x", Datatype: "FP32", Shape: []int64{-1, 4}}
	yes, no := true, false
	for _, tc := range []struct {
		name  string
		added *bool
		want  string
	}{
		{"required", &no, `input "mask" is new and required`},
		{"optional (filled from features)", &yes, ""},
		{"not said (another OIP server)", nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			md := Metadata{Inputs: []Tensor{x, {Name: "mask", Datatype: "BOOL", Shape: []int64{-1}, Optional: tc.added}}}
			err := Check(c, md)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("Check: %v, want compatible", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Check: %v, want %q", err, tc.want)
			}
		})
	}
	// A contracted input marked required is fine: clients send it.
	if err := Check(c, Metadata{Inputs: []Tensor{{Name: "x", Datatype: "FP32", Shape: []int64{-1, 4}, Optional: &no}}}); err != nil {
		t.Errorf("contracted required input: %v", err)
	}
}

func TestConformsNamesTheExpectedShape(t *testing.T) {
	w := Tensor{Name: "x", Datatype: "FP32", Shape: []int64{-1, 4}}
	if err := Conforms("input", w, "FP32", []int64{3, 4}); err != nil {
		t.Fatalf("conforming input: %v", err)
	}
	err := Conforms("input", w, "FP32", []int64{1, 5})
	if err == nil || !strings.Contains(err.Error(), `input "x": shape [1 5], the contract fixes dimension 1 at 4 (expected [-1 4])`) {
		t.Fatalf("Conforms: %v", err)
	}
	if err := Conforms("input", w, "FP64", []int64{1}); err == nil || !strings.Contains(err.Error(), "datatype FP64") || !strings.Contains(err.Error(), "rank 1") {
		t.Fatalf("Conforms: %v, want datatype and rank", err)
	}
}

func TestValidate(t *testing.T) {
	errs := Validate(&Contract{Inputs: []Tensor{{Name: "x", Datatype: "FLOAT", Shape: []int64{-2}}, {Name: "x", Datatype: "FP32"}}})
	var got []string
	for _, e := range errs {
		got = append(got, e.Error())
	}
	all := strings.Join(got, "\n")
	for _, w := range []string{`inputs[0].datatype: "FLOAT" is not an OIP datatype`, `inputs[0].shape[0]: -2`, `inputs[1].name: "x" is listed twice`, `inputs[1].shape: missing`} {
		if !strings.Contains(all, w) {
			t.Errorf("Validate: %s\nwant %q", all, w)
		}
	}
	if errs := Validate(&Contract{}); len(errs) != 1 {
		t.Errorf("empty contract: %v", errs)
	}
}
