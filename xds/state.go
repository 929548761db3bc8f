package xds

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/patchbay-io/patchbay/xds/translate"
)

// slotState is the state file's format.
type slotState struct {
	Slots map[string]translate.SlotMap `json:"slots"`
}

// loadSlots reads the state file; a missing file is an empty state, a corrupt one an error
// (starting afresh would silently reshuffle users).
func loadSlots(path string) (map[string]translate.SlotMap, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]translate.SlotMap{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("state file: %w", err)
	}
	var st slotState
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("state file %s: %w (move it away to start afresh)", path, err)
	}
	out := map[string]translate.SlotMap{}
	for m, s := range st.Slots {
		if len(s) == translate.Slots {
			out[m] = s
		}
	}
	return out, nil
}

// saveSlots writes the state file atomically: a temp file in the same directory, renamed.
func saveSlots(path string, slots map[string]translate.SlotMap) error {
	b, err := json.Marshal(slotState{Slots: slots})
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".patchbay-state-*")
	if err != nil {
		return err
	}
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return err
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	return os.Rename(tmp.Name(), path)
}

func sameSlots(a, b map[string]translate.SlotMap) bool {
	if len(a) != len(b) {
		return false
	}
	for m, s := range a {
		t := b[m]
		if len(s) != len(t) {
			return false
		}
		for i := range s {
			if s[i] != t[i] {
				return false
			}
		}
	}
	return true
}
