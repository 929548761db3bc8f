package k8s

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiextensions "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"

	v1 "github.com/patchbay-io/patchbay/api/k8s/v1"
	"github.com/patchbay-io/patchbay/xds/kube"
)

// installCRDs creates every CRD in dir (as Helm does with a chart's crds/) and waits until
// each is Established.
func installCRDs(ctx context.Context, cfg *rest.Config, dir string) error {
	cs, err := apiextensions.NewForConfig(cfg)
	if err != nil {
		return err
	}
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil || len(files) == 0 {
		return fmt.Errorf("no CRDs in %s (%v)", dir, err)
	}
	var names []string
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		for _, doc := range strings.Split(string(data), "\n---\n") {
			if strings.TrimSpace(strings.TrimPrefix(doc, "---")) == "" {
				continue
			}
			var crd apiextensionsv1.CustomResourceDefinition
			if err := yaml.UnmarshalStrict([]byte(doc), &crd); err != nil {
				return fmt.Errorf("%s: %w", f, err)
			}
			if _, err := cs.ApiextensionsV1().CustomResourceDefinitions().Create(ctx, &crd, metav1.CreateOptions{}); err != nil {
				return fmt.Errorf("install %s from %s: %w", crd.Name, f, err)
			}
			names = append(names, crd.Name)
		}
	}
	for _, n := range names {
		err := wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
			crd, err := cs.ApiextensionsV1().CustomResourceDefinitions().Get(ctx, n, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			for _, c := range crd.Status.Conditions {
				if c.Type == apiextensionsv1.Established && c.Status == apiextensionsv1.ConditionTrue {
					return true, nil
				}
			}
			return false, nil
		})
		if err != nil {
			return fmt.Errorf("CRD %s not Established: %w", n, err)
		}
	}
	return nil
}

// clients are new API clients for the shared server (each call: a separate connection, as
// a separate control-plane replica would have).
func clients(t *testing.T) *kube.Clients {
	t.Helper()
	c, err := kube.NewClientsForConfig(server.Config)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

var nsSeq atomic.Int64

// namespace creates a namespace of its own for the test.
func namespace(t *testing.T) string {
	t.Helper()
	name := fmt.Sprintf("t%d-%s", nsSeq.Add(1), strings.ToLower(strings.NewReplacer("/", "-", "_", "-").Replace(t.Name())))
	if len(name) > 63 {
		name = strings.TrimRight(name[:63], "-")
	}
	_, err := clients(t).Kube.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return name
}

// kubeConfig is a kube.Config for a namespace, logging into the test's log.
func kubeConfig(t *testing.T, ns string) kube.Config {
	return kube.Config{Client: clients(t).Dynamic, Namespace: ns, Logger: zerolog.New(testWriter{t}).With().Timestamp().Logger()}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// apply creates the object a kubectl-shaped YAML manifest describes (sigs.k8s.io/yaml →
// unstructured → create), as `kubectl create -f` sends it.
func apply(t *testing.T, ns, manifest string) *unstructured.Unstructured {
	t.Helper()
	obj := parseManifest(t, manifest)
	got, err := clients(t).Dynamic.Resource(v1.GroupVersionResource).Namespace(ns).Create(context.Background(), obj, metav1.CreateOptions{FieldValidation: "Strict"})
	if err != nil {
		t.Fatalf("create %s: %v", obj.GetName(), err)
	}
	return got
}

func parseManifest(t *testing.T, manifest string) *unstructured.Unstructured {
	t.Helper()
	var m map[string]any
	if err := yaml.Unmarshal([]byte(manifest), &m); err != nil {
		t.Fatal(err)
	}
	return &unstructured.Unstructured{Object: m}
}

// replaceSpec replaces a Rollout's spec with the manifest's (kubectl replace).
func replaceSpec(t *testing.T, ns, manifest string) *unstructured.Unstructured {
	t.Helper()
	want := parseManifest(t, manifest)
	rc := clients(t).Dynamic.Resource(v1.GroupVersionResource).Namespace(ns)
	cur, err := rc.Get(context.Background(), want.GetName(), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cur.Object["spec"] = want.Object["spec"]
	got, err := rc.Update(context.Background(), cur, metav1.UpdateOptions{FieldValidation: "Strict"})
	if err != nil {
		t.Fatalf("update %s: %v", want.GetName(), err)
	}
	return got
}

func getRollout(t *testing.T, ns, name string) *unstructured.Unstructured {
	t.Helper()
	obj, err := clients(t).Dynamic.Resource(v1.GroupVersionResource).Namespace(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return obj
}

// eventually polls cond every 50 ms until it holds, failing the test after 30 s with the
// last thing cond said.
func eventually(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	var last string
	err := wait.PollUntilContextTimeout(context.Background(), 50*time.Millisecond, 30*time.Second, true, func(context.Context) (bool, error) {
		ok, s := cond()
		last = s
		return ok, nil
	})
	if err != nil {
		t.Fatalf("%s: not reached: %s", what, last)
	}
}

// readyCondition is a Rollout's Ready condition (nil: none).
func readyCondition(obj *unstructured.Unstructured) *metav1.Condition {
	cs, _, _ := unstructured.NestedSlice(obj.Object, "status", "conditions")
	for _, c := range cs {
		m, _ := c.(map[string]any)
		if m["type"] != v1.ConditionReady {
			continue
		}
		gen, _, _ := unstructured.NestedInt64(m, "observedGeneration")
		return &metav1.Condition{Type: v1.ConditionReady, Status: metav1.ConditionStatus(fmt.Sprint(m["status"])),
			Reason: fmt.Sprint(m["reason"]), Message: fmt.Sprint(m["message"]), ObservedGeneration: gen}
	}
	return nil
}
