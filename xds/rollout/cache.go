package rollout

import (
	"crypto/sha256"
	"sync"
)

// Cache remembers how the files of its last LoadData call parsed, so that a reload after a
// one-file edit parses that one file again, not the whole directory. An entry is keyed by
// the file's path and the SHA-256 of its bytes: the path is part of every position and
// error a parse holds, so the same bytes under another name parse again. It holds the
// files of the last call only (entries of files not in it are dropped), so it never grows
// beyond one directory's worth. Safe for concurrent use; the zero value is ready.
//
// Cached *Rollout values are shared by every Set that holds them: callers must treat a
// loaded Set as read-only (copy a Rollout before changing it, as the control plane's
// rollback does: effectiveRollout copies the struct and gives the copy new maps).
// Validation is split the same way: the checks of one rollout alone are kept with its parse
// (see checksOf); the rules that span files (a model or experiment defined twice, a layer
// over-allocated) run on the whole set every call.
type Cache struct {
	mu      sync.Mutex
	entries map[string]parsed // path → last parse; replaced whole, never changed in place
}

// parsed is one file's Parse result, for content with that sum.
type parsed struct {
	sum   [sha256.Size]byte
	rs    []*Rollout
	plans [][]check // checksOf each of rs
	err   error
}

// defaultCache serves the package-level LoadData.
var defaultCache Cache

// LoadData parses (or reuses the parse of files seen unchanged by the previous call) and
// validates files already read. Its Set and errors are exactly LoadData's without a
// cache.
func (c *Cache) LoadData(files []File) (*Set, error) {
	c.mu.Lock()
	prev := c.entries
	c.mu.Unlock()
	next := make(map[string]parsed, len(files))
	set, err := loadData(files, func(path string, data []byte) ([]*Rollout, [][]check, error) {
		sum := sha256.Sum256(data)
		if p, ok := next[path]; ok && p.sum == sum {
			return p.rs, p.plans, p.err // the same path listed twice
		}
		if p, ok := prev[path]; ok && p.sum == sum {
			next[path] = p
			return p.rs, p.plans, p.err
		}
		rs, err := Parse(path, data)
		p := parsed{sum: sum, rs: rs, plans: make([][]check, len(rs)), err: err}
		for i, r := range rs {
			p.plans[i] = checksOf(r)
		}
		next[path] = p
		return p.rs, p.plans, p.err
	})
	c.mu.Lock()
	c.entries = next
	c.mu.Unlock()
	return set, err
}

// Len is how many files' parses the cache holds.
func (c *Cache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
}
