package store

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
)

// FileVersion is the state file format File writes.
const FileVersion = 2

// File keeps every model's state in one JSON file, {"version":2,"models":{model: ModelState}},
// for a control plane with one replica (--state-file). Every Update rewrites the file
// atomically and durably: a temp file in the same directory is written, fsynced and closed,
// the file it replaces is kept as <file>.prev (the previous good state, for recovery), the
// temp file is renamed over the file and the directory is fsynced. A crash at any point
// leaves either the old or the new state, never a mix.
//
// It also reads the format before it, {"slots":{model:[100 version names]}}, as slot maps
// (the next Update writes the new format). A file that cannot be read back is reported as
// an error wrapping ErrCorrupt that names the file and both ways to recover.
type File struct {
	path string
	mu   sync.Mutex // serialises Update (read, fn, write) within the process
}

// NewFile returns a File store on path (the file need not exist yet).
func NewFile(path string) *File { return &File{path: path} }

// Path is the state file's path.
func (f *File) Path() string { return f.path }

// Load reads the file; a missing file is an empty state.
func (f *File) Load(context.Context) (map[string]ModelState, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.read()
}

// Update reads the file, applies fn to the model's state and writes the file. One writer
// (this process) means no conflicts: fn runs once.
func (f *File) Update(ctx context.Context, model string, fn func(cur ModelState) (ModelState, error)) (ModelState, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	all, err := f.read()
	if err != nil {
		return ModelState{}, err
	}
	next, err := fn(all[model].Clone())
	if err != nil {
		return ModelState{}, err
	}
	all[model] = next.Clone()
	if err := f.write(all); err != nil {
		return ModelState{}, fmt.Errorf("write state file %s: %w", f.path, err)
	}
	return next, nil
}

// Watch returns at once: the file has one writer, this process.
func (f *File) Watch(context.Context, func()) error { return nil }

func (f *File) read() (map[string]ModelState, error) {
	b, err := os.ReadFile(f.path)
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]ModelState{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read state file %s: %w", f.path, err)
	}
	st, err := ParseFile(b)
	if err != nil {
		return nil, fmt.Errorf("%w: state file %s: %v. Recover: restore the previous good state "+
			"(mv %s.prev %s; it is as old as the last change), or move the file away to start afresh "+
			"(slot maps are laid out again, so users may change variant, and rollbacks and their history are forgotten); "+
			"the control plane retries by itself", ErrCorrupt, f.path, err, f.path, f.path)
	}
	return st, nil
}

// fileState is the file's format.
type fileState struct {
	Version int                   `json:"version"`
	Models  map[string]ModelState `json:"models"`
	// Slots is the format before version 2: model -> one version name per slot.
	Slots map[string][]string `json:"slots,omitempty"`
}

// ParseFile parses a state file's bytes (either format) and checks what it holds. It is
// what Load uses; exported for the fuzz test and for tools.
func ParseFile(b []byte) (map[string]ModelState, error) {
	if len(bytes.TrimSpace(b)) == 0 {
		return nil, errors.New("empty (a write was cut short?)")
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var st fileState
	if err := dec.Decode(&st); err != nil {
		return nil, fmt.Errorf("not a state file (torn or edited by hand?): %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("not a state file: data after the JSON object (torn or edited by hand?)")
	}
	out := map[string]ModelState{}
	switch {
	case st.Version == 0 && st.Models == nil:
		// The first format: slot maps only.
		for m, names := range st.Slots {
			if len(names) != Slots {
				return nil, fmt.Errorf("slots.%s: %d slots, want %d", m, len(names), Slots)
			}
			var runs []Run
			for _, v := range names {
				if v == "" {
					return nil, fmt.Errorf("slots.%s: a slot without a version", m)
				}
				if n := len(runs); n > 0 && runs[n-1].Version == v {
					runs[n-1].Slots++
					continue
				}
				runs = append(runs, Run{Version: v, Slots: 1})
			}
			out[m] = ModelState{Slots: runs}
		}
		return out, nil
	case st.Version == FileVersion:
		if st.Slots != nil {
			return nil, errors.New(`version 2 has no "slots" (it is in each model's state)`)
		}
	default:
		return nil, fmt.Errorf("version %d: this control plane reads versions 1 and %d (written by a newer one?)", st.Version, FileVersion)
	}
	for m, s := range st.Models {
		if m == "" {
			return nil, errors.New("a model without a name")
		}
		if err := s.Check(); err != nil {
			return nil, fmt.Errorf("models.%s: %w", m, err)
		}
		out[m] = s
	}
	return out, nil
}

// Slots is the number of slots of a slot map (translate.Slots).
const Slots = 100

// Check reports what makes a stored state unusable: slot runs that do not cover exactly
// Slots slots, a run or split naming no version, a share out of range.
func (s ModelState) Check() error {
	total := 0
	for i, r := range s.Slots {
		if r.Version == "" || r.Slots <= 0 {
			return fmt.Errorf("slots[%d]: want a version and a positive number of slots", i)
		}
		total += r.Slots
	}
	if len(s.Slots) > 0 && total != Slots {
		return fmt.Errorf("slots: %d slots, want %d", total, Slots)
	}
	split := func(where string, t map[string]int) error {
		sum := 0
		for v, w := range t {
			if v == "" || w < 0 || w > 100 {
				return fmt.Errorf("%s: %q: %d is not a share of a version", where, v, w)
			}
			sum += w
		}
		if sum != 100 {
			return fmt.Errorf("%s: sums to %d, want 100", where, sum)
		}
		return nil
	}
	if s.Rollback != nil {
		if err := split("rollback.traffic", s.Rollback.Traffic); err != nil {
			return err
		}
	}
	if a := s.Analysis; a != nil {
		switch a.Phase {
		case PhaseRunning, PhaseWaiting, PhaseSucceeded, PhaseFailed:
		default:
			return fmt.Errorf("analysis.phase: %q is not running, waiting, succeeded or failed", a.Phase)
		}
		if a.Step < 0 || a.Step > 100 {
			return fmt.Errorf("analysis.step: %d is not a step index", a.Step)
		}
	}
	if len(s.History) > HistoryDepth {
		return fmt.Errorf("history: %d entries, at most %d", len(s.History), HistoryDepth)
	}
	for i, h := range s.History {
		if err := split(fmt.Sprintf("history[%d]", i), h); err != nil {
			return err
		}
	}
	return nil
}

// write replaces the file atomically and durably (see File).
func (f *File) write(all map[string]ModelState) error {
	b, err := json.MarshalIndent(fileState{Version: FileVersion, Models: all}, "", "  ")
	if err != nil {
		return err
	}
	b = append(b, '\n')
	dir := filepath.Dir(f.path)
	tmp, err := os.CreateTemp(dir, ".patchbay-state-*")
	if err != nil {
		return err
	}
	done := false
	defer func() {
		if !done {
			os.Remove(tmp.Name())
		}
	}()
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := keepPrev(f.path); err != nil {
		return fmt.Errorf("keep the previous state as %s.prev: %w", f.path, err)
	}
	if err := os.Rename(tmp.Name(), f.path); err != nil {
		return err
	}
	done = true
	return syncDir(dir)
}

// keepPrev makes <path>.prev the current file (a hard link, or a copy where links are not
// possible) before it is replaced. No current file: nothing to keep.
func keepPrev(path string) error {
	prev := path + ".prev"
	if _, err := os.Lstat(path); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	tmp := prev + ".tmp"
	os.Remove(tmp)
	if err := os.Link(path, tmp); err != nil {
		if err := copyFile(path, tmp); err != nil {
			os.Remove(tmp)
			return err
		}
	}
	return os.Rename(tmp, prev)
}

func copyFile(from, to string) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := out.Write(b); err != nil {
		out.Close()
		return err
	}
	if err := out.Sync(); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
