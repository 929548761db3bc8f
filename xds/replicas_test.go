package xds

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"path/filepath"
	"reflect"
	"sort"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/patchbay-io/patchbay/xds/store"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// TestRollbackSurvivesRestart: a rollback, its history and the slot map are in the state
// file: a control plane restarted on it serves the rolled-back split with the same config
// version and slot map, and a second rollback goes one step further back. (Before, the
// rollback and its history lived in memory only: the restarted plane served 50/50 again
// and answered a second rollback with the first one's target.)
func TestRollbackSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	eps := map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002"}
	stateFile := filepath.Join(t.TempDir(), "state.json")
	writeFile(t, dir, "r.yaml", rolloutDoc("r", eps, "{v1: 100, v2: 0}", ""))
	a := startCPWith(t, dir, func(cfg *Config) { cfg.StateFile = stateFile })
	waitFor(t, 5*time.Second, "first config", func() bool { return a.srv.Version() != "" })
	for _, traffic := range []string{"{v1: 90, v2: 10}", "{v1: 50, v2: 50}"} {
		before := a.srv.Version()
		writeFile(t, dir, "r.yaml", rolloutDoc("r", eps, traffic, ""))
		waitFor(t, 5*time.Second, traffic, func() bool { return a.srv.Version() != before })
	}
	res, code, err := a.srv.Rollback(context.Background(), "r", "")
	if err != nil || code != 200 || res.Traffic["v2"] != 10 {
		t.Fatalf("rollback: %+v %d %v, want 90/10", res, code, err)
	}
	want := a.srv.Status()
	a.stop()

	b := startCPWith(t, dir, func(cfg *Config) { cfg.StateFile = stateFile })
	waitFor(t, 5*time.Second, "restarted config", func() bool { return b.srv.Version() != "" })
	got := b.srv.Status()
	if got.ConfigVersion != want.ConfigVersion || !reflect.DeepEqual(got.Models[0].SlotRuns, want.Models[0].SlotRuns) ||
		got.Models[0].Rollback == nil || got.Models[0].Traffic["v2"] != 10 {
		t.Fatalf("after restart: version %s runs %v rollback %v traffic %v; want version %s runs %v and the 90/10 rollback",
			got.ConfigVersion, got.Models[0].SlotRuns, got.Models[0].Rollback, got.Models[0].Traffic, want.ConfigVersion, want.Models[0].SlotRuns)
	}
	res, code, err = b.srv.Rollback(context.Background(), "r", "")
	if err != nil || code != 200 || res.Traffic["v1"] != 100 {
		t.Fatalf("second rollback after restart: %+v %d %v, want one step further back (100/0)", res, code, err)
	}
	// A spec change releases the rollback, in the state file too.
	before := b.srv.Version()
	writeFile(t, dir, "r.yaml", rolloutDoc("r", eps, "{v1: 60, v2: 40}", ""))
	waitFor(t, 5*time.Second, "60/40", func() bool { return b.srv.Version() != before })
	stored, err := store.NewFile(stateFile).Load(context.Background())
	if err != nil || stored["r"].Rollback != nil || b.srv.Status().Models[0].Rollback != nil {
		t.Fatalf("after a spec change the rollback is still in force or stored: %+v %v", stored["r"], err)
	}
}

// TestLaggingReplicaDoesNotWriteBack: a replica whose source has not seen an edit yet
// (a ConfigMap mount or informer cache behind) hears of the state another replica wrote for
// the new spec and does not write its older spec back over it; once its source catches up
// it serves the stored state exactly.
func TestLaggingReplicaDoesNotWriteBack(t *testing.T) {
	eps := map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002", "v3": "127.0.0.1:9003"}
	doc, _ := rampDoc(eps, 10)
	rs := startReplicas(t, 2, doc)
	a, b := rs.cps[0], rs.cps[1]
	doc, _ = rampDoc(eps, 60)
	writeFile(t, a.dir, "r.yaml", doc)
	waitFor(t, 5*time.Second, "a on 60", func() bool { return rs.view(a).traffic["v3"] == 60 })
	want, _ := rs.mem.Load(context.Background())
	// b, still on the old file, reloads its source and the state, twice over.
	for range 2 {
		b.srv.Reload(context.Background(), "test: lagging source")
		b.srv.reloadState(context.Background(), "test: state changed")
	}
	got, _ := rs.mem.Load(context.Background())
	if got["r"].SpecFingerprint != want["r"].SpecFingerprint || !reflect.DeepEqual(got["r"].Slots, want["r"].Slots) {
		t.Fatalf("the lagging replica wrote its older spec back: stored %+v, want %+v", got["r"], want["r"])
	}
	if v := rs.view(b); v.traffic["v3"] != 10 {
		t.Fatalf("the lagging replica serves %+v, want its own (older) spec until its source catches up", v)
	}
	writeFile(t, b.dir, "r.yaml", doc)
	if v := rs.settled("b caught up", v3At(60)); !reflect.DeepEqual(v.runs, toSlotMap(want["r"].Slots).Runs()) {
		t.Fatalf("after catching up replicas serve %v, want the stored %v", v.runs, want["r"].Slots)
	}
}

// replicaSet is several control planes sharing one store.Memory, each with its own rollout
// directory (so their sources can lag each other, as ConfigMap mounts or informer caches do).
type replicaSet struct {
	t   *testing.T
	mem *store.Memory
	cps []*cp
}

func startReplicas(t *testing.T, n int, doc string) *replicaSet {
	rs := &replicaSet{t: t, mem: store.NewMemory()}
	for range n {
		dir := t.TempDir()
		writeFile(t, dir, "r.yaml", doc)
		rs.cps = append(rs.cps, startCPWith(t, dir, func(cfg *Config) {
			cfg.Store = rs.mem
			cfg.Settle = 10 * time.Millisecond
		}))
	}
	rs.settled("start")
	return rs
}

// view is what a replica serves of model r.
type view struct {
	version string
	runs    []translate.Run
	traffic map[string]int
	rolled  bool
}

func (rs *replicaSet) view(c *cp) view {
	st := c.srv.Status()
	if len(st.Models) == 0 {
		return view{version: st.ConfigVersion}
	}
	return view{st.ConfigVersion, st.Models[0].SlotRuns, st.Models[0].Traffic, st.Models[0].Rollback != nil}
}

// settled waits (bounded) until every running replica serves the same version and ok
// holds for it (nil: any), and returns it.
func (rs *replicaSet) settled(what string, ok ...func(view) bool) view {
	rs.t.Helper()
	var v view
	waitFor(rs.t, 10*time.Second, "replicas agree: "+what, func() bool {
		v = rs.view(rs.firstRunning())
		if v.version == "" {
			return false
		}
		for _, f := range ok {
			if !f(v) {
				return false
			}
		}
		for _, c := range rs.cps[1:] {
			if c.cancel == nil {
				continue
			}
			if w := rs.view(c); !reflect.DeepEqual(w, v) {
				return false
			}
		}
		return true
	})
	return v
}

func (rs *replicaSet) firstRunning() *cp {
	for _, c := range rs.cps {
		if c.cancel != nil {
			return c
		}
	}
	rs.t.Fatal("no replica running")
	return nil
}

func v3At(n int) func(view) bool {
	return func(v view) bool { return !v.rolled && v.traffic["v3"] == n }
}

func rampDoc(eps map[string]string, v3 int) (string, map[string]int) {
	v1 := (100 - v3) / 2
	v2 := 100 - v3 - v1
	traffic := map[string]int{"v1": v1, "v2": v2, "v3": v3}
	return rolloutDoc("r", eps, fmt.Sprintf("{v1: %d, v2: %d, v3: %d}", v1, v2, v3), ""), traffic
}

// TestReplicasAgree: two and three control planes sharing one store (store.Memory stands
// for the Kubernetes API) through a monotone ramp of v3 from 10 to 100, each step reaching
// the replicas' sources in a different random order with reloads interleaving, serve
// identical slot maps at every step — the one lineage a single control plane would lay out
// — and identical config versions once settled. A rollback through one replica is served
// by all, a grpc-go xDS client of another follows it, and so does a release.
func TestReplicasAgree(t *testing.T) {
	b1, b2, b3 := startBackend(t, "v1"), startBackend(t, "v2"), startBackend(t, "v3")
	eps := map[string]string{"v1": b1.addr, "v2": b2.addr, "v3": b3.addr}
	for _, n := range []int{2, 3} {
		t.Run(fmt.Sprintf("%d replicas", n), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(n), 12))
			doc, traffic := rampDoc(eps, 0)
			rs := startReplicas(t, n, doc)
			lineage := translate.NextSlotMap(nil, []string{"v1", "v2", "v3"}, traffic)
			for v3 := 10; v3 <= 100; v3 += 10 {
				doc, traffic = rampDoc(eps, v3)
				lineage = translate.NextSlotMap(lineage, []string{"v1", "v2", "v3"}, traffic)
				order := rng.Perm(n)
				for _, i := range order {
					writeFile(t, rs.cps[i].dir, "r.yaml", doc)
					time.Sleep(time.Duration(rng.IntN(15)) * time.Millisecond)
				}
				v := rs.settled(fmt.Sprintf("v3 at %d", v3), v3At(v3))
				if !reflect.DeepEqual(v.runs, lineage.Runs()) || v.traffic["v3"] != v3 {
					t.Fatalf("v3 at %d (order %v): replicas serve runs %v, want the single lineage %v", v3, order, v.runs, lineage.Runs())
				}
			}
			// Back to a split for the rollback part.
			doc, _ = rampDoc(eps, 30)
			for _, c := range rs.cps {
				writeFile(t, c.dir, "r.yaml", doc)
			}
			rs.settled("v3 at 30", v3At(30))
			client := xdsClient(t, rs.cps[n-1], "r")
			res, code, err := rs.cps[0].srv.Rollback(context.Background(), "r", "v1")
			if err != nil || code != 200 {
				t.Fatalf("rollback through replica 0: %d %v", code, err)
			}
			v := rs.settled("rollback", func(v view) bool { return v.rolled })
			if !v.rolled || v.version != res.Version || v.traffic["v1"] != 100 {
				t.Fatalf("replicas after the rollback: %+v, want the rollback (version %s)", v, res.Version)
			}
			allGoTo(t, client, "v1")
			// The caller's own pin on a rolled-back version is refused (closeDoors).
			waitFor(t, 5*time.Second, "a pin on v3 refused", func() bool {
				_, err := call(context.Background(), client, "x-patchbay-version", "v3")
				return status.Code(err) == codes.FailedPrecondition
			})
			if code, body := httpDo(t, http.MethodDelete, "http://"+rs.cps[n-1].adminAddr+"/v1/models/r/rollback", testToken, ""); code != 200 {
				t.Fatalf("release through replica %d: %d %s", n-1, code, body)
			}
			if v := rs.settled("release", func(v view) bool { return !v.rolled }); v.rolled || v.traffic["v3"] != 30 {
				t.Fatalf("replicas after the release: %+v", v)
			}
			allGoTo(t, client, "v3", "x-patchbay-version", "v3")
		})
	}
}

// TestReplicaStoppedMidEdit: a replica stopped while an edit is on its way loses nothing:
// the others apply it, and, started again on the same store, it serves exactly what they
// serve (slot map, rollback, version) and can take the next rollback.
func TestReplicaStoppedMidEdit(t *testing.T) {
	eps := map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002", "v3": "127.0.0.1:9003"}
	doc, _ := rampDoc(eps, 10)
	rs := startReplicas(t, 3, doc)
	doc, _ = rampDoc(eps, 40)
	for _, c := range rs.cps {
		writeFile(t, c.dir, "r.yaml", doc)
	}
	rs.cps[1].stop() // mid-edit: its reload of the new file may or may not have run
	rs.settled("40 without replica 1", v3At(40))
	if _, code, err := rs.cps[2].srv.Rollback(context.Background(), "r", ""); code != 200 {
		t.Fatalf("rollback: %d %v", code, err)
	}
	want := rs.settled("rollback without replica 1", func(v view) bool { return v.rolled })
	rs.cps[1].start()
	if got := rs.settled("replica 1 back"); !reflect.DeepEqual(got, want) || !got.rolled {
		t.Fatalf("replica 1 after restart serves %+v, want %+v", got, want)
	}
	rs.cps[0].stop()
	if _, code, err := rs.cps[1].srv.Rollback(context.Background(), "r", "v2"); code != 200 {
		t.Fatalf("rollback through the restarted replica: %d %v", code, err)
	}
	rs.cps[0].start()
	if v := rs.settled("after replica 0 restarts", func(v view) bool { return v.traffic["v2"] == 100 }); v.traffic["v2"] != 100 {
		t.Fatalf("replicas serve %+v, want all on v2", v)
	}
}

// TestReplicaConflictRetried: two replicas write the same model at once; the one that
// loses the compare-and-swap re-runs its rule on the winner's state and keeps it, so both
// serve one slot map (the conflict is counted). Then it measures how long after a write
// through one replica the others serve the same version (logged, not a pass/fail timing).
func TestReplicaConflictRetried(t *testing.T) {
	eps := map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002", "v3": "127.0.0.1:9003"}
	doc, _ := rampDoc(eps, 10)
	rs := startReplicas(t, 3, doc)
	a, b := rs.cps[0], rs.cps[1]
	doc, traffic := rampDoc(eps, 50)
	var once sync.Once
	forced := make(chan struct{})
	rs.mem.SetBeforeCommit(func(string) {
		once.Do(func() {
			rs.mem.SetBeforeCommit(nil)
			// b applies the same edit between a's read of the store and a's swap.
			writeFile(t, b.dir, "r.yaml", doc)
			b.srv.Reload(context.Background(), "test: concurrent writer")
			close(forced)
		})
	})
	before := rs.mem.Conflicts()
	writeFile(t, a.dir, "r.yaml", doc)
	select {
	case <-forced:
	case <-time.After(10 * time.Second):
		t.Fatal("no write reached the store")
	}
	writeFile(t, rs.cps[2].dir, "r.yaml", doc)
	v := rs.settled("after the conflict", v3At(50))
	if rs.mem.Conflicts() <= before {
		t.Fatalf("no conflict was counted (%d before, %d after)", before, rs.mem.Conflicts())
	}
	want := translate.NextSlotMap(translate.NextSlotMap(nil, []string{"v1", "v2", "v3"}, map[string]int{"v1": 45, "v2": 45, "v3": 10}),
		[]string{"v1", "v2", "v3"}, traffic)
	if !reflect.DeepEqual(v.runs, want.Runs()) {
		t.Fatalf("after the conflict replicas serve %v, want %v", v.runs, want.Runs())
	}
	t.Logf("%d compare-and-swaps lost and retried", rs.mem.Conflicts()-before)

	// Propagation: how long after a write through one replica the others serve it.
	var lags []time.Duration
	for i := range 20 {
		from := rs.cps[i%3]
		version := ""
		start := time.Now()
		if i%2 == 0 {
			res, code, err := from.srv.Rollback(context.Background(), "r", "v1")
			if code != 200 {
				t.Fatalf("rollback: %d %v", code, err)
			}
			version = res.Version
		} else {
			v, code, err := from.srv.Release(context.Background(), "r")
			if code != 200 {
				t.Fatalf("release: %d %v", code, err)
			}
			version = v
		}
		for _, c := range rs.cps {
			if c == from {
				continue
			}
			for c.srv.Version() != version {
				if time.Since(start) > 10*time.Second {
					t.Fatalf("replica did not serve %s within 10s", version)
				}
				time.Sleep(100 * time.Microsecond)
			}
		}
		lags = append(lags, time.Since(start))
	}
	sort.Slice(lags, func(i, j int) bool { return lags[i] < lags[j] })
	t.Logf("write through one replica to all three serving it (store.Memory, 20 writes): median %v, max %v", lags[len(lags)/2], lags[len(lags)-1])
}
