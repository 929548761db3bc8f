package xds

import (
	"fmt"
	"maps"
	"net/http"
	"slices"
	"time"

	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/store"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// The rules that compute a model's durable state (store.ModelState) from the one stored
// before it. Each is a pure function of its arguments, so store.Store.Update may call it
// again on a newer state after losing a compare-and-swap, and two replicas racing compute
// the same state from the same predecessor: a ramp has one lineage of slot maps whichever
// replica applies it first.

// planState is the state that serves spec (fingerprint fp) after cur. When cur was laid out
// for the same spec it is kept as it is (slots, rollback in force). Otherwise a rollback
// taken on another spec is released, the slot map moves from cur's as little as the new
// split needs (translate.NextSlotMap), and the spec's split joins the history.
func planState(cur store.ModelState, spec *rollout.Rollout, fp string) store.ModelState {
	if cur.SpecFingerprint == fp && len(cur.Slots) > 0 {
		return cur
	}
	next := cur.Clone()
	next.SpecFingerprint = fp
	if next.Rollback != nil && next.Rollback.SpecFingerprint != fp {
		next.Rollback = nil
	}
	// An analysis starts again at step 0 on a new spec, and serves its step's split.
	next.Analysis = planAnalysis(cur.Analysis, spec, fp)
	served := analysisSpec(spec, next.Analysis, fp)
	eff := effectiveRollout(served, next.Rollback)
	next.Slots = toRuns(translate.NextSlotMap(toSlotMap(cur.Slots), versionList(eff), eff.Traffic))
	if next.Rollback == nil {
		next.History = appendHistory(next.History, served.Traffic)
	}
	return next
}

// rollbackState is cur with a rollback of spec in force (see AdminHandler): to version, or
// (version "") to the most recent split in the history that differs from the spec's and
// from the rollback in force, whose versions all still exist. It returns the split
// restored, or an *httpError.
func rollbackState(cur store.ModelState, spec *rollout.Rollout, fp, version string, at time.Time) (store.ModelState, map[string]int, error) {
	if cur.SpecFingerprint != fp {
		return cur, nil, &httpError{http.StatusConflict, fmt.Errorf("model %q: its rollout changed while rolling back; try again", spec.Model)}
	}
	rb := &store.Rollback{At: at, FromIndex: -1, SpecFingerprint: fp}
	if version != "" {
		rb.Traffic, rb.Reason = map[string]int{version: 100}, "all traffic to "+version
	} else {
		current := spec.Traffic
		start := len(cur.History) - 1
		if cur.Rollback != nil {
			current = cur.Rollback.Traffic
			if cur.Rollback.FromIndex >= 0 {
				start = cur.Rollback.FromIndex - 1 // go further back than the rollback in force
			}
		}
		for i := min(start, len(cur.History)-1); i >= 0 && rb.Traffic == nil; i-- {
			t := cur.History[i]
			if sameSplit(t, spec.Traffic) || sameSplit(t, current) || !versionsExist(spec, t) {
				continue
			}
			rb.Traffic, rb.FromIndex = cloneSplit(t), i
		}
		if rb.Traffic == nil {
			v := spec.Versions[0].Name
			return cur, nil, &httpError{http.StatusConflict, fmt.Errorf("model %q has no earlier split to go back to: name the version to send all "+
				`traffic to: POST {"version": %q} (patchbay rollout rollback %s --version %s); its versions: %s`,
				spec.Model, v, spec.Model, v, versionNames(spec))}
		}
		rb.Reason = "last known-good split"
	}
	next := cur.Clone()
	next.Rollback = rb
	eff := effectiveRollout(spec, rb)
	next.Slots = toRuns(translate.NextSlotMap(toSlotMap(cur.Slots), versionList(eff), eff.Traffic))
	return next, cloneSplit(rb.Traffic), nil
}

// releaseState is cur without its rollback: the spec's split again, on slots moved from
// the rollback's as little as needed.
func releaseState(cur store.ModelState, spec *rollout.Rollout, fp string) (store.ModelState, error) {
	if cur.Rollback == nil {
		return cur, &httpError{http.StatusNotFound, fmt.Errorf("no rollback in force for model %s", spec.Model)}
	}
	if cur.SpecFingerprint != fp {
		return cur, &httpError{http.StatusConflict, fmt.Errorf("model %q: its rollout changed while releasing; try again", spec.Model)}
	}
	next := cur.Clone()
	next.Rollback = nil
	next.Slots = toRuns(translate.NextSlotMap(toSlotMap(cur.Slots), versionList(spec), spec.Traffic))
	next.History = appendHistory(next.History, spec.Traffic)
	return next, nil
}

// effectiveRollout is what serves spec with rb in force: the spec (endpoints, timeouts,
// protocols) with the rollback's split, experiments and shadows off, and only the versions
// the split gives traffic to (closeDoors). No rollback: the spec.
func effectiveRollout(spec *rollout.Rollout, rb *store.Rollback) *rollout.Rollout {
	if rb == nil {
		return spec
	}
	target := *spec
	target.Experiments, target.Shadow = nil, nil
	target.Traffic = cloneSplit(rb.Traffic)
	closeDoors(&target)
	return &target
}

// appendHistory adds a split to a history unless it is its latest entry, keeping the last
// store.HistoryDepth.
func appendHistory(h []map[string]int, t map[string]int) []map[string]int {
	if n := len(h); n > 0 && sameSplit(h[n-1], t) {
		return h
	}
	h = append(h, cloneSplit(t))
	if len(h) > store.HistoryDepth {
		h = h[len(h)-store.HistoryDepth:]
	}
	return h
}

// sameModelState reports whether two states serve the same (ConfigVersion aside).
func sameModelState(a, b store.ModelState) bool {
	if a.SpecFingerprint != b.SpecFingerprint || !slices.Equal(a.Slots, b.Slots) || len(a.History) != len(b.History) || !sameAnalysis(a.Analysis, b.Analysis) {
		return false
	}
	for i := range a.History {
		if !maps.Equal(a.History[i], b.History[i]) {
			return false
		}
	}
	if (a.Rollback == nil) != (b.Rollback == nil) {
		return false
	}
	if a.Rollback == nil {
		return true
	}
	x, y := a.Rollback, b.Rollback
	return maps.Equal(x.Traffic, y.Traffic) && x.Reason == y.Reason && x.FromIndex == y.FromIndex &&
		x.SpecFingerprint == y.SpecFingerprint && x.At.Equal(y.At)
}

func sortedSplit(m map[string]int) string { return fmt.Sprint(m) } // fmt sorts map keys

// toSlotMap expands runs to one version per slot (nil unless they cover translate.Slots).
func toSlotMap(runs []store.Run) translate.SlotMap {
	var m translate.SlotMap
	for _, r := range runs {
		for range r.Slots {
			m = append(m, r.Version)
		}
	}
	if len(m) != translate.Slots {
		return nil
	}
	return m
}

func toRuns(m translate.SlotMap) []store.Run {
	var out []store.Run
	for _, r := range m.Runs() {
		out = append(out, store.Run{Version: r.Version, Slots: int(r.Weight)})
	}
	return out
}

// consistentSlots reports whether a slot map gives every version of r exactly its share.
func consistentSlots(m translate.SlotMap, r *rollout.Rollout) bool {
	if len(m) != translate.Slots {
		return false
	}
	have := map[string]int{}
	for _, v := range m {
		have[v]++
	}
	for v, n := range have {
		if r.Traffic[v] != n || r.Version(v) == nil {
			return false
		}
	}
	for v, w := range r.Traffic {
		if w > 0 && have[v] != w {
			return false
		}
	}
	return true
}

func versionList(r *rollout.Rollout) []string {
	out := make([]string, len(r.Versions))
	for i, v := range r.Versions {
		out[i] = v.Name
	}
	return out
}

// sameSplit compares splits, a version at 0 counting as absent.
func sameSplit(a, b map[string]int) bool {
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	for k, v := range b {
		if a[k] != v {
			return false
		}
	}
	return true
}

func cloneSplit(m map[string]int) map[string]int {
	out := make(map[string]int, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// httpError is an error with the HTTP status the admin API answers it with.
type httpError struct {
	code int
	err  error
}

func (e *httpError) Error() string { return e.err.Error() }
func (e *httpError) Unwrap() error { return e.err }
