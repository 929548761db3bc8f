package xgboost

import (
	"context"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/patchbay-io/patchbay/modelhost/runtime"
	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

const fixtures = "../../../test/fixtures/xgboost"

type fixture struct {
	rows  [][]float32 // NaN for missing
	preds []float64
	model string
}

func readFixture(t testing.TB, name string) fixture {
	t.Helper()
	dir := filepath.Join(fixtures, name)
	var in struct {
		Rows [][]*float64 `json:"rows"`
	}
	var out struct {
		Predictions []json.RawMessage `json:"predictions"` // a number per row, or a list for multi-class
	}
	for file, v := range map[string]any{"inputs.json": &in, "outputs.json": &out} {
		raw, err := os.ReadFile(filepath.Join(dir, file))
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(raw, v); err != nil {
			t.Fatalf("%s/%s: %v", name, file, err)
		}
	}
	f := fixture{model: filepath.Join(dir, "model.json")}
	for _, p := range out.Predictions {
		var one float64
		if err := json.Unmarshal(p, &one); err == nil {
			f.preds = append(f.preds, one)
			continue
		}
		var many []float64
		if err := json.Unmarshal(p, &many); err != nil {
			t.Fatalf("%s: prediction %s: %v", name, p, err)
		}
		f.preds = append(f.preds, many...)
	}
	for _, r := range in.Rows {
		row := make([]float32, len(r))
		for i, v := range r {
			if v == nil {
				row[i] = float32(math.NaN())
			} else {
				row[i] = float32(*v)
			}
		}
		f.rows = append(f.rows, row)
	}
	return f
}

// TestParityWithXGBoost compares predictions with XGBoost's own on the committed
// fixtures (missing values included) to 1e-6.
func TestParityWithXGBoost(t *testing.T) {
	for _, tc := range []struct {
		name  string
		width int
	}{{"binary", 1}, {"regression", 1}, {"multiclass", 3}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := readFixture(t, tc.name)
			raw, err := os.ReadFile(f.model)
			if err != nil {
				t.Fatal(err)
			}
			e, err := Parse(raw)
			if err != nil {
				t.Fatal(err)
			}
			if e.Width() != tc.width {
				t.Fatalf("width %d, want %d", e.Width(), tc.width)
			}
			var flat []float32
			missing := 0
			for _, r := range f.rows {
				flat = append(flat, r...)
				for _, v := range r {
					if v != v {
						missing++
					}
				}
			}
			if missing == 0 {
				t.Fatal("fixture has no missing values: default branches untested")
			}
			out := make([]float32, len(f.rows)*e.Width())
			e.PredictRows(flat, out)
			if len(out) != len(f.preds) {
				t.Fatalf("%d predictions, xgboost has %d", len(out), len(f.preds))
			}
			worst := 0.0
			for i, want := range f.preds {
				d := math.Abs(float64(out[i]) - want)
				worst = max(worst, d)
				if d > 1e-6 {
					t.Errorf("prediction %d: got %.9g, xgboost %.9g (|diff| %.3g)", i, out[i], want, d)
				}
			}
			t.Logf("%d predictions, max |diff| %.3g", len(out), worst)
		})
	}
}

func TestLoadChecksSignature(t *testing.T) {
	model := filepath.Join(fixtures, "binary", "model.json")
	good := runtime.Spec{Artifact: model,
		Inputs:  []tensor.Meta{{Name: "x", Datatype: tensor.FP32, Shape: []int64{-1, 8}}},
		Outputs: []tensor.Meta{{Name: "y", Datatype: tensor.FP32, Shape: []int64{-1}}}}
	if _, err := Load(good); err != nil {
		t.Fatalf("good spec: %v", err)
	}
	for name, mutate := range map[string]func(s *runtime.Spec){
		"wrong width":  func(s *runtime.Spec) { s.Inputs[0].Shape = []int64{-1, 7} },
		"wrong dtype":  func(s *runtime.Spec) { s.Inputs[0].Datatype = tensor.FP64 },
		"output shape": func(s *runtime.Spec) { s.Outputs[0].Shape = []int64{-1, 3} },
		"no artifact":  func(s *runtime.Spec) { s.Artifact = filepath.Join(t.TempDir(), "none.json") },
	} {
		s := good
		s.Inputs = []tensor.Meta{good.Inputs[0]}
		s.Outputs = []tensor.Meta{good.Outputs[0]}
		mutate(&s)
		if _, err := Load(s); err == nil {
			t.Errorf("%s: loaded, want an error", name)
		}
	}
}

func TestParseRejectsDamagedModels(t *testing.T) {
	for name, js := range map[string]string{
		"not json":   `{`,
		"dart":       `{"learner":{"gradient_booster":{"name":"dart"}}}`,
		"cycle":      `{"learner":{"learner_model_param":{"base_score":"0.5","num_feature":"2"},"objective":{"name":"reg:squarederror"},"gradient_booster":{"name":"gbtree","model":{"tree_info":[0],"trees":[{"left_children":[0,-1],"right_children":[1,-1],"split_indices":[0,0],"split_conditions":[0,1],"default_left":[0,0]}]}}}}`,
		"feature":    `{"learner":{"learner_model_param":{"base_score":"0.5","num_feature":"2"},"objective":{"name":"reg:squarederror"},"gradient_booster":{"name":"gbtree","model":{"tree_info":[0],"trees":[{"left_children":[1,-1,-1],"right_children":[2,-1,-1],"split_indices":[9,0,0],"split_conditions":[0,1,2],"default_left":[0,0,0]}]}}}}`,
		"objective":  `{"learner":{"learner_model_param":{"base_score":"0.5","num_feature":"2"},"objective":{"name":"rank:pairwise"},"gradient_booster":{"name":"gbtree","model":{"tree_info":[],"trees":[]}}}}`,
		"categories": `{"learner":{"learner_model_param":{"base_score":"0.5","num_feature":"2"},"objective":{"name":"reg:squarederror"},"gradient_booster":{"name":"gbtree","model":{"tree_info":[0],"trees":[{"left_children":[1,-1,-1],"right_children":[2,-1,-1],"split_indices":[0,0,0],"split_conditions":[0,1,2],"default_left":[0,0,0],"split_type":[1,0,0]}]}}}}`,
	} {
		if _, err := Parse([]byte(js)); err == nil {
			t.Errorf("%s: parsed, want an error", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
}

func TestPredictShapes(t *testing.T) {
	f := readFixture(t, "multiclass")
	m, err := Load(runtime.Spec{Artifact: f.model,
		Inputs:  []tensor.Meta{{Name: "x", Datatype: tensor.FP32, Shape: []int64{-1, 5}}},
		Outputs: []tensor.Meta{{Name: "p", Datatype: tensor.FP32, Shape: []int64{-1, 3}}}})
	if err != nil {
		t.Fatal(err)
	}
	in := &tensor.Tensor{Datatype: tensor.FP32, Shape: []int64{2, 5}, F32: append(append([]float32{}, f.rows[1]...), f.rows[2]...)}
	out, err := m.Predict(context.Background(), []*tensor.Tensor{in})
	if err != nil {
		t.Fatal(err)
	}
	if got := tensor.FormatShape(out[0].Shape); got != "[2, 3]" {
		t.Fatalf("shape %s, want [2, 3]", got)
	}
	for i := range 3 {
		if d := math.Abs(float64(out[0].F32[3+i]) - f.preds[6+i]); d > 1e-6 {
			t.Errorf("row 2 class %d: diff %g", i, d)
		}
	}
}
