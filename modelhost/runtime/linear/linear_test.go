package linear

import (
	"context"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/patchbay-io/patchbay/modelhost/runtime"
	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

func spec(t *testing.T, artifact string, width int64) runtime.Spec {
	t.Helper()
	p := filepath.Join(t.TempDir(), "linear.json")
	if err := os.WriteFile(p, []byte(artifact), 0o644); err != nil {
		t.Fatal(err)
	}
	return runtime.Spec{Artifact: p,
		Inputs:  []tensor.Meta{{Name: "x", Datatype: tensor.FP32, Shape: []int64{-1, width}}},
		Outputs: []tensor.Meta{{Name: "y", Datatype: tensor.FP32, Shape: []int64{-1}}}}
}

func TestPredict(t *testing.T) {
	for _, tc := range []struct {
		name, artifact string
		want           []float64
	}{
		{"identity", `{"link":"identity","weights":[2,-1],"bias":0.5}`, []float64{2*1 - 2 + 0.5, 2*-1 - 0.5 + 0.5}},
		{"logistic", `{"link":"logistic","weights":[2,-1],"bias":0.5}`, []float64{1 / (1 + math.Exp(-0.5)), 1 / (1 + math.Exp(2))}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := Load(spec(t, tc.artifact, 2))
			if err != nil {
				t.Fatal(err)
			}
			out, err := m.Predict(context.Background(), []*tensor.Tensor{{Datatype: tensor.FP32, Shape: []int64{2, 2}, F32: []float32{1, 2, -1, 0.5}}})
			if err != nil {
				t.Fatal(err)
			}
			for i, w := range tc.want {
				if math.Abs(float64(out[0].F32[i])-w) > 1e-6 {
					t.Errorf("row %d: %v, want %v", i, out[0].F32[i], w)
				}
			}
		})
	}
}

func TestLoadRejects(t *testing.T) {
	for name, tc := range map[string]struct {
		artifact string
		width    int64
	}{
		"unknown link":   {`{"link":"probit","weights":[1],"bias":0}`, 1},
		"unknown field":  {`{"link":"identity","weights":[1],"bias":0,"extra":1}`, 1},
		"no weights":     {`{"link":"identity","weights":[],"bias":0}`, 0},
		"width mismatch": {`{"link":"identity","weights":[1,2],"bias":0}`, 3},
		"not json":       {`{`, 1},
	} {
		if _, err := Load(spec(t, tc.artifact, tc.width)); err == nil {
			t.Errorf("%s: loaded, want an error", name)
		}
	}
}
