package k8s

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	v1 "github.com/patchbay-io/patchbay/api/k8s/v1"
	"github.com/patchbay-io/patchbay/xds"
	"github.com/patchbay-io/patchbay/xds/kube"
	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/store"
)

// The ranker example as kubectl applies it, and the same rollout as a file.
const (
	rankerManifest = `
apiVersion: patchbay.io/v1
kind: Rollout
metadata:
  name: ranker
spec:
  versions:
    - name: v7
      endpoints: ["127.0.0.1:9001"]
      grpcEndpoints: ["127.0.0.1:9011"]
    - name: v8
      endpoints: ["127.0.0.1:9002"]
      grpcEndpoints: ["127.0.0.1:9012"]
  traffic:
    v7: 90
    v8: 10
  shadow:
    - version: v8
      percent: 5
  experiments:
    - name: ranker-ltv
      layer: ranking
      allocation: 20.5
      match:
        headers: {x-country: [US, CA]}
      arms:
        - {name: control, version: v7, weight: 50}
        - {name: treatment, version: v8, weight: 50}
  timeout: 2s
  retries: 1
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
    grpcEndpoints: ["127.0.0.1:9012"]
traffic:
  v7: 90
  v8: 10
shadow:
  - version: v8
    percent: 5
experiments:
  - name: ranker-ltv
    layer: ranking
    allocation: 20.5
    match:
      headers: {x-country: [US, CA]}
    arms:
      - {name: control, version: v7, weight: 50}
      - {name: treatment, version: v8, weight: 50}
timeout: 2s
retries: 1
`
)

var _ interface {
	xds.Source
	xds.ProblemReporter
} = (*kube.Source)(nil)

var ignoreSource = cmp.Options{cmpopts.IgnoreUnexported(rollout.Rollout{}), cmpopts.IgnoreFields(rollout.Rollout{}, "Source")}

// watching starts src.Watch for the test and returns a channel of its change
// notifications once it is ready.
func watching(t *testing.T, src *kube.Source) <-chan struct{} {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	changed := make(chan struct{}, 1)
	var wg sync.WaitGroup
	wg.Add(1)
	errc := make(chan error, 1)
	go func() {
		defer wg.Done()
		errc <- src.Watch(ctx, func() { close(ready) }, func() {
			select {
			case changed <- struct{}{}:
			default:
			}
		})
	}()
	t.Cleanup(func() { cancel(); wg.Wait() })
	select {
	case <-ready:
	case err := <-errc:
		t.Fatalf("Watch: %v", err)
	}
	return changed
}

func load(t *testing.T, files []rollout.File) *rollout.Set {
	t.Helper()
	set, err := rollout.LoadData(files)
	if err != nil {
		t.Fatalf("load %d documents: %v", len(files), err)
	}
	return set
}

// TestSourceReadsKubectlYAML: a Rollout applied from kubectl-shaped YAML is read by the
// Source as the very rollout the file loader gives for the equivalent file (every field),
// named <namespace>/<name>; the name stands in for model.
func TestSourceReadsKubectlYAML(t *testing.T) {
	ns := namespace(t)
	apply(t, ns, rankerManifest)
	src := kube.NewSource(kubeConfig(t, ns))
	watching(t, src)
	files, settled, err := src.Read(context.Background())
	if err != nil || !settled {
		t.Fatalf("Read: %v (settled %v)", err, settled)
	}
	if len(files) != 1 || files[0].Path != ns+"/ranker" {
		t.Fatalf("files %+v", files)
	}
	got := load(t, files)
	want := load(t, []rollout.File{{Path: "ranker.yaml", Data: []byte(rankerFile)}})
	if d := cmp.Diff(want.Rollouts, got.Rollouts, ignoreSource); d != "" {
		t.Errorf("Rollout object vs file (-file +object):\n%s", d)
	}
	if a := got.Rollouts[0].Experiments[0].Allocation; a != 2050 {
		t.Errorf("allocation %v, want 20.5%% exactly", a)
	}
}

// TestInvalidRolloutKeepsLastGood: a Rollout edited into one that breaks a rule gets
// Ready=False reason Invalid naming the field path (no line), observedGeneration of the bad
// spec, and Read still returns its last good document (nothing served changes), also to a
// replica started after the bad edit (status.lastApplied). Fixing it applies it again.
func TestInvalidRolloutKeepsLastGood(t *testing.T) {
	ns := namespace(t)
	apply(t, ns, rankerManifest)
	src := kube.NewSource(kubeConfig(t, ns))
	changed := watching(t, src)
	ctx := context.Background()
	good, _, err := src.Read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	load(t, good)
	src.Report(ctx, nil, "1") // the server applied it
	eventually(t, "Ready=True Applied", func() (bool, string) {
		obj := getRollout(t, ns, "ranker")
		c := readyCondition(obj)
		split, _, _ := unstructured.NestedString(obj.Object, "status", "split")
		state, _, _ := unstructured.NestedString(obj.Object, "status", "state")
		return c != nil && c.Status == metav1.ConditionTrue && c.Reason == v1.ReasonApplied && c.ObservedGeneration == 1 &&
			split == "v7=90,v8=10" && state == v1.StateServing, spew(obj)
	})

	// traffic sums to 90 and names a version that does not exist: schema-valid, rule-invalid.
	bad := strings.Replace(rankerManifest, "    v8: 10\n", "    v9: 0\n", 1)
	replaceSpec(t, ns, bad)
	waitChanged(t, changed)
	files, _, err := src.Read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 1 || !bytes.Equal(files[0].Data, good[0].Data) {
		t.Fatalf("after an invalid edit Read returns\n%s\nwant the last good\n%s", data(files), good[0].Data)
	}
	eventually(t, "Ready=False Invalid with field paths", func() (bool, string) {
		obj := getRollout(t, ns, "ranker")
		c := readyCondition(obj)
		state, _, _ := unstructured.NestedString(obj.Object, "status", "state")
		return c != nil && c.Status == metav1.ConditionFalse && c.Reason == v1.ReasonInvalid && c.ObservedGeneration == 2 &&
			strings.Contains(c.Message, "spec.traffic.v9: ") && strings.Contains(c.Message, "spec.traffic: ") &&
			!strings.Contains(c.Message, ns+"/ranker") && state == v1.StateInvalid, spew(obj)
	})

	// A replica that starts now never saw the good spec: it serves status.lastApplied.
	fresh := kube.NewSource(kubeConfig(t, ns))
	watching(t, fresh)
	files, _, err = fresh.Read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 1 || !bytes.Equal(files[0].Data, good[0].Data) {
		t.Fatalf("a fresh replica reads\n%s\nwant the last applied\n%s", data(files), good[0].Data)
	}

	// Fixed: applied again.
	replaceSpec(t, ns, rankerManifest+"  pinning: true\n")
	waitChanged(t, changed)
	files, _, err = src.Read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if set := load(t, files); !set.Rollouts[0].Pinning {
		t.Fatal("fixed spec not read")
	}
	src.Report(ctx, nil, "2")
	eventually(t, "Ready=True again", func() (bool, string) {
		obj := getRollout(t, ns, "ranker")
		c := readyCondition(obj)
		return c != nil && c.Status == metav1.ConditionTrue && c.ObservedGeneration == 3, spew(obj)
	})
}

// TestServerProblemsReachStatus: a problem the server finds across Rollouts (two serving
// one model) lands in the status of the Rollout it names, by field path.
func TestServerProblemsReachStatus(t *testing.T) {
	ns := namespace(t)
	apply(t, ns, rankerManifest)
	apply(t, ns, strings.Replace(rankerManifest, "name: ranker\nspec:\n", "name: ranker-copy\nspec:\n  model: ranker\n", 1))
	src := kube.NewSource(kubeConfig(t, ns))
	watching(t, src)
	ctx := context.Background()
	files, _, err := src.Read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_, lerr := rollout.LoadData(files)
	if lerr == nil {
		t.Fatal("two Rollouts of one model loaded")
	}
	probs := map[string][]*rollout.Error{}
	for _, e := range flatten(lerr) {
		probs[e.File] = append(probs[e.File], e)
	}
	src.Report(ctx, probs, "")
	eventually(t, "duplicate model reported", func() (bool, string) {
		obj := getRollout(t, ns, "ranker-copy")
		c := readyCondition(obj)
		return c != nil && c.Reason == v1.ReasonInvalid && strings.Contains(c.Message, "spec.model: "), spew(obj)
	})
}

// waitChanged waits (at most 30 s) for a change notification.
func waitChanged(t *testing.T, changed <-chan struct{}) {
	t.Helper()
	select {
	case <-changed:
	case <-time.After(30 * time.Second):
		t.Fatal("no change notification in 30s")
	}
}

func flatten(err error) []*rollout.Error {
	var out []*rollout.Error
	var walk func(error)
	walk = func(e error) {
		if j, ok := e.(interface{ Unwrap() []error }); ok {
			for _, c := range j.Unwrap() {
				walk(c)
			}
			return
		}
		var re *rollout.Error
		if errors.As(e, &re) {
			out = append(out, re)
		}
	}
	walk(err)
	return out
}

func data(files []rollout.File) string {
	var b strings.Builder
	for _, f := range files {
		b.WriteString("# " + f.Path + "\n")
		b.Write(f.Data)
	}
	return b.String()
}

// spew is an object's status, for a failure message.
func spew(obj *unstructured.Unstructured) string {
	b, _ := json.Marshal(obj.Object["status"])
	return fmt.Sprintf("generation %d, status %s", obj.GetGeneration(), b)
}

// TestReloadFailureReachesEveryStatus: a reload failure tied to no document (reported
// under kube.AllDocuments) puts Ready=False on every Rollout, none stays Applied.
func TestReloadFailureReachesEveryStatus(t *testing.T) {
	ns := namespace(t)
	apply(t, ns, rankerManifest)
	apply(t, ns, strings.Replace(rankerManifest, "name: ranker\nspec:\n", "name: churn\nspec:\n", 1))
	src := kube.NewSource(kubeConfig(t, ns))
	watching(t, src)
	ctx := context.Background()
	if _, _, err := src.Read(ctx); err != nil {
		t.Fatal(err)
	}
	src.Report(ctx, nil, "1")
	src.Report(ctx, map[string][]*rollout.Error{kube.AllDocuments: {{Msg: "translation rejected: listener address missing"}}}, "1")
	for _, name := range []string{"ranker", "churn"} {
		eventually(t, name+" not Applied", func() (bool, string) {
			obj := getRollout(t, ns, name)
			c := readyCondition(obj)
			return c != nil && c.Status == metav1.ConditionFalse && c.Reason == v1.ReasonInvalid &&
				c.Message == "translation rejected: listener address missing", spew(obj)
		})
	}
}

// TestRollbackShowsWithoutReport: a rollback another replica writes into the state makes
// this replica's Source rewrite the status (state RolledBack, split of the rollback) even
// before any reload of its own reports again.
func TestRollbackShowsWithoutReport(t *testing.T) {
	ns := namespace(t)
	apply(t, ns, rankerManifest)
	cfg := kubeConfig(t, ns)
	src := kube.NewSource(cfg)
	watching(t, src)
	ctx := context.Background()
	if _, _, err := src.Read(ctx); err != nil {
		t.Fatal(err)
	}
	src.Report(ctx, nil, "1")
	other := kube.NewStore(kubeConfig(t, ns))
	if _, err := other.Update(ctx, "ranker", func(cur store.ModelState) (store.ModelState, error) {
		cur.Rollback = &store.Rollback{Traffic: map[string]int{"v7": 100}, Reason: "test", At: time.Now().UTC(), FromIndex: -1}
		return cur, nil
	}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "status RolledBack", func() (bool, string) {
		obj := getRollout(t, ns, "ranker")
		c := readyCondition(obj)
		state, _, _ := unstructured.NestedString(obj.Object, "status", "state")
		split, _, _ := unstructured.NestedString(obj.Object, "status", "split")
		return c != nil && c.Reason == v1.ReasonRolledBack && state == v1.StateRolledBack && split == "v7=100", spew(obj)
	})
}
