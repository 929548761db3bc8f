package translate

import (
	"strings"
	"testing"

	"github.com/patchbay-io/patchbay/xds/rollout"
)

// TestBuildRefusesAPolicyExtprocWouldNACK: the ext_proc policy is checked in the same gate
// as the Envoy resources. An arm weight past uint32 (it slipped past the file rules here)
// became weight 0 in the policy: Envoy got its config while ext_proc NACKed. Now nothing is
// built.
func TestBuildRefusesAPolicyExtprocWouldNACK(t *testing.T) {
	for name, edit := range map[string]func(e *rollout.Experiment){
		"arm weight 2^32":           func(e *rollout.Experiment) { e.Arms[0].Weight = 1 << 32 },
		"arm of an unknown version": func(e *rollout.Experiment) { e.Arms[0].Version = "v99" },
	} {
		t.Run(name, func(t *testing.T) {
			in := loadInput(t, "testdata/split.yaml")
			edit(&in.Set.Rollouts[0].Experiments[0])
			b, err := Build(in, testOpts)
			if err == nil || b != nil || !strings.Contains(err.Error(), "ext_proc policy:") {
				t.Fatalf("Build: %v, %v; want the policy refused", b, err)
			}
		})
	}
}

// TestPausedAndTwoDecimalAllocations: allocation 0 gives an empty slot range (nobody is
// assigned) that the policy gate accepts; two-decimal allocations take exactly that many
// hundredths of the layer.
func TestPausedAndTwoDecimalAllocations(t *testing.T) {
	in := loadInput(t, "testdata/split.yaml")
	exps := in.Set.Rollouts[0].Experiments
	exps[0].Allocation = 0
	b, err := Build(in, testOpts)
	if err != nil {
		t.Fatalf("a paused experiment is refused: %v", err)
	}
	pe := b.Policy.GetModels()[0].GetExperiments()[0]
	if pe.GetSlotStart() != pe.GetSlotEnd() {
		t.Fatalf("paused experiment holds slots [%d, %d)", pe.GetSlotStart(), pe.GetSlotEnd())
	}
	for _, s := range []string{"0.07", "0.29", "1.1", "99.99"} {
		h, err := rollout.ParseHundredths(s)
		if err != nil {
			t.Fatal(err)
		}
		exps[0].Allocation = h
		b, err := Build(in, testOpts)
		if err != nil {
			t.Fatalf("allocation %s: %v", s, err)
		}
		pe := b.Policy.GetModels()[0].GetExperiments()[0]
		if got := pe.GetSlotEnd() - pe.GetSlotStart(); int64(got) != int64(h) {
			t.Fatalf("allocation %s holds %d slots, want %d", s, got, h)
		}
	}
}
