package store

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// MaxAttempts bounds how many times Update calls fn when other writers keep winning.
const MaxAttempts = 16

// Memory keeps the state in process memory with the semantics of a shared store: Update is
// a compare-and-swap per model (fn is called again on the newer state when another writer
// got in between, as with a resourceVersion conflict), and every Watch of the same Memory
// is told of every change. Several servers given one Memory behave as replicas sharing the
// Kubernetes API, without Kubernetes; a server without a store gets a private one.
type Memory struct {
	mu       sync.Mutex
	models   map[string]ModelState
	revs     map[string]uint64
	watchers map[int]chan struct{}
	nextID   int

	conflicts atomic.Int64
	// beforeCommit, when set (tests), runs between fn and the compare-and-swap.
	beforeCommit func(model string)
}

// NewMemory returns an empty Memory.
func NewMemory() *Memory {
	return &Memory{models: map[string]ModelState{}, revs: map[string]uint64{}, watchers: map[int]chan struct{}{}}
}

// Load returns a copy of every model's state.
func (m *Memory) Load(context.Context) (map[string]ModelState, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make(map[string]ModelState, len(m.models))
	for k, v := range m.models {
		out[k] = v.Clone()
	}
	return out, nil
}

// Update is a compare-and-swap: fn runs outside the lock on a copy of the state at some
// revision; its result is stored only if the revision is still the same, else fn runs
// again on the newer state (at most MaxAttempts times; then ErrConflict).
func (m *Memory) Update(ctx context.Context, model string, fn func(cur ModelState) (ModelState, error)) (ModelState, error) {
	for attempt := range MaxAttempts {
		if attempt > 0 {
			// A jittered, growing pause after a lost swap, so contending writers spread out
			// (client-go's retry.RetryOnConflict backs off likewise).
			time.Sleep(time.Duration(rand.Int64N(int64(attempt)*int64(time.Millisecond) + 1)))
		}
		if err := ctx.Err(); err != nil {
			return ModelState{}, err
		}
		m.mu.Lock()
		cur, rev, hook := m.models[model].Clone(), m.revs[model], m.beforeCommit
		m.mu.Unlock()
		next, err := fn(cur)
		if err != nil {
			return ModelState{}, err
		}
		if hook != nil {
			hook(model)
		}
		m.mu.Lock()
		if m.revs[model] != rev {
			m.mu.Unlock()
			m.conflicts.Add(1)
			continue
		}
		m.models[model] = next.Clone()
		m.revs[model] = rev + 1
		for _, ch := range m.watchers {
			select {
			case ch <- struct{}{}:
			default: // a notification is pending already
			}
		}
		m.mu.Unlock()
		return next, nil
	}
	return ModelState{}, fmt.Errorf("update %s: %w (%d attempts)", model, ErrConflict, MaxAttempts)
}

// Watch calls changed after every Update of this Memory (by anyone, coalesced while a
// call is running) until ctx ends.
func (m *Memory) Watch(ctx context.Context, changed func()) error {
	ch := make(chan struct{}, 1)
	m.mu.Lock()
	id := m.nextID
	m.nextID++
	m.watchers[id] = ch
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		delete(m.watchers, id)
		m.mu.Unlock()
	}()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-ch:
			changed()
		}
	}
}

// Conflicts counts the compare-and-swaps lost to another writer (each one re-ran fn).
func (m *Memory) Conflicts() int64 { return m.conflicts.Load() }

// SetBeforeCommit sets a hook run between fn and the compare-and-swap of every Update
// (tests use it to force a concurrent write in that window). nil removes it.
func (m *Memory) SetBeforeCommit(f func(model string)) {
	m.mu.Lock()
	m.beforeCommit = f
	m.mu.Unlock()
}
