package translate

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/xds/rollout"
)

// TestNoHealthyBaselineServesTheSplitUnchanged: when every version with a baseline share is
// unhealthy, the split is not handed to a version that only serves an experiment arm (a
// canary would become the whole model on the control plane's view of the network alone).
func TestNoHealthyBaselineServesTheSplitUnchanged(t *testing.T) {
	dir := t.TempDir()
	doc := `apiVersion: patchbay.io/v1
kind: Rollout
model: ranker
versions:
  - {name: v7, endpoints: ["127.0.0.1:9001"]}
  - {name: v9, endpoints: ["127.0.0.1:9003"]}
traffic: {v7: 100}
experiments:
  - name: canary
    layer: l
    allocation: 1
    arms: [{name: c, version: v9, weight: 1}]
`
	if err := os.WriteFile(filepath.Join(dir, "ranker.yaml"), []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	set, err := rollout.LoadFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	r := set.Rollouts[0]
	in := &Input{Set: set}
	base := in.ServingSlots(r)
	in.Unhealthy = map[string]map[string]bool{"ranker": {"v7": true}}
	got := in.ServingSlots(r)
	for i := range base {
		if got[i] != base[i] {
			t.Fatalf("slot %d: %s while v7 (the only baseline version) is unhealthy, want %s unchanged", i, got[i], base[i])
		}
	}
}

// TestGRPCHealthServicePerHostKind: a patchbay host is checked on the version's own name;
// an unmodified OIP server, which knows no patchbay names (it would answer NOT_FOUND and
// be taken for unhealthy), on its overall health "".
func TestGRPCHealthServicePerHostKind(t *testing.T) {
	if got, want := GRPCHealthService("ranker", rollout.Version{Name: "v7"}), oip.HealthService("ranker", "v7"); got != want {
		t.Errorf("patchbay host: %q, want %q", got, want)
	}
	if got := GRPCHealthService("ranker", rollout.Version{Name: "v7", Host: rollout.HostOIP}); got != "" {
		t.Errorf("oip host: %q, want the overall health service \"\"", got)
	}
}

// TestArmOnUnhealthyVersionPausesItsExperiment: while an arm's version is unhealthy its
// experiment assigns nobody (so nobody is reported exposed to an arm that is not serving),
// and the other experiments of the layer keep their slot ranges.
func TestArmOnUnhealthyVersionPausesItsExperiment(t *testing.T) {
	dir := t.TempDir()
	doc := `apiVersion: patchbay.io/v1
kind: Rollout
model: ranker
versions:
  - {name: v7, endpoints: ["127.0.0.1:9001"]}
  - {name: v8, endpoints: ["127.0.0.1:9002"]}
  - {name: v9, endpoints: ["127.0.0.1:9003"]}
traffic: {v7: 90, v8: 10}
experiments:
  - {name: first, layer: l, allocation: 10, arms: [{name: a, version: v9, weight: 1}, {name: b, version: v7, weight: 1}]}
  - {name: second, layer: l, allocation: 20, arms: [{name: a, version: v8, weight: 1}]}
`
	if err := os.WriteFile(filepath.Join(dir, "ranker.yaml"), []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	set, err := rollout.LoadFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	in := &Input{Set: set}
	healthy := Policy(in, "x").GetModels()[0].GetExperiments()
	in.Unhealthy = map[string]map[string]bool{"ranker": {"v9": true}}
	sick := Policy(in, "x").GetModels()[0].GetExperiments()
	if f := sick[0]; f.GetSlotStart() != f.GetSlotEnd() {
		t.Errorf("first (arm on unhealthy v9): slots [%d, %d), want an empty range", f.GetSlotStart(), f.GetSlotEnd())
	}
	if h, s := healthy[1], sick[1]; h.GetSlotStart() != s.GetSlotStart() || h.GetSlotEnd() != s.GetSlotEnd() || s.GetSlotStart() == s.GetSlotEnd() {
		t.Errorf("second: slots [%d, %d) while v9 is unhealthy, want its own [%d, %d)", s.GetSlotStart(), s.GetSlotEnd(), h.GetSlotStart(), h.GetSlotEnd())
	}
	if f := healthy[0]; f.GetSlotStart() == f.GetSlotEnd() {
		t.Error("first is empty while every version is healthy")
	}
}
