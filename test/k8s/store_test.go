package k8s

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/patchbay-io/patchbay/xds/kube"
	"github.com/patchbay-io/patchbay/xds/store"
)

var _ store.Store = (*kube.Store)(nil)

// TestStoreConflictIsRetried: replica B writes between replica A's read and A's write; A's
// UpdateStatus (conditional on the resourceVersion it read) gets a conflict, A reads again
// and re-runs fn on B's state, so neither write is lost.
func TestStoreConflictIsRetried(t *testing.T) {
	ns := namespace(t)
	apply(t, ns, rankerManifest)
	a, b := kube.NewStore(kubeConfig(t, ns)), kube.NewStore(kubeConfig(t, ns))
	ctx := context.Background()
	var seen []string
	got, err := a.Update(ctx, "ranker", func(cur store.ModelState) (store.ModelState, error) {
		seen = append(seen, cur.ConfigVersion)
		if len(seen) == 1 {
			if _, err := b.Update(ctx, "ranker", func(cur store.ModelState) (store.ModelState, error) {
				cur.ConfigVersion += "b"
				return cur, nil
			}); err != nil {
				t.Errorf("B: %v", err)
			}
		}
		cur.ConfigVersion += "a"
		return cur, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff([]string{"", "b"}, seen); d != "" {
		t.Errorf("states A's fn saw (-want +got):\n%s", d)
	}
	if a.Conflicts() != 1 || b.Conflicts() != 0 {
		t.Errorf("conflicts: A %d, B %d; want 1, 0", a.Conflicts(), b.Conflicts())
	}
	if got.ConfigVersion != "ba" {
		t.Errorf("Update returned %q, want ba", got.ConfigVersion)
	}
	st, err := b.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st["ranker"].ConfigVersion != "ba" {
		t.Errorf("stored %q, want ba", st["ranker"].ConfigVersion)
	}
}

// TestStoreConcurrentWriters: two replicas (two Stores, two connections) each add 1 to a
// counter 25 times concurrently: the result is 50 (no update lost), every value from 1 to
// 50 was written exactly once, and the conflicts that made it so are counted.
func TestStoreConcurrentWriters(t *testing.T) {
	ns := namespace(t)
	apply(t, ns, rankerManifest)
	const perWriter = 25
	stores := []*kube.Store{kube.NewStore(kubeConfig(t, ns)), kube.NewStore(kubeConfig(t, ns))}
	var (
		mu      sync.Mutex
		written = map[string]int{}
		wg      sync.WaitGroup
	)
	for _, s := range stores {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range perWriter {
				got, err := s.Update(context.Background(), "ranker", func(cur store.ModelState) (store.ModelState, error) {
					n, _ := strconv.Atoi(cur.ConfigVersion)
					cur.ConfigVersion = strconv.Itoa(n + 1)
					cur.Slots = []store.Run{{Version: "v7", Slots: n + 1}}
					return cur, nil
				})
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				written[got.ConfigVersion]++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	st, err := stores[0].Load(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if v := st["ranker"].ConfigVersion; v != strconv.Itoa(2*perWriter) {
		t.Errorf("final counter %s, want %d", v, 2*perWriter)
	}
	if s := st["ranker"].Slots; len(s) != 1 || s[0].Slots != 2*perWriter {
		t.Errorf("final slots %v: not written with the counter", s)
	}
	for i := 1; i <= 2*perWriter; i++ {
		if written[strconv.Itoa(i)] != 1 {
			t.Errorf("value %d written %d times", i, written[strconv.Itoa(i)])
		}
	}
	t.Logf("%d updates by 2 writers: %d + %d conflicts retried", 2*perWriter, stores[0].Conflicts(), stores[1].Conflicts())
}

// TestStoreWatchSeesOtherWriter: a replica's Watch fires when another replica changes a
// model's state, and then Load shows that state.
func TestStoreWatchSeesOtherWriter(t *testing.T) {
	ns := namespace(t)
	apply(t, ns, rankerManifest)
	a, b := kube.NewStore(kubeConfig(t, ns)), kube.NewStore(kubeConfig(t, ns))
	ctx, cancel := context.WithCancel(context.Background())
	changed := make(chan struct{}, 1)
	done := make(chan error, 1)
	go func() {
		done <- a.Watch(ctx, func() {
			select {
			case changed <- struct{}{}:
			default:
			}
		})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Watch: %v", err)
		}
	})
	// B writes a new rollback every 200 ms until A's informer (syncing meanwhile) reports one.
	var last string
	deadline := time.After(30 * time.Second)
	for i := 1; ; i++ {
		last = "rollback " + strconv.Itoa(i)
		if _, err := b.Update(ctx, "ranker", func(cur store.ModelState) (store.ModelState, error) {
			cur.Rollback = &store.Rollback{Traffic: map[string]int{"v7": 100}, Reason: last, At: time.Now().UTC(), FromIndex: -1, SpecFingerprint: "fp"}
			return cur, nil
		}); err != nil {
			t.Fatal(err)
		}
		select {
		case <-changed:
		case <-time.After(200 * time.Millisecond):
			continue
		case <-deadline:
			t.Fatal("A's Watch never fired on B's writes")
		}
		break
	}
	st, err := a.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r := st["ranker"].Rollback; r == nil || !strings.HasPrefix(r.Reason, "rollback ") {
		t.Errorf("A loads rollback %+v after the notification", r)
	}
}

// TestStoreFindsModelAndLeavesSpec: a Rollout named otherwise than its model (spec.model)
// is found by model; a state write leaves spec and generation alone; a fn error aborts
// with nothing written; an unknown model is an error.
func TestStoreFindsModelAndLeavesSpec(t *testing.T) {
	ns := namespace(t)
	before := apply(t, ns, strings.Replace(rankerManifest, "name: ranker\nspec:\n", "name: ranker-eu-west\nspec:\n  model: ranker-eu\n", 1))
	s := kube.NewStore(kubeConfig(t, ns))
	ctx := context.Background()
	want := store.ModelState{SpecFingerprint: "fp", Slots: []store.Run{{Version: "v7", Slots: 90}, {Version: "v8", Slots: 10}},
		History: []map[string]int{{"v7": 90, "v8": 10}}, ConfigVersion: "7"}
	if _, err := s.Update(ctx, "ranker-eu", func(store.ModelState) (store.ModelState, error) { return want, nil }); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("boom")
	if _, err := s.Update(ctx, "ranker-eu", func(store.ModelState) (store.ModelState, error) { return store.ModelState{}, boom }); !errors.Is(err, boom) {
		t.Errorf("fn error: Update returned %v", err)
	}
	if _, err := s.Update(ctx, "nope", func(c store.ModelState) (store.ModelState, error) { return c, nil }); err == nil {
		t.Error("Update of a model without a Rollout succeeded")
	}
	st, err := s.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(map[string]store.ModelState{"ranker-eu": want}, st); d != "" {
		t.Errorf("Load (-want +got):\n%s", d)
	}
	after := getRollout(t, ns, "ranker-eu-west")
	if after.GetGeneration() != before.GetGeneration() {
		t.Errorf("generation %d -> %d on a status write", before.GetGeneration(), after.GetGeneration())
	}
	s1, _, _ := unstructured.NestedMap(before.Object, "spec")
	s2, _, _ := unstructured.NestedMap(after.Object, "spec")
	if d := cmp.Diff(s1, s2); d != "" {
		t.Errorf("spec changed by a status write:\n%s", d)
	}
}
