package xds

import (
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

// TestSlotMapsSurviveRestart: with a state file, a restarted control plane keeps the
// evolved slot layout instead of laying the split out afresh.
func TestSlotMapsSurviveRestart(t *testing.T) {
	dir := t.TempDir()
	eps := map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002"}
	c := startCP(t, dir)
	c.stop()
	c.stateFile = filepath.Join(t.TempDir(), "state.json")
	c.start()
	runs := func() any { return c.srv.Status().Models[0].SlotRuns }
	for _, traffic := range []string{"{v1: 80, v2: 20}", "{v1: 95, v2: 5}"} {
		writeFile(t, dir, "r.yaml", rolloutDoc("r", eps, traffic, ""))
		want := traffic
		waitFor(t, 5*time.Second, "traffic "+want, func() bool {
			st := c.srv.Status()
			return len(st.Models) == 1 && st.Models[0].Traffic["v2"] == map[string]int{"{v1: 80, v2: 20}": 20, "{v1: 95, v2: 5}": 5}[want]
		})
	}
	before := runs()
	// 80/20 then 95/5 leaves v1, v2, v1 runs: not the fresh layout.
	if got := c.srv.Status().Models[0].SlotRuns; len(got) != 3 {
		t.Fatalf("evolved runs %v, want three runs", got)
	}
	c.stop()
	c.start()
	if after := runs(); !reflect.DeepEqual(before, after) {
		t.Fatalf("slot runs changed across restart: %v -> %v", before, after)
	}
}
