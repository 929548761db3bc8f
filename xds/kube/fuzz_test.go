package kube

import (
	"bytes"
	"encoding/json"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"

	"github.com/patchbay-io/patchbay/xds/rollout"
)

// FuzzRender: any JSON spec a Rollout object may carry renders without a panic, the same
// way every time, and what loads is the model the object names (spec.model, else its name).
func FuzzRender(f *testing.F) {
	for _, m := range []string{rankerManifest, canaryManifest} {
		var obj map[string]any
		if err := yaml.Unmarshal([]byte(m), &obj); err != nil {
			f.Fatal(err)
		}
		b, _ := json.Marshal(obj["spec"])
		f.Add(b)
	}
	f.Add([]byte(`{"model":"x","versions":[{"name":"a","endpoints":["127.0.0.1:1"]}],"traffic":{"a":100}}`))
	f.Add([]byte(`{"traffic":{"a":1e400},"shadow":[{"version":"a","percent":0.001}]}`))
	f.Add([]byte(`{"versions":"no","experiments":[{"allocation":"20"}],"model":7}`))
	f.Add([]byte(`{"analysis":{"steps":[5,1],"gates":[{"metric":"latency","max":{"ms":[1]}},{"max":null}]}}`))
	f.Fuzz(func(t *testing.T, spec []byte) {
		var s any
		if json.Unmarshal(spec, &s) != nil {
			return
		}
		obj := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "patchbay.io/v1", "kind": "Rollout",
			"metadata": map[string]any{"name": "ranker", "namespace": "ml"}, "spec": s,
		}}
		data, err := Render(obj)
		if err != nil {
			return
		}
		again, err := Render(obj)
		if err != nil || !bytes.Equal(data, again) {
			t.Fatalf("Render is not deterministic: %v\n%s\n%s", err, data, again)
		}
		set, err := rollout.LoadData([]rollout.File{{Path: Path(obj), Data: data}})
		if err != nil {
			_ = Message(problems(Path(obj), data, err))
			return
		}
		if len(set.Rollouts) != 1 || set.Rollouts[0].Model != Model(obj) {
			t.Fatalf("loaded %d rollouts, model %v; object's model %q", len(set.Rollouts), set.Rollouts, Model(obj))
		}
	})
}
