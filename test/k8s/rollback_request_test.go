package k8s

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"

	v1 "github.com/patchbay-io/patchbay/api/k8s/v1"
	"github.com/patchbay-io/patchbay/xds/kube"
	"github.com/patchbay-io/patchbay/xds/store"
)

// annotate merge-patches the rollback request annotation, as `patchbay rollout rollback
// --kubeconfig` does.
func annotate(t *testing.T, ns, name, value string) {
	t.Helper()
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{v1.RollbackRequestAnnotation: value}}})
	if _, err := clients(t).Dynamic.Resource(v1.GroupVersionResource).Namespace(ns).Patch(context.Background(), name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
}

func condition(obj *unstructured.Unstructured, typ string) map[string]any {
	cs, _, _ := unstructured.NestedSlice(obj.Object, "status", "conditions")
	for _, c := range cs {
		if m, _ := c.(map[string]any); m["type"] == typ {
			return m
		}
	}
	return nil
}

// TestRollbackRequestExecutedAndAcknowledged: two control-plane replicas watch one
// namespace; a rollback request annotated on a Rollout is executed (through each
// replica's Store, idempotent per request id, so it takes effect once however many
// replicas run it), acknowledged in status.lastRollbackRequest with a RollbackRequest
// condition, and a malformed request is acknowledged with the condition False.
func TestRollbackRequestExecutedAndAcknowledged(t *testing.T) {
	ns := namespace(t)
	apply(t, ns, rankerManifest)
	var (
		mu       sync.Mutex
		executed []string // request ids, per execution
		written  int      // executions that changed the stored state
	)
	for range 2 {
		cfg := kubeConfig(t, ns)
		src, st := kube.NewSource(cfg), kube.NewStore(cfg)
		src.OnRollbackRequest(func(ctx context.Context, model, id string, req v1.RollbackRequest) error {
			changed := false
			_, err := st.Update(ctx, model, func(cur store.ModelState) (store.ModelState, error) {
				changed = false
				if cur.Rollback != nil && cur.Rollback.Reason == id {
					return cur, nil // this request is in force already
				}
				changed = true
				cur.Rollback = &store.Rollback{Traffic: map[string]int{req.Version: 100}, Reason: id, At: time.Now().UTC(), FromIndex: -1}
				return cur, nil
			})
			mu.Lock()
			executed = append(executed, id)
			if changed && err == nil {
				written++
			}
			mu.Unlock()
			return err
		})
		watching(t, src)
	}

	req := `{"version":"v7","at":"2026-11-30T12:00:00Z","by":"alice"}`
	annotate(t, ns, "ranker", req)
	eventually(t, "request acknowledged", func() (bool, string) {
		obj := getRollout(t, ns, "ranker")
		done, _, _ := unstructured.NestedString(obj.Object, "status", "lastRollbackRequest")
		reason, _, _ := unstructured.NestedString(obj.Object, "status", "rollback", "reason")
		c := condition(obj, v1.ConditionRollbackRequest)
		return done == req && reason == req && c != nil && c["status"] == "True" && c["reason"] == v1.ReasonExecuted &&
			strings.Contains(c["message"].(string), "all traffic to v7"), spew(obj)
	})
	mu.Lock()
	t.Logf("request executed %d times by 2 replicas, state written %d time(s)", len(executed), written)
	if written != 1 {
		t.Errorf("the rollback was written %d times, want 1", written)
	}
	mu.Unlock()

	annotate(t, ns, "ranker", "not json")
	eventually(t, "malformed request acknowledged as failed", func() (bool, string) {
		obj := getRollout(t, ns, "ranker")
		done, _, _ := unstructured.NestedString(obj.Object, "status", "lastRollbackRequest")
		c := condition(obj, v1.ConditionRollbackRequest)
		return done == "not json" && c != nil && c["status"] == "False" && c["reason"] == v1.ReasonFailed, spew(obj)
	})
}
