// Package contract is a model's service contract (issue 15): the inputs and outputs its
// clients depend on, and the compatibility rule a version's OIP model metadata is checked
// against. The control plane (rollout files' contract field, the version check) and the
// model host (a repository's <model>/contract.yaml, the request check) share it, so both
// ends apply one rule.
package contract

import (
	"errors"
	"fmt"
	"strconv"
)

// Contract is the part of a model's OIP interface its clients depend on: the inputs and
// outputs they send and read, each with its name, datatype and shape (-1 for a variable
// dimension). The compatibility rule (Check): a version may add optional inputs and any
// outputs; it may not remove or rename a contracted one, change its datatype, its rank, or
// a dimension the contract fixes, nor add an input it requires.
type Contract struct {
	Inputs  []Tensor `yaml:"inputs" json:"inputs,omitempty"`
	Outputs []Tensor `yaml:"outputs" json:"outputs,omitempty"`
}

// Tensor is one input or output as the OIP model metadata describes it.
//
// Optional is patchbay's extension of the metadata (the OIP tensor metadata has only name,
// datatype and shape): a patchbay model host says, for each input, whether the version
// serves requests that leave it out (it fills it from its features). nil means the server
// did not say (another OIP server): an added input is then taken as optional.
type Tensor struct {
	Name     string  `yaml:"name" json:"name"`
	Datatype string  `yaml:"datatype" json:"datatype"`
	Shape    []int64 `yaml:"shape" json:"shape"`
	Optional *bool   `yaml:"-" json:"optional,omitempty"`
}

// Metadata is the part of an OIP model metadata answer (GET /v2/models/<m>/versions/<v>,
// or gRPC ModelMetadata) a contract is checked against.
type Metadata struct {
	Inputs  []Tensor `json:"inputs"`
	Outputs []Tensor `json:"outputs"`
}

// OptionalInputsHeader is the gRPC response header metadata key by which a patchbay model
// host lists, comma-separated, the inputs of a version that a request may leave out (the
// gRPC ModelMetadataResponse has no field for it). Its presence, even empty, means every
// other input is required.
const OptionalInputsHeader = "x-patchbay-optional-inputs"

// Datatypes are the tensor datatypes of the Open Inference Protocol.
var Datatypes = map[string]bool{
	"BOOL": true, "UINT8": true, "UINT16": true, "UINT32": true, "UINT64": true,
	"INT8": true, "INT16": true, "INT32": true, "INT64": true,
	"FP16": true, "BF16": true, "FP32": true, "FP64": true, "BYTES": true,
}

// FieldError is one problem of a contract, at a field path such as "inputs[0].shape[1]".
type FieldError struct {
	Field string
	Msg   string
}

func (e FieldError) Error() string { return e.Field + ": " + e.Msg }

// Validate reports every problem of c as a written contract (names, datatypes, shapes).
func Validate(c *Contract) []FieldError {
	if c == nil {
		return nil
	}
	var out []FieldError
	add := func(field, format string, args ...any) {
		out = append(out, FieldError{field, fmt.Sprintf(format, args...)})
	}
	if len(c.Inputs) == 0 && len(c.Outputs) == 0 {
		add("", "a contract needs at least one input or output")
	}
	for _, list := range []struct {
		field string
		ts    []Tensor
	}{{"inputs", c.Inputs}, {"outputs", c.Outputs}} {
		seen := map[string]bool{}
		for i, t := range list.ts {
			f := list.field + "[" + strconv.Itoa(i) + "]"
			switch {
			case t.Name == "":
				add(f+".name", "missing")
			case seen[t.Name]:
				add(f+".name", "%q is listed twice", t.Name)
			}
			seen[t.Name] = true
			if !Datatypes[t.Datatype] {
				add(f+".datatype", "%q is not an OIP datatype (BOOL, UINT8..UINT64, INT8..INT64, FP16, BF16, FP32, FP64, BYTES)", t.Datatype)
			}
			if len(t.Shape) == 0 {
				add(f+".shape", "missing: give every dimension, -1 for a variable one")
			}
			for j, d := range t.Shape {
				if d < -1 {
					add(f+".shape["+strconv.Itoa(j)+"]", "%d: a dimension is -1 (variable) or a size >= 0", d)
				}
			}
		}
	}
	return out
}

// Check reports every way md (a version's OIP model metadata) breaks c, or nil when the
// version keeps it: each contracted input and output must be present under its name with
// the same datatype and rank, and the same size in every dimension the contract fixes (a
// contracted -1 accepts any size, including -1). Outputs the contract does not name are
// allowed; so are inputs it does not name unless the metadata marks them required
// (Optional false): clients under the contract do not send them.
func Check(c *Contract, md Metadata) error {
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
			if err := Conforms(kind, w, h.Datatype, h.Shape); err != nil {
				errs = append(errs, err)
			}
		}
	}
	check("input", c.Inputs, md.Inputs)
	check("output", c.Outputs, md.Outputs)
	contracted := make(map[string]bool, len(c.Inputs))
	for _, w := range c.Inputs {
		contracted[w.Name] = true
	}
	for _, h := range md.Inputs {
		if !contracted[h.Name] && h.Optional != nil && !*h.Optional {
			errs = append(errs, fmt.Errorf("input %q is new and required: clients under the contract do not send it (make it optional, e.g. filled from the version's features)", h.Name))
		}
	}
	return errors.Join(errs...)
}

// Conforms reports whether a tensor of datatype and shape keeps the contracted tensor w:
// same datatype, same rank, and w's fixed dimensions (a -1 in w accepts any size). kind
// ("input", "output") starts the error. The model host applies it to each request input.
func Conforms(kind string, w Tensor, datatype string, shape []int64) error {
	var errs []error
	if datatype != w.Datatype {
		errs = append(errs, fmt.Errorf("%s %q: datatype %s, the contract says %s", kind, w.Name, datatype, w.Datatype))
	}
	if len(shape) != len(w.Shape) {
		return errors.Join(append(errs, fmt.Errorf("%s %q: shape %v has rank %d, the contract says %v (rank %d)", kind, w.Name, shape, len(shape), w.Shape, len(w.Shape)))...)
	}
	for i, d := range w.Shape {
		if d != -1 && shape[i] != d {
			errs = append(errs, fmt.Errorf("%s %q: shape %v, the contract fixes dimension %d at %d (expected %v)", kind, w.Name, shape, i, d, w.Shape))
		}
	}
	return errors.Join(errs...)
}
