package rollout

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestCheckContract(t *testing.T) {
	c := &Contract{
		Inputs:  []Tensor{{Name: "x", Datatype: "FP32", Shape: []int64{-1, 4}}},
		Outputs: []Tensor{{Name: "y", Datatype: "FP32", Shape: []int64{-1, 1}}},
	}
	in := func(ts ...Tensor) []Tensor { return ts }
	y := Tensor{Name: "y", Datatype: "FP32", Shape: []int64{-1, 1}}
	for _, tc := range []struct {
		name string
		md   Metadata
		want []string // substrings of the error; none: compatible
	}{
		{"same", Metadata{Inputs: in(Tensor{Name: "x", Datatype: "FP32", Shape: []int64{-1, 4}}), Outputs: in(y)}, nil},
		{"contracted -1 accepts a fixed size", Metadata{Inputs: in(Tensor{Name: "x", Datatype: "FP32", Shape: []int64{8, 4}}), Outputs: in(y)}, nil},
		{"added input and output", Metadata{Inputs: in(Tensor{Name: "x", Datatype: "FP32", Shape: []int64{-1, 4}}, Tensor{Name: "mask", Datatype: "BOOL", Shape: []int64{-1, 4}}), Outputs: in(y, Tensor{Name: "z", Datatype: "INT64", Shape: []int64{-1}})}, nil},
		{"removed input", Metadata{Inputs: nil, Outputs: in(y)}, []string{`input "x" is missing`}},
		{"renamed input", Metadata{Inputs: in(Tensor{Name: "features", Datatype: "FP32", Shape: []int64{-1, 4}}), Outputs: in(y)}, []string{`input "x" is missing (removed or renamed)`}},
		{"changed datatype", Metadata{Inputs: in(Tensor{Name: "x", Datatype: "FP64", Shape: []int64{-1, 4}}), Outputs: in(y)}, []string{`input "x": datatype FP64, the contract says FP32`}},
		{"changed fixed dimension", Metadata{Inputs: in(Tensor{Name: "x", Datatype: "FP32", Shape: []int64{-1, 5}}), Outputs: in(y)}, []string{`input "x": shape [-1 5], the contract fixes dimension 1 at 4`}},
		{"fixed dimension made variable", Metadata{Inputs: in(Tensor{Name: "x", Datatype: "FP32", Shape: []int64{-1, -1}}), Outputs: in(y)}, []string{`fixes dimension 1 at 4`}},
		{"changed rank", Metadata{Inputs: in(Tensor{Name: "x", Datatype: "FP32", Shape: []int64{4}}), Outputs: in(y)}, []string{`shape [4] has rank 1, the contract says [-1 4] (rank 2)`}},
		{"input listed twice", Metadata{Inputs: in(Tensor{Name: "x", Datatype: "FP32", Shape: []int64{-1, 4}}, Tensor{Name: "x", Datatype: "FP64", Shape: []int64{1}}), Outputs: in(y)}, []string{`input "x" is listed twice in the metadata`}},
		{"removed output", Metadata{Inputs: in(Tensor{Name: "x", Datatype: "FP32", Shape: []int64{-1, 4}}), Outputs: nil}, []string{`output "y" is missing`}},
		{"every problem at once", Metadata{Inputs: in(Tensor{Name: "x", Datatype: "INT32", Shape: []int64{-1, 3}}), Outputs: in(Tensor{Name: "y", Datatype: "FP32", Shape: []int64{-1}})},
			[]string{`datatype INT32`, `fixes dimension 1 at 4`, `output "y": shape [-1] has rank 1`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := CheckContract(c, tc.md)
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("CheckContract: %v, want compatible", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("CheckContract: nil, want %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
		})
	}
	if err := CheckContract(nil, Metadata{}); err != nil {
		t.Errorf("no contract: %v", err)
	}
}

func TestContractFieldValidation(t *testing.T) {
	const head = `apiVersion: patchbay.io/v1
kind: Rollout
model: ranker
versions:
  - name: v1
    endpoints: ["127.0.0.1:9001"]
traffic: {v1: 100}
`
	good := head + `contract:
  inputs:
    - {name: x, datatype: FP32, shape: [-1, 4]}
  outputs:
    - {name: y, datatype: FP32, shape: [-1, 1]}
`
	rs, err := Parse("good.yaml", []byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if err := Validate(&Set{Rollouts: rs}); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	if c := rs[0].Contract; c == nil || len(c.Inputs) != 1 || c.Inputs[0].Shape[0] != -1 || c.Outputs[0].Name != "y" {
		t.Fatalf("contract = %+v", c)
	}
	bad := head + `contract:
  inputs:
    - {name: x, datatype: FP32, shape: [-1, 4]}
    - {name: x, datatype: FLOAT, shape: [-2]}
  outputs:
    - {name: "", datatype: FP32}
`
	rs, err = Parse("bad.yaml", []byte(bad))
	if err != nil {
		t.Fatal(err)
	}
	err = Validate(&Set{Rollouts: rs})
	if err == nil {
		t.Fatal("Validate: nil, want errors")
	}
	for _, w := range []string{
		`bad.yaml:11: contract.inputs[1].name: "x" is listed twice`,
		`bad.yaml:11: contract.inputs[1].datatype: "FLOAT" is not an OIP datatype`,
		`bad.yaml:11: contract.inputs[1].shape[0]: -2: a dimension is -1 (variable) or a size >= 0`,
		`bad.yaml:13: contract.outputs[0].name: missing`,
		`bad.yaml:13: contract.outputs[0].shape: missing`,
	} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("errors\n%v\ndo not say %q", err, w)
		}
	}
	rs, _ = Parse("empty.yaml", []byte(head+"contract: {}\n"))
	if err := Validate(&Set{Rollouts: rs}); err == nil || !strings.Contains(err.Error(), "empty.yaml:8: contract: a contract needs at least one input or output") {
		t.Errorf("empty contract: %v", err)
	}
	if _, err := Parse("unknown.yaml", []byte(head+"contract: {inputs: [{name: x, datatype: FP32, shape: [1], optional: true}]}\n")); err == nil {
		t.Error("unknown contract field accepted")
	}
}

// FuzzCheckContract: any metadata answer a host sends (outside input) is checked without a
// panic, and metadata equal to the contract keeps it.
func FuzzCheckContract(f *testing.F) {
	f.Add([]byte(`{"inputs":[{"name":"x","datatype":"FP32","shape":[-1,4]}],"outputs":[{"name":"y","datatype":"FP32","shape":[-1,1]}]}`))
	f.Add([]byte(`{"inputs":[{"name":"x","datatype":"FP64","shape":[4]}],"outputs":null}`))
	f.Add([]byte(`{"inputs":[{"name":"x"},{"name":"x","shape":[1,2,3]}]}`))
	c := &Contract{
		Inputs:  []Tensor{{Name: "x", Datatype: "FP32", Shape: []int64{-1, 4}}},
		Outputs: []Tensor{{Name: "y", Datatype: "FP32", Shape: []int64{-1, 1}}},
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var md Metadata
		if json.Unmarshal(data, &md) != nil {
			return
		}
		_ = CheckContract(c, md)
		for _, ts := range [][]Tensor{md.Inputs, md.Outputs} {
			seen := map[string]bool{}
			for _, x := range ts {
				if seen[x.Name] {
					if err := CheckContract(&Contract{Inputs: md.Inputs, Outputs: md.Outputs}, md); err == nil || !strings.Contains(err.Error(), "listed twice") {
						t.Fatalf("metadata listing %q twice: %v", x.Name, err)
					}
					return
				}
				seen[x.Name] = true
			}
		}
		if err := CheckContract(&Contract{Inputs: md.Inputs, Outputs: md.Outputs}, md); err != nil {
			t.Fatalf("metadata against itself as the contract: %v", err)
		}
	})
}
