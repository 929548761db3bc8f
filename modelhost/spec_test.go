package modelhost

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoadSpecErrorsCarryFileAndLine(t *testing.T) {
	for _, tc := range []struct {
		name, yaml string
		want       []string
	}{
		{"unknown field", "runtime: xgboost\ninputs: []\nbatchng: {}\n", []string{"model.yaml:3: field batchng not found"}},
		{"wrong type", "runtime: [a]\n", []string{"model.yaml:1: cannot unmarshal !!seq into string"}},
		{"syntax", "runtime: xgboost\n  inputs: : x\n", []string{"model.yaml:2:"}},
		{"semantic, all at once", `runtime: xgboost
inputs:
  - {name: x, datatype: FP31, shape: [-1, 0]}
  - {name: x, datatype: FP32, shape: [-1, 2]}
outputs: []
batching: {max_batch_size: 0, max_delay: 2s, max_queue: -1}
`, []string{
			"model.yaml:6: batching.max_queue: -1",
			`model.yaml:3: inputs[0].datatype: "FP31" is not an OIP datatype`,
			"model.yaml:3: inputs[0].shape[1]: 0, want -1 or a positive size",
			`model.yaml:4: inputs[1].name: "x" twice`,
			"model.yaml:5: outputs: at least one tensor required",
			"model.yaml:6: batching.max_batch_size: 0, want >= 1",
			`model.yaml:6: batching.max_delay: "2s"`,
		}},
		{"batching needs fixed inner dims", `runtime: linear
inputs: [{name: x, datatype: FP32, shape: [-1, -1]}]
outputs: [{name: y, datatype: FP32, shape: [4]}]
batching: {max_batch_size: 8, max_delay: 1ms}
`, []string{
			"model.yaml:2: inputs[0].shape: batching needs fixed dimensions after the first",
			"model.yaml:3: outputs[0].shape: batching needs a variable first dimension (-1)",
		}},
		{"output buckets", `runtime: linear
inputs: [{name: x, datatype: FP32, shape: [-1], buckets: [1]}]
outputs:
  - {name: y, datatype: FP32, shape: [-1], buckets: [0, 0.5, 0.5]}
  - name: z
    datatype: FP32
    shape: [-1]
    buckets:
      - 1
      - .nan
      - .inf
  - {name: w, datatype: FP32, shape: [-1], buckets: []}
`, []string{
			"model.yaml:2: inputs[0].buckets: only outputs have a value histogram",
			"model.yaml:4: outputs[0].buckets[2]: 0.5, want strictly ascending bounds (after 0.5)",
			"model.yaml:10: outputs[1].buckets[1]: NaN, want a finite bound",
			"model.yaml:11: outputs[1].buckets[2]: +Inf, want a finite bound",
			"model.yaml:12: outputs[2].buckets: empty",
		}},
		{"features", `runtime: linear
inputs: [{name: x, datatype: FP32, shape: [-1, 3]}, {name: ids, datatype: INT64, shape: [-1, 1]}]
outputs: [{name: y, datatype: FP32, shape: [-1]}]
features:
  - {name: a, input: x, column: 0, source: store, entity: x-user-id, default: 1}
  - {name: a, input: x, column: 3, source: header, header: x-country}
  - {name: b, input: nope, source: hour}
  - {name: c, input: ids, source: hour}
  - {name: d, input: x, column: 0, source: store, entity: x-device, default: 0}
  - {name: e, input: x, column: 1, source: redis, default: 0}
`, []string{
			`model.yaml:6: features[1].name: "a" twice`,
			"model.yaml:6: features[1].column: 3, want 0..2",
			"model.yaml:6: features[1]: default missing",
			`model.yaml:7: features[2].input: "nope" is not one of the inputs`,
			`model.yaml:8: features[3].input: "ids" is INT64; features fill FP32 or FP64 inputs`,
			`model.yaml:9: features[4].entity: "x-device", but an earlier feature uses "x-user-id"`,
			`model.yaml:9: features[4].column: x column 0 is already filled by "a"`,
			`model.yaml:10: features[5].source: "redis", want header, hour or store`,
			`model.yaml:4: features: input "x" column 2 has no feature`,
		}},
		{"artifact escapes", "runtime: linear\nartifact: ../x.json\ninputs: [{name: x, datatype: FP32, shape: [-1]}]\noutputs: [{name: y, datatype: FP32, shape: [-1]}]\n",
			[]string{"model.yaml:2: artifact"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, "model.yaml"), []byte(tc.yaml), 0o644); err != nil {
				t.Fatal(err)
			}
			_, err := loadSpec(dir, "m", "v1", []string{"xgboost", "linear"})
			if err == nil {
				t.Fatal("loaded, want errors")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q\nlacks %q", err, w)
				}
			}
		})
	}
}

func TestLoadSpecGood(t *testing.T) {
	s, err := loadSpec("../examples/models/ranker/v7", "ranker", "v7", nil)
	if err != nil {
		t.Fatal(err)
	}
	if !s.Default || s.Runtime != "xgboost" || s.MaxBatch != 64 || s.MaxDelay.String() != "500µs" || s.Inputs[0].Shape[1] != 8 {
		t.Errorf("spec: %+v", s)
	}
}

func TestVersionLess(t *testing.T) {
	ordered := []string{"1", "2", "10", "v1", "v2", "v9", "v10", "v10a", "v10b", "v11"}
	for i := range ordered {
		for j := range ordered {
			if got := versionLess(ordered[i], ordered[j]); got != (i < j) {
				t.Errorf("versionLess(%q, %q) = %v", ordered[i], ordered[j], got)
			}
		}
	}
}
