package v1_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	v1 "github.com/patchbay-io/patchbay/api/k8s/v1"
	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/store"
)

const crdFile = "charts/patchbay/crds/rollouts.patchbay.io.yaml"

// root is the repository root (this package is api/k8s/v1).
func root(t *testing.T) string {
	t.Helper()
	r, err := filepath.Abs("../../..")
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// crdOptions reads the Makefile's CRD_OPTIONS, so this test generates exactly as make does.
func crdOptions(t *testing.T) []string {
	t.Helper()
	mk, err := os.ReadFile(filepath.Join(root(t), "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^CRD_OPTIONS\s*:?=\s*(.*)$`).FindSubmatch(mk)
	if m == nil {
		t.Fatal("Makefile: no CRD_OPTIONS line")
	}
	return strings.Fields(string(m[1]))
}

func controllerGen(t *testing.T, args ...string) []byte {
	t.Helper()
	cmd := exec.Command("go", append([]string{"tool", "controller-gen"}, args...)...)
	cmd.Dir = root(t)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go tool controller-gen %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return out
}

// TestGeneratedFilesAreCurrent: the committed CRD and deepcopy code are what make generate
// writes from the Go types now (a type changed without make generate fails here).
func TestGeneratedFilesAreCurrent(t *testing.T) {
	if testing.Short() {
		t.Skip("runs controller-gen")
	}
	for _, c := range []struct {
		file string
		args []string
	}{
		{crdFile, append(crdOptions(t), "paths=./api/k8s/v1/...", "output:crd:stdout")},
		{"api/k8s/v1/zz_generated.deepcopy.go", []string{"object", "paths=./api/k8s/v1/...", "output:object:stdout"}},
	} {
		want := controllerGen(t, c.args...)
		got, err := os.ReadFile(filepath.Join(root(t), c.file))
		if err != nil {
			t.Fatal(err)
		}
		if d := cmp.Diff(string(want), string(got)); d != "" {
			t.Errorf("%s is stale; run make generate (-generated +committed):\n%s", c.file, d)
		}
	}
}

// TestCRDShape: the committed CRD has the group, names, scope, status subresource and
// printer columns the chart and `kubectl get rollouts` rely on.
func TestCRDShape(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(root(t), crdFile))
	if err != nil {
		t.Fatal(err)
	}
	var crd struct {
		Metadata struct{ Name string }
		Spec     struct {
			Group string
			Scope string
			Names struct {
				Kind, Plural string
				ShortNames   []string
			}
			Versions []struct {
				Name                     string
				Served, Storage          bool
				Subresources             map[string]any
				AdditionalPrinterColumns []struct{ Name, JSONPath string }
				Schema                   struct {
					OpenAPIV3Schema struct {
						Properties map[string]struct {
							Properties map[string]any
						}
					}
				}
			}
		}
	}
	if err := yaml.Unmarshal(data, &crd); err != nil {
		t.Fatal(err)
	}
	if crd.Metadata.Name != v1.CRDName || crd.Spec.Group != v1.Group || crd.Spec.Scope != "Namespaced" ||
		crd.Spec.Names.Kind != v1.Kind || crd.Spec.Names.Plural != v1.Resource {
		t.Errorf("CRD identity: %+v %+v", crd.Metadata, crd.Spec.Names)
	}
	if len(crd.Spec.Versions) != 1 || crd.Spec.Versions[0].Name != v1.Version || !crd.Spec.Versions[0].Served || !crd.Spec.Versions[0].Storage {
		t.Fatalf("versions: %+v", crd.Spec.Versions)
	}
	ver := crd.Spec.Versions[0]
	if _, ok := ver.Subresources["status"]; !ok {
		t.Error("no status subresource")
	}
	var cols []string
	for _, c := range ver.AdditionalPrinterColumns {
		cols = append(cols, c.Name+"="+c.JSONPath)
	}
	want := []string{"Model=.status.model", "Split=.status.split", "State=.status.state", "Age=.metadata.creationTimestamp"}
	if d := cmp.Diff(want, cols); d != "" {
		t.Errorf("printer columns (-want +got):\n%s", d)
	}
	// The schema's spec properties are the file format's top-level fields.
	var props []string
	for p := range ver.Schema.OpenAPIV3Schema.Properties["spec"].Properties {
		props = append(props, p)
	}
	sort.Strings(props)
	if d := cmp.Diff(yamlNames(reflect.TypeFor[rollout.Rollout](), "apiVersion", "kind"), props); d != "" {
		t.Errorf("CRD spec properties vs file format fields (-file +crd):\n%s", d)
	}
}

// TestSpecFieldsAreTheFileFormats: every field of the file format (xds/rollout, yaml names)
// has a field of the same name in the CRD's spec (json names), at every depth, and the CRD
// has no field the file format lacks, so a Rollout object renders into a rollout file field
// for field and the two formats cannot drift.
func TestSpecFieldsAreTheFileFormats(t *testing.T) {
	// apiVersion and kind are the object's own (TypeMeta), not spec's.
	tm := reflect.TypeFor[metav1.TypeMeta]()
	if n := jsonNames(tm); !reflect.DeepEqual(n, []string{"apiVersion", "kind"}) {
		t.Fatalf("TypeMeta fields %v", n)
	}
	compareFields(t, "spec", reflect.TypeFor[rollout.Rollout](), "yaml", reflect.TypeFor[v1.RolloutSpec](), []string{"apiVersion", "kind"})
}

// TestStatusHoldsModelState: status has every field of store.ModelState (the state a
// Store keeps) under the same JSON names, at every depth.
func TestStatusHoldsModelState(t *testing.T) {
	st := reflect.TypeFor[v1.RolloutStatus]()
	extra := map[string]bool{"model": true, "split": true, "state": true, "observedGeneration": true, "conditions": true, "lastApplied": true, "lastRollbackRequest": true}
	ms := reflect.TypeFor[store.ModelState]()
	msNames := map[string]bool{}
	for _, n := range jsonNames(ms) {
		msNames[n] = true
	}
	for _, n := range jsonNames(st) {
		if !msNames[n] && !extra[n] {
			t.Errorf("status.%s is neither a ModelState field nor a reported one", n)
		}
	}
	var stOnly []string
	for _, n := range jsonNames(st) {
		if extra[n] {
			stOnly = append(stOnly, n)
		}
	}
	compareFields(t, "status", ms, "json", st, stOnly)
}

// compareFields pairs the fields of a (tag key ta) and b (json) by name, recursing into
// struct element types, and reports a field either side lacks. skipB are b-only names allowed
// at the top; a-fields listed in skipB (apiVersion, kind) are likewise not expected in b.
func compareFields(t *testing.T, path string, a reflect.Type, ta string, b reflect.Type, skip []string) {
	t.Helper()
	skipped := map[string]bool{}
	for _, s := range skip {
		skipped[s] = true
	}
	af, bf := fieldsByName(a, ta), fieldsByName(b, "json")
	for n, f := range af {
		if skipped[n] {
			continue
		}
		g, ok := bf[n]
		if !ok {
			t.Errorf("%s.%s: in %v, not in %v", path, n, a, b)
			continue
		}
		ea, eb := elem(f.Type), elem(g.Type)
		if plainStruct(ea) != plainStruct(eb) {
			t.Errorf("%s.%s: %v vs %v: one is an object, the other is not", path, n, f.Type, g.Type)
			continue
		}
		if plainStruct(ea) {
			compareFields(t, path+"."+n, ea, ta, eb, nil)
		}
	}
	for n := range bf {
		if _, ok := af[n]; !ok && !skipped[n] {
			t.Errorf("%s.%s: in %v, not in %v", path, n, b, a)
		}
	}
}

// elem strips pointers, slices and maps down to the element type.
func elem(t reflect.Type) reflect.Type {
	for {
		switch t.Kind() {
		case reflect.Pointer, reflect.Slice, reflect.Map:
			t = t.Elem()
		default:
			return t
		}
	}
}

// plainStruct reports whether t is an object with fields of its own (not a scalar written
// as a string, like a duration or a timestamp).
func plainStruct(t reflect.Type) bool {
	switch t {
	case reflect.TypeFor[rollout.Duration](), reflect.TypeFor[metav1.Duration](), reflect.TypeFor[metav1.Time](),
		reflect.TypeFor[rollout.Threshold](), reflect.TypeFor[v1.Threshold]():
		return false
	}
	return t.Kind() == reflect.Struct && t.PkgPath() != "time"
}

func fieldsByName(t reflect.Type, key string) map[string]reflect.StructField {
	out := map[string]reflect.StructField{}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get(key), ",")
		if name == "-" || (name == "" && f.Anonymous) {
			continue
		}
		if name == "" {
			name = f.Name
		}
		out[name] = f
	}
	return out
}

func jsonNames(t reflect.Type) []string { return names(t, "json") }

func yamlNames(t reflect.Type, skip ...string) []string {
	var out []string
	for _, n := range names(t, "yaml") {
		if !contains(skip, n) {
			out = append(out, n)
		}
	}
	return out
}

func names(t reflect.Type, key string) []string {
	var out []string
	for n := range fieldsByName(t, key) {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}
