// Package linear serves linear and logistic regression from a small JSON artifact:
//
//	{"link": "logistic", "weights": [0.8, -0.5, 0.3, 1.2], "bias": -0.2}
//
// link is "identity" (linear regression) or "logistic" (probability of the positive
// class). Input FP32 [-1, len(weights)], output FP32 [-1].
package linear

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"

	"github.com/patchbay-io/patchbay/modelhost/runtime"
	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

// Model is a loaded linear model.
type Model struct {
	weights  []float64
	bias     float64
	logistic bool
}

type artifact struct {
	Link    string    `json:"link"`
	Weights []float64 `json:"weights"`
	Bias    float64   `json:"bias"`
}

// Load reads the artifact and checks the declared signature against it.
func Load(spec runtime.Spec) (runtime.Model, error) {
	raw, err := os.ReadFile(spec.Artifact)
	if err != nil {
		return nil, fmt.Errorf("linear: %w", err)
	}
	var a artifact
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&a); err != nil {
		return nil, fmt.Errorf("linear %s: %w", spec.Artifact, err)
	}
	m := &Model{weights: a.Weights, bias: a.Bias}
	switch a.Link {
	case "identity", "":
	case "logistic":
		m.logistic = true
	default:
		return nil, fmt.Errorf("linear %s: link %q, want identity or logistic", spec.Artifact, a.Link)
	}
	if len(a.Weights) == 0 {
		return nil, fmt.Errorf("linear %s: no weights", spec.Artifact)
	}
	if len(spec.Inputs) != 1 || len(spec.Outputs) != 1 {
		return nil, errors.New("linear: signature: want exactly one input and one output")
	}
	in, out := spec.Inputs[0], spec.Outputs[0]
	if in.Datatype != tensor.FP32 || len(in.Shape) != 2 || in.Shape[1] != int64(len(a.Weights)) {
		return nil, fmt.Errorf("linear: signature: input %q must be FP32 [-1, %d], got %s %s", in.Name, len(a.Weights), in.Datatype, tensor.FormatShape(in.Shape))
	}
	if out.Datatype != tensor.FP32 || len(out.Shape) != 1 {
		return nil, fmt.Errorf("linear: signature: output %q must be FP32 [-1], got %s %s", out.Name, out.Datatype, tensor.FormatShape(out.Shape))
	}
	return m, nil
}

// Predict implements runtime.Model.
func (m *Model) Predict(_ context.Context, in []*tensor.Tensor) ([]*tensor.Tensor, error) {
	x := in[0].F32
	nf := len(m.weights)
	rows := int(in[0].Shape[0])
	if len(x) != rows*nf {
		return nil, fmt.Errorf("linear: %d values for %d rows of %d features", len(x), rows, nf)
	}
	out := make([]float32, rows)
	for r := range out {
		z := m.bias
		for j, w := range m.weights {
			z += w * float64(x[r*nf+j])
		}
		if m.logistic {
			z = 1 / (1 + math.Exp(-z))
		}
		out[r] = float32(z)
	}
	return []*tensor.Tensor{{Datatype: tensor.FP32, Shape: []int64{int64(rows)}, F32: out}}, nil
}
