package k8s

import (
	"context"
	"encoding/json"
	"testing"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiextensions "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	v1 "github.com/patchbay-io/patchbay/api/k8s/v1"
)

// TestChartCRDEstablished: the chart's own CRD file (installed by TestMain as Helm installs
// crds/) is accepted and Established, with the names, scope and status subresource the
// control plane relies on.
func TestChartCRDEstablished(t *testing.T) {
	cs, err := apiextensions.NewForConfig(server.Config)
	if err != nil {
		t.Fatal(err)
	}
	crd, err := cs.ApiextensionsV1().CustomResourceDefinitions().Get(context.Background(), v1.CRDName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	conds := map[apiextensionsv1.CustomResourceDefinitionConditionType]apiextensionsv1.ConditionStatus{}
	for _, c := range crd.Status.Conditions {
		conds[c.Type] = c.Status
	}
	if conds[apiextensionsv1.Established] != apiextensionsv1.ConditionTrue || conds[apiextensionsv1.NamesAccepted] != apiextensionsv1.ConditionTrue {
		t.Errorf("conditions %v", conds)
	}
	if crd.Status.AcceptedNames.Kind != v1.Kind || crd.Spec.Scope != apiextensionsv1.NamespaceScoped {
		t.Errorf("accepted names %+v, scope %s", crd.Status.AcceptedNames, crd.Spec.Scope)
	}
	if v := crd.Spec.Versions; len(v) != 1 || v[0].Subresources == nil || v[0].Subresources.Status == nil {
		t.Errorf("no status subresource: %+v", v)
	}
}

// TestGetRolloutsShowsColumns: what `kubectl get rollouts` asks for (a Table) has the
// columns Name, Model, Split, State, Age, filled from status.
func TestGetRolloutsShowsColumns(t *testing.T) {
	ns := namespace(t)
	obj := apply(t, ns, rankerManifest)
	obj.Object["status"] = map[string]any{"model": "ranker", "split": "v7=90,v8=10", "state": v1.StateServing}
	rc := clients(t).Dynamic.Resource(v1.GroupVersionResource).Namespace(ns)
	if _, err := rc.UpdateStatus(context.Background(), obj, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	// kubectl's request: GET .../rollouts with Accept: a meta.k8s.io/v1 Table.
	raw, err := clients(t).Kube.CoreV1().RESTClient().Get().AbsPath("/apis", v1.Group, v1.Version, "namespaces", ns, v1.Resource).
		SetHeader("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io").DoRaw(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var table metav1.Table
	if err := json.Unmarshal(raw, &table); err != nil {
		t.Fatal(err)
	}
	var cols []string
	for _, c := range table.ColumnDefinitions {
		cols = append(cols, c.Name)
	}
	if want := []string{"Name", "Model", "Split", "State", "Age"}; !equal(cols, want) {
		t.Fatalf("columns %v, want %v", cols, want)
	}
	if len(table.Rows) != 1 {
		t.Fatalf("%d rows", len(table.Rows))
	}
	row := table.Rows[0].Cells
	if row[0] != "ranker" || row[1] != "ranker" || row[2] != "v7=90,v8=10" || row[3] != v1.StateServing {
		t.Errorf("row %v", row)
	}
}

// TestSchemaRejectsCheapMistakes: what the schema states (types, ranges, enums, unknown
// fields under strict field validation, as kubectl apply sends it) is refused at apply time.
func TestSchemaRejectsCheapMistakes(t *testing.T) {
	ns := namespace(t)
	rc := clients(t).Dynamic.Resource(v1.GroupVersionResource).Namespace(ns)
	for name, edit := range map[string]func(spec map[string]any){
		"percent-over-100": func(s map[string]any) { s["shadow"] = []any{map[string]any{"version": "v8", "percent": 150}} },
		"bad-protocol": func(s map[string]any) {
			s["versions"].([]any)[0].(map[string]any)["protocol"] = "udp"
		},
		"unknown-field": func(s map[string]any) { s["colour"] = "blue" },
		"model-not-dns": func(s map[string]any) { s["model"] = "Ranker_EU" },
		"bad-timeout":   func(s map[string]any) { s["timeout"] = "soon" },
	} {
		obj := parseManifest(t, rankerManifest)
		obj.SetName(name)
		spec, _, _ := unstructured.NestedMap(obj.Object, "spec")
		edit(spec)
		obj.Object["spec"] = spec
		if _, err := rc.Create(context.Background(), obj, metav1.CreateOptions{FieldValidation: "Strict"}); err == nil {
			t.Errorf("%s: created", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
