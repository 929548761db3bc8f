package embedding

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/patchbay-io/patchbay/modelhost/runtime"
	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

func spec(t *testing.T, artifact string, k int64) runtime.Spec {
	t.Helper()
	p := filepath.Join(t.TempDir(), "embeddings.json")
	if err := os.WriteFile(p, []byte(artifact), 0o644); err != nil {
		t.Fatal(err)
	}
	return runtime.Spec{Artifact: p,
		Inputs: []tensor.Meta{{Name: "user_id", Datatype: tensor.INT64, Shape: []int64{-1}}},
		Outputs: []tensor.Meta{{Name: "item_ids", Datatype: tensor.INT64, Shape: []int64{-1, k}},
			{Name: "scores", Datatype: tensor.FP32, Shape: []int64{-1, k}}}}
}

const tables = `{"top_k": 2,
 "users": {"ids": [1, 2], "vectors": [[1, 0], [0, 1]]},
 "items": {"ids": [10, 11, 12, 13], "vectors": [[3, 0], [0, 2], [1, 1], [0, 2]]}}`

// TestTopK: user 1 likes axis 0, user 2 axis 1 (tie between 11 and 13 broken by id);
// unknown user 99 gets the mean user vector (0.5, 0.5).
func TestTopK(t *testing.T) {
	m, err := Load(spec(t, tables, 2))
	if err != nil {
		t.Fatal(err)
	}
	out, err := m.Predict(context.Background(), []*tensor.Tensor{{Datatype: tensor.INT64, Shape: []int64{3}, I64: []int64{1, 2, 99}}})
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(out[0].I64, out[1].F32, out[0].Shape); got != "[10 12 11 13 10 11] [3 1 2 2 1.5 1] [3 2]" {
		t.Errorf("top-k: %s", got)
	}
}

func TestLoadRejects(t *testing.T) {
	for name, tc := range map[string]struct {
		artifact string
		k        int64
	}{
		"k above items":  {`{"top_k": 5, "users": {"ids": [1], "vectors": [[1]]}, "items": {"ids": [2], "vectors": [[1]]}}`, 5},
		"ragged vectors": {`{"top_k": 1, "users": {"ids": [1], "vectors": [[1]]}, "items": {"ids": [2, 3], "vectors": [[1], [1, 2]]}}`, 1},
		"ids vs vectors": {`{"top_k": 1, "users": {"ids": [1, 2], "vectors": [[1]]}, "items": {"ids": [2], "vectors": [[1]]}}`, 1},
		"duplicate user": {`{"top_k": 1, "users": {"ids": [1, 1], "vectors": [[1], [2]]}, "items": {"ids": [2], "vectors": [[1]]}}`, 1},
		"signature k":    {tables, 3},
		"unknown field":  {`{"top_k": 1, "topk": 1, "users": {"ids": [1], "vectors": [[1]]}, "items": {"ids": [2], "vectors": [[1]]}}`, 1},
	} {
		if _, err := Load(spec(t, tc.artifact, tc.k)); err == nil {
			t.Errorf("%s: loaded, want an error", name)
		}
	}
}
