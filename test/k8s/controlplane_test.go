package k8s

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	v1 "github.com/patchbay-io/patchbay/api/k8s/v1"
	"github.com/patchbay-io/patchbay/xds"
	"github.com/patchbay-io/patchbay/xds/kube"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// runReplica runs a control plane (xds.Server) in Kubernetes mode on the namespace's
// Rollouts: kube.Source for rollouts, kube.Store for state, ADS and admin on loopback.
func runReplica(t *testing.T, ns string) *xds.Server {
	t.Helper()
	cfg := kubeConfig(t, ns)
	srv, err := xds.New(xds.Config{Source: kube.NewSource(cfg), Store: kube.NewStore(cfg), Logger: cfg.Logger,
		Translate: translate.Options{EdgeAddress: "127.0.0.1:10000", SidecarAddress: "127.0.0.1:15001"}})
	if err != nil {
		t.Fatal(err)
	}
	grpcLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	adminLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := srv.Run(ctx, grpcLis, adminLis); err != nil && ctx.Err() == nil {
			t.Errorf("replica: %v", err)
		}
	}()
	t.Cleanup(func() { cancel(); wg.Wait() })
	return srv
}

func served(srv *xds.Server, model string) (*xds.ModelStatus, string) {
	st := srv.Status()
	for i := range st.Models {
		if st.Models[i].Name == model {
			return &st.Models[i], fmt.Sprintf("version %s, error %v", st.ConfigVersion, st.CurrentError)
		}
	}
	return nil, fmt.Sprintf("version %s, no %s; error %v", st.ConfigVersion, model, st.CurrentError)
}

// TestReplicasOnRollouts: two control-plane replicas in Kubernetes mode. A Rollout applied
// from kubectl YAML is served by both with the same slot map, which the Rollout's status
// holds (Ready=True Applied, split, state Serving); a rollback taken through one replica is
// served by the other and shows in status (RolledBack); an invalid edit then changes
// nothing either replica serves and puts Ready=False with the field path in status.
func TestReplicasOnRollouts(t *testing.T) {
	ns := namespace(t)
	apply(t, ns, rankerManifest)
	a, b := runReplica(t, ns), runReplica(t, ns)

	eventually(t, "both replicas serve ranker, status Applied", func() (bool, string) {
		ma, sa := served(a, "ranker")
		mb, sb := served(b, "ranker")
		obj := getRollout(t, ns, "ranker")
		c := readyCondition(obj)
		slots, _, _ := unstructured.NestedSlice(obj.Object, "status", "slots")
		split, _, _ := unstructured.NestedString(obj.Object, "status", "split")
		ok := ma != nil && mb != nil && c != nil && c.Status == metav1.ConditionTrue && c.Reason == v1.ReasonApplied &&
			len(slots) > 0 && split == "v7=90,v8=10"
		return ok, sa + "; " + sb + "; " + spew(obj)
	})
	ma, _ := served(a, "ranker")
	mb, _ := served(b, "ranker")
	if d := cmp.Diff(ma.SlotRuns, mb.SlotRuns); d != "" {
		t.Errorf("replicas disagree on the slot map (-a +b):\n%s", d)
	}
	if d := cmp.Diff(map[string]int{"v7": 90, "v8": 10}, ma.Traffic); d != "" {
		t.Errorf("served traffic (-want +got):\n%s", d)
	}

	if _, code, err := a.Rollback(context.Background(), "ranker", "v7"); err != nil {
		t.Fatalf("rollback through replica a: %d %v", code, err)
	}
	eventually(t, "replica b serves the rollback, status RolledBack", func() (bool, string) {
		mb, sb := served(b, "ranker")
		obj := getRollout(t, ns, "ranker")
		c := readyCondition(obj)
		state, _, _ := unstructured.NestedString(obj.Object, "status", "state")
		split, _, _ := unstructured.NestedString(obj.Object, "status", "split")
		ok := mb != nil && mb.Rollback != nil && mb.Traffic["v7"] == 100 && c != nil && c.Reason == v1.ReasonRolledBack &&
			state == v1.StateRolledBack && split == "v7=100"
		return ok, fmt.Sprintf("%s %+v; %s", sb, mb, spew(obj))
	})

	before, _ := served(b, "ranker")
	replaceSpec(t, ns, strings.Replace(rankerManifest, "    v8: 10\n", "    v9: 10\n", 1))
	eventually(t, "Ready=False Invalid with the field path", func() (bool, string) {
		obj := getRollout(t, ns, "ranker")
		c := readyCondition(obj)
		return c != nil && c.Status == metav1.ConditionFalse && c.Reason == v1.ReasonInvalid &&
			strings.Contains(c.Message, "spec.traffic.v9") && c.ObservedGeneration == 2, spew(obj)
	})
	for name, srv := range map[string]*xds.Server{"a": a, "b": b} {
		m, s := served(srv, "ranker")
		if m == nil {
			t.Fatalf("replica %s stopped serving ranker: %s", name, s)
		}
		if d := cmp.Diff(before.Traffic, m.Traffic); d != "" {
			t.Errorf("replica %s: an invalid Rollout changed what is served (-before +after):\n%s", name, d)
		}
		if d := cmp.Diff(before.SlotRuns, m.SlotRuns); d != "" {
			t.Errorf("replica %s: an invalid Rollout changed the slot map (-before +after):\n%s", name, d)
		}
	}
}
