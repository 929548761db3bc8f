package rollout

import (
	"errors"
	"fmt"
	"strconv"
)

// Contract is the part of a model's OIP interface its clients depend on: the inputs and
// outputs they send and read, each with its name, datatype and shape (-1 for a variable
// dimension). The compatibility rule (CheckContract): a version may add inputs and outputs;
// it may not remove or rename a contracted one, change its datatype, its rank, or a
// dimension the contract fixes.
type Contract struct {
	Inputs  []Tensor `yaml:"inputs" json:"inputs,omitempty"`
	Outputs []Tensor `yaml:"outputs" json:"outputs,omitempty"`
}

// Tensor is one input or output as the OIP model metadata describes it.
type Tensor struct {
	Name     string  `yaml:"name" json:"name"`
	Datatype string  `yaml:"datatype" json:"datatype"`
	Shape    []int64 `yaml:"shape" json:"shape"`
}

// Metadata is the part of an OIP model metadata answer (GET /v2/models/<m>/versions/<v>)
// a contract is checked against.
type Metadata struct {
	Inputs  []Tensor `json:"inputs"`
	Outputs []Tensor `json:"outputs"`
}

// oipDatatypes are the tensor datatypes of the Open Inference Protocol.
var oipDatatypes = map[string]bool{
	"BOOL": true, "UINT8": true, "UINT16": true, "UINT32": true, "UINT64": true,
	"INT8": true, "INT16": true, "INT32": true, "INT64": true,
	"FP16": true, "BF16": true, "FP32": true, "FP64": true, "BYTES": true,
}

func validateContract(r *Rollout, add func(*Rollout, string, string, ...any)) {
	c := r.Contract
	if c == nil {
		return
	}
	if len(c.Inputs) == 0 && len(c.Outputs) == 0 {
		add(r, "contract", "a contract needs at least one input or output")
	}
	for _, list := range []struct {
		field string
		ts    []Tensor
	}{{"contract.inputs", c.Inputs}, {"contract.outputs", c.Outputs}} {
		seen := map[string]bool{}
		for i, t := range list.ts {
			f := list.field + "[" + strconv.Itoa(i) + "]"
			switch {
			case t.Name == "":
				add(r, f+".name", "missing")
			case seen[t.Name]:
				add(r, f+".name", "%q is listed twice", t.Name)
			}
			seen[t.Name] = true
			if !oipDatatypes[t.Datatype] {
				add(r, f+".datatype", "%q is not an OIP datatype (BOOL, UINT8..UINT64, INT8..INT64, FP16, BF16, FP32, FP64, BYTES)", t.Datatype)
			}
			if len(t.Shape) == 0 {
				add(r, f+".shape", "missing: give every dimension, -1 for a variable one")
			}
			for j, d := range t.Shape {
				if d < -1 {
					add(r, f+".shape["+strconv.Itoa(j)+"]", "%d: a dimension is -1 (variable) or a size >= 0", d)
				}
			}
		}
	}
}

// CheckContract reports every way metadata (a version's OIP model metadata) breaks c, or
// nil when the version keeps it: each contracted input and output must be present under
// its name with the same datatype and rank, and the same size in every dimension the
// contract fixes (a contracted -1 accepts any size, including -1). Inputs and outputs the
// contract does not name are allowed (OIP metadata does not say whether an input is
// optional: an added input is taken as optional).
func CheckContract(c *Contract, md Metadata) error {
	if c == nil {
		return nil
	}
	var errs []error
	check := func(kind string, want []Tensor, have []Tensor) {
		byName := make(map[string]*Tensor, len(have))
		twice := map[string]bool{}
		for i := range have {
			if byName[have[i].Name] != nil {
				twice[have[i].Name] = true
			}
			byName[have[i].Name] = &have[i]
		}
		for _, w := range want {
			h := byName[w.Name]
			if h == nil {
				errs = append(errs, fmt.Errorf("%s %q is missing (removed or renamed)", kind, w.Name))
				continue
			}
			if twice[w.Name] {
				errs = append(errs, fmt.Errorf("%s %q is listed twice in the metadata", kind, w.Name))
				continue
			}
			if h.Datatype != w.Datatype {
				errs = append(errs, fmt.Errorf("%s %q: datatype %s, the contract says %s", kind, w.Name, h.Datatype, w.Datatype))
			}
			if len(h.Shape) != len(w.Shape) {
				errs = append(errs, fmt.Errorf("%s %q: shape %v has rank %d, the contract says %v (rank %d)", kind, w.Name, h.Shape, len(h.Shape), w.Shape, len(w.Shape)))
				continue
			}
			for i, d := range w.Shape {
				if d != -1 && h.Shape[i] != d {
					errs = append(errs, fmt.Errorf("%s %q: shape %v, the contract fixes dimension %d at %d", kind, w.Name, h.Shape, i, d))
				}
			}
		}
	}
	check("input", c.Inputs, md.Inputs)
	check("output", c.Outputs, md.Outputs)
	return errors.Join(errs...)
}
