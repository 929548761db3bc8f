package store

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

func runs(pairs ...any) []Run {
	var out []Run
	for i := 0; i+1 < len(pairs); i += 2 {
		out = append(out, Run{Version: pairs[i].(string), Slots: pairs[i+1].(int)})
	}
	return out
}

func sample() ModelState {
	return ModelState{
		SpecFingerprint: "abc",
		Slots:           runs("v1", 80, "v2", 20),
		Rollback:        &Rollback{Traffic: map[string]int{"v1": 100}, Reason: "all traffic to v1", At: time.Unix(100, 0).UTC(), FromIndex: -1, SpecFingerprint: "abc"},
		History:         []map[string]int{{"v1": 100, "v2": 0}, {"v1": 80, "v2": 20}},
		ConfigVersion:   "0123",
	}
}

// TestFileRoundTripAndPrev: what Update writes Load reads back (version 2), each write keeps
// the state it replaced as <file>.prev, and no temp file is left behind.
func TestFileRoundTripAndPrev(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state.json")
	f := NewFile(path)
	ctx := context.Background()
	if st, err := f.Load(ctx); err != nil || len(st) != 0 {
		t.Fatalf("missing file: %v %v, want an empty state", st, err)
	}
	want := sample()
	if _, err := f.Update(ctx, "r", func(cur ModelState) (ModelState, error) { return want, nil }); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path + ".prev"); !os.IsNotExist(err) {
		t.Fatalf("first write made a .prev: %v", err)
	}
	first, _ := os.ReadFile(path)
	if !strings.Contains(string(first), `"version": 2`) {
		t.Fatalf("file %s lacks version 2", first)
	}
	got, err := f.Load(ctx)
	if err != nil || !reflect.DeepEqual(got["r"], want) {
		t.Fatalf("read back %+v %v, want %+v", got["r"], err, want)
	}
	if _, err := f.Update(ctx, "r", func(cur ModelState) (ModelState, error) {
		if !reflect.DeepEqual(cur, want) {
			t.Errorf("fn got %+v, want the stored state", cur)
		}
		cur.Rollback = nil
		return cur, nil
	}); err != nil {
		t.Fatal(err)
	}
	prev, _ := os.ReadFile(path + ".prev")
	if string(prev) != string(first) {
		t.Fatalf(".prev is not the state the write replaced:\n%s\nwant\n%s", prev, first)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 2 {
		t.Fatalf("directory holds %d entries, want state.json and state.json.prev: %v", len(entries), entries)
	}
	if _, err := f.Update(ctx, "r", func(ModelState) (ModelState, error) { return ModelState{}, errors.New("no") }); err == nil {
		t.Fatal("an fn error did not abort the update")
	}
}

// TestFileReadsTheFirstFormat: {"slots":{model:[100 names]}} comes back as runs, and the
// next write is version 2.
func TestFileReadsTheFirstFormat(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.json")
	names := make([]string, 100)
	for i := range names {
		names[i] = "v1"
		if i >= 80 && i < 95 {
			names[i] = "v2"
		}
	}
	b, _ := json.Marshal(map[string]any{"slots": map[string][]string{"ranker": names}})
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	f := NewFile(path)
	st, err := f.Load(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if want := runs("v1", 80, "v2", 15, "v1", 5); !reflect.DeepEqual(st["ranker"].Slots, want) {
		t.Fatalf("runs %v, want %v", st["ranker"].Slots, want)
	}
	if _, err := f.Update(context.Background(), "ranker", func(cur ModelState) (ModelState, error) { return cur, nil }); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(path); !strings.Contains(string(b), `"version": 2`) {
		t.Fatalf("rewritten file %s is not version 2", b)
	}
}

// TestFileCorrupt: a torn, empty or nonsensical file is an error wrapping ErrCorrupt that
// names the file and both ways to recover; Update refuses to overwrite it.
func TestFileCorrupt(t *testing.T) {
	good, _ := json.Marshal(fileState{Version: 2, Models: map[string]ModelState{"r": sample()}})
	for name, data := range map[string]string{
		"torn":          string(good[:len(good)/2]),
		"empty":         "",
		"future":        `{"version": 3, "models": {}}`,
		"bad slots":     `{"version": 2, "models": {"r": {"slots": [{"version": "v1", "slots": 60}]}}}`,
		"old short map": `{"slots": {"r": ["v1", "v2"]}}`,
		"trailing":      string(good) + "{",
	} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "state.json")
			if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
				t.Fatal(err)
			}
			f := NewFile(path)
			_, err := f.Load(context.Background())
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Load: %v, want ErrCorrupt", err)
			}
			for _, want := range []string{path, "mv " + path + ".prev " + path, "move the file away"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not say %q", err, want)
				}
			}
			if _, err := f.Update(context.Background(), "r", func(cur ModelState) (ModelState, error) { return cur, nil }); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Update over a corrupt file: %v, want ErrCorrupt", err)
			}
			if b, _ := os.ReadFile(path); string(b) != data {
				t.Fatal("Update rewrote a corrupt file")
			}
		})
	}
}

// TestMemoryCAS: concurrent Updates of one model are each applied exactly once (a lost
// compare-and-swap re-runs fn on the newer state; counted), and every Watch of the Memory
// hears of changes.
func TestMemoryCAS(t *testing.T) {
	m := NewMemory()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var heard [2]chan struct{}
	for i := range heard {
		heard[i] = make(chan struct{}, 1)
		ch := heard[i]
		go m.Watch(ctx, func() {
			select {
			case ch <- struct{}{}:
			default:
			}
		})
	}
	waitWatchers(t, m, 2)
	const writers, each = 4, 25
	var wg sync.WaitGroup
	for range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range each {
				_, err := m.Update(ctx, "r", func(cur ModelState) (ModelState, error) {
					time.Sleep(50 * time.Microsecond) // widen the window between read and swap
					cur.History = append(cur.History, map[string]int{"v1": 100})
					if len(cur.History) > 1 {
						cur.History = cur.History[1:]
					}
					n := 0
					if cur.ConfigVersion != "" {
						json.Unmarshal([]byte(cur.ConfigVersion), &n)
					}
					b, _ := json.Marshal(n + 1)
					cur.ConfigVersion = string(b)
					return cur, nil
				})
				if err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	st, _ := m.Load(ctx)
	if st["r"].ConfigVersion != "100" {
		t.Fatalf("counter %s after %d updates: an update was lost", st["r"].ConfigVersion, writers*each)
	}
	t.Logf("%d lost compare-and-swaps re-ran fn", m.Conflicts())
	for i, ch := range heard {
		select {
		case <-ch:
		case <-time.After(5 * time.Second):
			t.Fatalf("watcher %d heard nothing", i)
		}
	}
	// A forced concurrent write in the window: fn runs again on the newer state.
	before := m.Conflicts()
	once := sync.Once{}
	m.SetBeforeCommit(func(string) {
		once.Do(func() {
			m.SetBeforeCommit(nil)
			if _, err := m.Update(ctx, "r", func(cur ModelState) (ModelState, error) { cur.SpecFingerprint = "other"; return cur, nil }); err != nil {
				t.Error(err)
			}
		})
	})
	calls := 0
	got, err := m.Update(ctx, "r", func(cur ModelState) (ModelState, error) {
		calls++
		cur.ConfigVersion = cur.SpecFingerprint + "-seen"
		return cur, nil
	})
	if err != nil || calls != 2 || got.ConfigVersion != "other-seen" || m.Conflicts() != before+1 {
		t.Fatalf("forced conflict: %+v %v, fn called %d times, conflicts %d (was %d)", got, err, calls, m.Conflicts(), before)
	}
	// Load returns copies: changing them changes nothing stored.
	st, _ = m.Load(ctx)
	st["r"].History[0]["v1"] = 7
	if again, _ := m.Load(ctx); again["r"].History[0]["v1"] != 100 {
		t.Fatal("Load shares memory with the store")
	}
}

func waitWatchers(t *testing.T, m *Memory, n int) {
	t.Helper()
	for range 500 {
		m.mu.Lock()
		k := len(m.watchers)
		m.mu.Unlock()
		if k == n {
			return
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("watchers did not register")
}

// TestMemoryConflictExhausted: a writer that always loses gets ErrConflict, not a hang.
func TestMemoryConflictExhausted(t *testing.T) {
	m := NewMemory()
	ctx := context.Background()
	m.SetBeforeCommit(func(model string) {
		m.mu.Lock()
		m.revs[model]++
		m.mu.Unlock()
	})
	if _, err := m.Update(ctx, "r", func(cur ModelState) (ModelState, error) { return cur, nil }); !errors.Is(err, ErrConflict) {
		t.Fatalf("got %v, want ErrConflict", err)
	}
}

// FuzzParseFile: ParseFile never panics; what it accepts passes Check, and writing it back
// as version 2 parses to the same state.
func FuzzParseFile(f *testing.F) {
	good, _ := json.Marshal(fileState{Version: 2, Models: map[string]ModelState{"r": sample()}})
	f.Add(good)
	withAnalysis := sample()
	withAnalysis.Analysis = &AnalysisState{SpecFingerprint: "abc", Step: 1, Phase: PhaseRunning, StepStarted: time.Unix(5, 0).UTC(),
		LastDecision: &Decision{Decision: "advance", Gates: []Gate{{Metric: "error-rate", Value: 0.001, Threshold: 0.01, Pass: true}}}}
	good, _ = json.Marshal(fileState{Version: 2, Models: map[string]ModelState{"r": withAnalysis}})
	f.Add(good)
	f.Add([]byte(`{"slots":{"r":["v1"]}}`))
	f.Add([]byte(`{"version":2,"models":{}}`))
	f.Add([]byte(``))
	f.Fuzz(func(t *testing.T, b []byte) {
		st, err := ParseFile(b)
		if err != nil {
			return
		}
		for m, s := range st {
			if err := s.Check(); err != nil {
				t.Fatalf("accepted %s with %v", m, err)
			}
		}
		out, err := json.Marshal(fileState{Version: 2, Models: st})
		if err != nil {
			t.Fatal(err)
		}
		again, err := ParseFile(out)
		if err != nil {
			t.Fatalf("written back: %v\n%s", err, out)
		}
		a, _ := json.Marshal(st)
		b2, _ := json.Marshal(again)
		if string(a) != string(b2) {
			t.Fatalf("round trip changed the state:\n%s\n%s", a, b2)
		}
	})
}

// TestFileAnalysisStateRoundTripAndOldFiles: an analysis state written by Update is read
// back whole; a version-2 file written before the field existed loads with no analysis;
// Clone shares nothing of it; a bad phase is refused as corrupt.
func TestFileAnalysisStateRoundTripAndOldFiles(t *testing.T) {
	dir := t.TempDir()
	old := filepath.Join(dir, "old.json")
	if err := os.WriteFile(old, []byte(`{"version":2,"models":{"m":{"specFingerprint":"abc","slots":[{"version":"v1","slots":100}]}}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	got, err := NewFile(old).Load(context.Background())
	if err != nil || got["m"].Analysis != nil || got["m"].SpecFingerprint != "abc" {
		t.Fatalf("old file: %+v %v", got, err)
	}
	st := sample()
	st.Analysis = &AnalysisState{SpecFingerprint: "abc", Step: 2, StepStarted: time.Unix(200, 0).UTC(), Phase: PhaseWaiting, Reason: "minRequests",
		LastDecision: &Decision{At: time.Unix(210, 0).UTC(), Step: 2, Decision: "wait", Gates: []Gate{{Metric: "error-rate", Value: 0.01, Threshold: 0.02, Pass: true}}}}
	path := filepath.Join(dir, "state.json")
	if _, err := NewFile(path).Update(context.Background(), "m", func(ModelState) (ModelState, error) { return st, nil }); err != nil {
		t.Fatal(err)
	}
	back, err := NewFile(path).Load(context.Background())
	if err != nil || !reflect.DeepEqual(back["m"], st) {
		t.Fatalf("round trip:\n got %+v\nwant %+v (%v)", back["m"].Analysis, st.Analysis, err)
	}
	c := st.Clone()
	c.Analysis.LastDecision.Gates[0].Pass = false
	c.Analysis.Step = 3
	if !st.Analysis.LastDecision.Gates[0].Pass || st.Analysis.Step != 2 {
		t.Fatal("Clone shares the analysis state")
	}
	bad := filepath.Join(dir, "bad.json")
	os.WriteFile(bad, []byte(`{"version":2,"models":{"m":{"analysis":{"specFingerprint":"x","step":0,"phase":"sideways"}}}}`), 0o644)
	if _, err := NewFile(bad).Load(context.Background()); err == nil || !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "analysis.phase") {
		t.Fatalf("bad phase: %v", err)
	}
}
