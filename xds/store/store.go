// Package store defines the control plane's durable, shareable state: per model, the slot
// map its split is laid out on, the rollback in force and the history of splits served.
// It is what must survive a control-plane restart and what every replica must agree on.
//
// Two implementations: File (one JSON file, written atomically and fsynced; one replica)
// and xds/kube (each Rollout's status in the Kubernetes API, written with optimistic
// concurrency; any number of replicas). The server (package xds) owns the rules that
// compute a state; a Store only keeps it.
package store

import (
	"context"
	"errors"
	"time"
)

// HistoryDepth is how many distinct served splits a model's history keeps.
const HistoryDepth = 10

// Run is a stretch of consecutive slots of a model's slot map held by one version (the
// same encoding /status shows as slot_runs).
type Run struct {
	Version string `json:"version"`
	Slots   int    `json:"slots"`
}

// Rollback is a rollback in force: the split it sends traffic to, built on one spec of
// the model. A different spec (the file or the Rollout changed) releases it.
type Rollback struct {
	// Traffic is the split in force (version -> percent, summing to 100).
	Traffic map[string]int `json:"traffic"`
	// Reason says why ("last known-good split", "all traffic to v7").
	Reason string    `json:"reason"`
	At     time.Time `json:"at"`
	// FromIndex is the History index of the split it restored; -1 for a named version.
	FromIndex int `json:"fromIndex"`
	// SpecFingerprint identifies the spec the rollback was taken on.
	SpecFingerprint string `json:"specFingerprint"`
}

// ModelState is one model's durable state.
type ModelState struct {
	// SpecFingerprint identifies the spec Slots were laid out for: a replica that sees the
	// same spec uses Slots as they are instead of laying them out again.
	SpecFingerprint string `json:"specFingerprint,omitempty"`
	// Slots is the slot map as runs, in slot order (empty: not laid out yet).
	Slots []Run `json:"slots,omitempty"`
	// Rollback is the rollback in force, if any.
	Rollback *Rollback `json:"rollback,omitempty"`
	// History is the distinct splits the spec served (not rollbacks), oldest first, at
	// most HistoryDepth.
	History []map[string]int `json:"history,omitempty"`
	// ConfigVersion is the config version the writer served with this state (informational).
	ConfigVersion string `json:"configVersion,omitempty"`
	// Analysis is the canary analysis of the spec, if it has one (absent in files written
	// before it existed: they load as no analysis).
	Analysis *AnalysisState `json:"analysis,omitempty"`
}

// Analysis phases.
const (
	PhaseRunning   = "running"   // judging the current step
	PhaseWaiting   = "waiting"   // held at the current step: too few requests, no data, no capacity
	PhaseSucceeded = "succeeded" // every step passed: the canary keeps its final share
	PhaseFailed    = "failed"    // a gate failed: rolled back to the baseline (Rollback)
)

// AnalysisState is where a canary analysis of one spec stands.
type AnalysisState struct {
	// SpecFingerprint is the spec it runs on: another spec starts it again at step 0.
	SpecFingerprint string `json:"specFingerprint"`
	// Step is the index of the current step in the spec's steps.
	Step        int       `json:"step"`
	StepStarted time.Time `json:"stepStarted"`
	Phase       string    `json:"phase"`
	Reason      string    `json:"reason,omitempty"`
	// LastDecision is the last decision that changed the state.
	LastDecision *Decision `json:"lastDecision,omitempty"`
}

// Decision is one evaluation of an analysis.
type Decision struct {
	At       time.Time `json:"at"`
	Step     int       `json:"step"`
	Decision string    `json:"decision"` // advance, wait, fail, done
	Gates    []Gate    `json:"gates,omitempty"`
}

// Gate is one gate bound judged in a decision.
type Gate struct {
	Metric    string  `json:"metric"`
	Value     float64 `json:"value"`
	Threshold float64 `json:"threshold"`
	Pass      bool    `json:"pass"`
}

// Clone returns a deep copy.
func (a *AnalysisState) Clone() *AnalysisState {
	if a == nil {
		return nil
	}
	out := *a
	if a.LastDecision != nil {
		d := *a.LastDecision
		d.Gates = append([]Gate(nil), a.LastDecision.Gates...)
		out.LastDecision = &d
	}
	return &out
}

// ErrCorrupt wraps a stored state that cannot be read back. The server does not start
// afresh on it (that would reshuffle users and forget rollbacks): it reports the error,
// stays not ready, and retries until an operator recovers (see the xds README).
var ErrCorrupt = errors.New("stored state is corrupt")

// Store keeps every model's ModelState.
type Store interface {
	// Load returns every model's stored state (no state at all: an empty map). An error
	// wrapping ErrCorrupt means the state exists but cannot be read.
	Load(ctx context.Context) (map[string]ModelState, error)
	// Update changes one model's state atomically: fn gets the stored state (zero if none)
	// and returns the new one. On a concurrent write by another replica the store reads
	// the state again and calls fn again (a bounded number of times), so fn must be a pure
	// function of its argument. fn returning an error aborts the update with that error.
	Update(ctx context.Context, model string, fn func(cur ModelState) (ModelState, error)) (ModelState, error)
	// Watch calls changed whenever the state may have been changed by someone else (another
	// replica), until ctx ends. A store with one writer may return at once.
	Watch(ctx context.Context, changed func()) error
}

// ErrConflict is returned by Update when other writers kept changing the model's state
// through every retry.
var ErrConflict = errors.New("stored state kept changing under a concurrent writer")

// Clone returns a deep copy (no slice, map or pointer shared with s).
func (s ModelState) Clone() ModelState {
	out := s
	out.Slots = append([]Run(nil), s.Slots...)
	if len(s.Slots) == 0 {
		out.Slots = nil
	}
	if s.Rollback != nil {
		rb := *s.Rollback
		rb.Traffic = cloneSplit(s.Rollback.Traffic)
		out.Rollback = &rb
	}
	out.Analysis = s.Analysis.Clone()
	out.History = nil
	for _, h := range s.History {
		out.History = append(out.History, cloneSplit(h))
	}
	return out
}

func cloneSplit(m map[string]int) map[string]int {
	if m == nil {
		return nil
	}
	out := make(map[string]int, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}
