package kube

import (
	"errors"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"

	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/store"
)

// The ranker example as a kubectl manifest and as a rollout file: the same rollout.
const (
	rankerManifest = `
apiVersion: patchbay.io/v1
kind: Rollout
metadata:
  name: ranker
  namespace: ml
spec:
  versions:
    - name: v7
      endpoints: ["127.0.0.1:9001"]
      grpcEndpoints: ["127.0.0.1:9011"]
    - name: v8
      endpoints: ["127.0.0.1:9002"]
      protocol: http
      host: oip
      tls: true
  traffic: {v7: 90, v8: 10}
  shadow: [{version: v8, percent: 2.5}]
  experiments:
    - name: ranker-ltv
      layer: ranking
      allocation: 0.25
      match: {headers: {x-country: [US, CA]}}
      arms:
        - {name: control, version: v7, weight: 50}
        - {name: treatment, version: v8, weight: 50}
  timeout: 2s
  retries: 1
  pinning: true
  bodyMode: true
`
	rankerFile = `
apiVersion: patchbay.io/v1
kind: Rollout
model: ranker
versions:
  - name: v7
    endpoints: ["127.0.0.1:9001"]
    grpcEndpoints: ["127.0.0.1:9011"]
  - name: v8
    endpoints: ["127.0.0.1:9002"]
    protocol: http
    host: oip
    tls: true
traffic: {v7: 90, v8: 10}
shadow: [{version: v8, percent: 2.5}]
experiments:
  - name: ranker-ltv
    layer: ranking
    allocation: 0.25
    match: {headers: {x-country: [US, CA]}}
    arms:
      - {name: control, version: v7, weight: 50}
      - {name: treatment, version: v8, weight: 50}
timeout: 2s
retries: 1
pinning: true
bodyMode: true
`
)

func object(t *testing.T, manifest string) *unstructured.Unstructured {
	t.Helper()
	var m map[string]any
	if err := yaml.Unmarshal([]byte(manifest), &m); err != nil {
		t.Fatal(err)
	}
	return &unstructured.Unstructured{Object: m}
}

// ignoreSource drops where a rollout came from (file, lines): the rest is the spec.
var ignoreSource = cmp.Options{cmpopts.IgnoreUnexported(rollout.Rollout{}), cmpopts.IgnoreFields(rollout.Rollout{}, "Source")}

// TestRenderLoadsAsTheFile: a Rollout object, rendered, loads through the file loader into
// the same rollout as the equivalent file, every field included; model defaults to the
// object's name.
func TestRenderLoadsAsTheFile(t *testing.T) {
	obj := object(t, rankerManifest)
	data, err := Render(obj)
	if err != nil {
		t.Fatal(err)
	}
	got, err := rollout.LoadData([]rollout.File{{Path: Path(obj), Data: data}})
	if err != nil {
		t.Fatalf("rendered object does not load: %v\n%s", err, data)
	}
	want, err := rollout.LoadData([]rollout.File{{Path: "ranker.yaml", Data: []byte(rankerFile)}})
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(want.Rollouts, got.Rollouts, ignoreSource); d != "" {
		t.Errorf("object vs file (-file +object):\n%s", d)
	}
	if got.Rollouts[0].Model != "ranker" || got.Rollouts[0].Source.File != "ml/ranker" {
		t.Errorf("model %q from %q", got.Rollouts[0].Model, got.Rollouts[0].Source.File)
	}
}

// TestRenderSpecModelWins: spec.model, when given, names the model (not metadata.name).
func TestRenderSpecModelWins(t *testing.T) {
	obj := object(t, strings.Replace(rankerManifest, "  versions:", "  model: ranker-eu\n  versions:", 1))
	data, err := Render(obj)
	if err != nil {
		t.Fatal(err)
	}
	set, err := rollout.LoadData([]rollout.File{{Path: Path(obj), Data: data}})
	if err != nil {
		t.Fatal(err)
	}
	if m := set.Rollouts[0].Model; m != "ranker-eu" {
		t.Errorf("model %q, want ranker-eu", m)
	}
}

// TestProblemsNameSpecFieldPaths: an invalid spec's problems are given by field path under
// spec, without the rendered document's line numbers.
func TestProblemsNameSpecFieldPaths(t *testing.T) {
	bad := strings.Replace(rankerManifest, "traffic: {v7: 90, v8: 10}", "traffic: {v7: 80, v9: 10}", 1)
	bad = strings.Replace(bad, "bodyMode: true", "bodyMode: true\n  colour: blue", 1)
	obj := object(t, bad)
	data, err := Render(obj)
	if err != nil {
		t.Fatal(err)
	}
	_, err = rollout.LoadData([]rollout.File{{Path: Path(obj), Data: data}})
	if err == nil {
		t.Fatal("invalid spec loaded")
	}
	msg := Message(problems(Path(obj), data, err))
	for _, want := range []string{`spec.traffic.v9: `, `spec.traffic: `, `unknown field "colour"`} {
		if !strings.Contains(msg, want) {
			t.Errorf("message %q lacks %q", msg, want)
		}
	}
	if regexp.MustCompile(`ml/ranker|:\d+:|line \d`).MatchString(msg) {
		t.Errorf("message %q carries a file or line", msg)
	}
}

func TestSplit(t *testing.T) {
	for _, c := range []struct {
		traffic map[string]int
		order   []string
		want    string
	}{
		{map[string]int{"v7": 90, "v8": 10}, []string{"v7", "v8"}, "v7=90,v8=10"},
		{map[string]int{"v7": 10, "v8": 90}, []string{"v8", "v7"}, "v8=90,v7=10"},
		{map[string]int{"v7": 100, "v8": 0}, []string{"v7", "v8"}, "v7=100"},
		{map[string]int{"b": 50, "a": 50}, nil, "a=50,b=50"},
		{nil, nil, ""},
	} {
		if got := Split(c.traffic, c.order); got != c.want {
			t.Errorf("Split(%v, %v) = %q, want %q", c.traffic, c.order, got, c.want)
		}
	}
}

// TestModelStateInStatus: a ModelState written into a status reads back equal (rollback
// time to the nanosecond), and the status's other fields are left alone.
func TestModelStateInStatus(t *testing.T) {
	obj := object(t, rankerManifest)
	obj.Object["status"] = map[string]any{"state": "Serving", "split": "v7=90,v8=10", "history": []any{map[string]any{"v7": int64(100)}}}
	want := store.ModelState{
		SpecFingerprint: "fp1",
		Slots:           []store.Run{{Version: "v7", Slots: 90}, {Version: "v8", Slots: 10}},
		Rollback:        &store.Rollback{Traffic: map[string]int{"v7": 100}, Reason: "last known-good split", At: time.Date(2026, 11, 30, 12, 0, 0, 123456789, time.UTC), FromIndex: 0, SpecFingerprint: "fp1"},
		History:         []map[string]int{{"v7": 100}, {"v7": 90, "v8": 10}},
		ConfigVersion:   "42",
	}
	if err := setModelState(obj, want); err != nil {
		t.Fatal(err)
	}
	got, err := modelState(obj)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("(-want +got):\n%s", d)
	}
	if s, _, _ := unstructured.NestedString(obj.Object, "status", "state"); s != "Serving" {
		t.Errorf("status.state = %q after writing the state", s)
	}
	// A zero state clears the state fields.
	if err := setModelState(obj, store.ModelState{}); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := unstructured.NestedFieldNoCopy(obj.Object, "status", "history"); ok {
		t.Error("history kept after writing a zero state")
	}
}

// TestCorruptStatus: a status whose state fields cannot be read is ErrCorrupt.
func TestCorruptStatus(t *testing.T) {
	obj := object(t, rankerManifest)
	obj.Object["status"] = map[string]any{"slots": "not a list"}
	if _, err := modelState(obj); !errors.Is(err, store.ErrCorrupt) {
		t.Fatalf("err = %v, want ErrCorrupt", err)
	}
}
