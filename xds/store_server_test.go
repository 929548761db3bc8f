package xds

import (
	"context"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/patchbay-io/patchbay/xds/rollout"
)

// TestCorruptStateFile: a torn state file neither crashes the control plane nor makes it
// start afresh: it serves nothing new, /readyz is 503, /status shows the error with both
// recoveries, it is logged once however often it is retried, and restoring <file>.prev
// (the previous good state every write keeps) recovers it by itself, rollback included.
func TestCorruptStateFile(t *testing.T) {
	dir := t.TempDir()
	eps := map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002"}
	writeFile(t, dir, "r.yaml", rolloutDoc("r", eps, "{v1: 90, v2: 10}", ""))
	stateFile := filepath.Join(t.TempDir(), "state.json")
	c := startCPWith(t, dir, func(cfg *Config) { cfg.StoreRetry = 30 * time.Millisecond })
	c.stop()
	c.stateFile = stateFile
	c.start()
	waitFor(t, 5*time.Second, "first config", func() bool { return c.srv.Version() != "" })
	writeFile(t, dir, "r.yaml", rolloutDoc("r", eps, "{v1: 50, v2: 50}", ""))
	waitFor(t, 5*time.Second, "50/50", func() bool { return c.srv.Status().Models[0].Traffic["v2"] == 50 })
	if _, code, err := c.srv.Rollback(context.Background(), "r", ""); code != 200 {
		t.Fatalf("rollback: %d %v", code, err)
	}
	good := c.srv.Version()
	goodState, _ := os.ReadFile(stateFile)
	c.stop()

	// A write cut short.
	if err := os.WriteFile(stateFile, goodState[:len(goodState)/2], 0o600); err != nil {
		t.Fatal(err)
	}
	logged := strings.Count(c.logs.String(), "state store unusable")
	c.start()
	ready := func() int {
		code, _ := httpDo(t, http.MethodGet, "http://"+c.adminAddr+"/readyz", "", "")
		return code
	}
	waitFor(t, 5*time.Second, "the error on /status", func() bool { return c.srv.Status().CurrentError != nil })
	// Let some ten retries (every 30ms) go by: still nothing served, one log line.
	time.Sleep(300 * time.Millisecond)
	st := c.srv.Status()
	if c.srv.Version() != "" || ready() != http.StatusServiceUnavailable || st.Ready {
		t.Fatalf("corrupt state: version %q, readyz %d, ready %v; want nothing served and 503", c.srv.Version(), ready(), st.Ready)
	}
	for _, want := range []string{"corrupt", stateFile, "mv " + stateFile + ".prev " + stateFile, "move the file away"} {
		if !strings.Contains(st.CurrentError.Message, want) {
			t.Errorf("current_error %q does not say %q", st.CurrentError.Message, want)
		}
	}
	if n := strings.Count(c.logs.String(), "state store unusable") - logged; n != 1 {
		t.Errorf("the corrupt state was logged %d times, want once", n)
	}
	if code, body := httpDo(t, http.MethodPost, "http://"+c.adminAddr+"/v1/models/r/rollback", testToken, ""); code != http.StatusServiceUnavailable {
		t.Errorf("rollback on a corrupt store: %d %s, want 503", code, body)
	}
	// Recovery: restore the previous good state (here: the state as it was).
	if err := os.WriteFile(stateFile, goodState, 0o600); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "recovery", func() bool { return c.srv.Version() != "" && ready() == http.StatusOK })
	st = c.srv.Status()
	if st.ConfigVersion != good || st.CurrentError != nil || st.Models[0].Rollback == nil || st.Models[0].Traffic["v2"] != 10 {
		t.Fatalf("after recovery: version %s (want %s), error %+v, model %+v: want the rolled-back 90/10", st.ConfigVersion, good, st.CurrentError, st.Models[0])
	}
}

// TestStateFilePrevIsTheRecovery: every write keeps the state it replaced as <file>.prev,
// and a control plane started on that .prev serves the previous state.
func TestStateFilePrevIsTheRecovery(t *testing.T) {
	dir := t.TempDir()
	eps := map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002"}
	writeFile(t, dir, "r.yaml", rolloutDoc("r", eps, "{v1: 90, v2: 10}", ""))
	stateFile := filepath.Join(t.TempDir(), "state.json")
	c := startCPWith(t, dir, func(cfg *Config) { cfg.StateFile = stateFile })
	waitFor(t, 5*time.Second, "first config", func() bool { return c.srv.Version() != "" })
	before, _ := os.ReadFile(stateFile)
	writeFile(t, dir, "r.yaml", rolloutDoc("r", eps, "{v1: 50, v2: 50}", ""))
	waitFor(t, 5*time.Second, "50/50", func() bool { return c.srv.Status().Models[0].Traffic["v2"] == 50 })
	prev, err := os.ReadFile(stateFile + ".prev")
	if err != nil || string(prev) != string(before) {
		t.Fatalf(".prev %q (%v), want the state before the last write %q", prev, err, before)
	}
	var doc struct {
		Version int                        `json:"version"`
		Models  map[string]json.RawMessage `json:"models"`
	}
	if err := json.Unmarshal(prev, &doc); err != nil || doc.Version != 2 || doc.Models["r"] == nil {
		t.Fatalf("state file format: %s (%v)", prev, err)
	}
}

// reportingSource is the files source with a ProblemReporter, recording what it is told.
type reportingSource struct {
	*dirSource
	mu      sync.Mutex
	reports []report
}

type report struct {
	problems map[string][]*rollout.Error
	version  string
}

func (r *reportingSource) Report(_ context.Context, problems map[string][]*rollout.Error, version string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.reports = append(r.reports, report{problems, version})
}

func (r *reportingSource) last() (report, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.reports) == 0 {
		return report{}, 0
	}
	return r.reports[len(r.reports)-1], len(r.reports)
}

// TestProblemReporter: after each reload a Source that reports problems is told each
// document's problems (keyed by its path, with field paths) and the config version served;
// a good reload reports none.
func TestProblemReporter(t *testing.T) {
	dir := t.TempDir()
	eps := map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002"}
	writeFile(t, dir, "a.yaml", rolloutDoc("a", eps, "{v1: 90, v2: 10}", ""))
	writeFile(t, dir, "b.yaml", rolloutDoc("b", eps, "{v1: 90, v2: 10}", ""))
	src := &reportingSource{dirSource: &dirSource{dir: dir, debounce: 5 * time.Millisecond, resync: time.Minute, settle: 10 * time.Millisecond}}
	c := startCPWith(t, dir, func(cfg *Config) { cfg.Source = src })
	waitFor(t, 5*time.Second, "first report", func() bool { r, n := src.last(); return n > 0 && r.version != "" })
	if r, _ := src.last(); len(r.problems) != 0 || r.version != c.srv.Version() {
		t.Fatalf("good reload reported %v, version %s (serving %s)", r.problems, r.version, c.srv.Version())
	}
	good := c.srv.Version()
	writeFile(t, dir, "b.yaml", rolloutDoc("b", eps, "{v1: 90, v2: 20}", ""))
	waitFor(t, 5*time.Second, "a problem reported", func() bool { r, _ := src.last(); return len(r.problems) > 0 })
	r, _ := src.last()
	path := filepath.Join(dir, "b.yaml")
	if len(r.problems) != 1 || len(r.problems[path]) != 1 || r.problems[path][0].Field != "traffic" || r.version != good {
		t.Fatalf("reported %v (version %s), want one problem in %s at field traffic and the last good version %s", r.problems, r.version, path, good)
	}
	writeFile(t, dir, "b.yaml", rolloutDoc("b", eps, "{v1: 80, v2: 20}", ""))
	waitFor(t, 5*time.Second, "problems cleared", func() bool { r, _ := src.last(); return len(r.problems) == 0 && r.version != good })
}
