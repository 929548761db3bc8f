// Package watch tells when the files of a directory may have changed: an fsnotify watch on
// the directory itself (so editors' rename-into-place and Kubernetes ConfigMap symlink swaps
// are seen), debounced, plus a slow periodic tick as a safety net for missed events.
package watch

import (
	"context"
	"fmt"
	"time"

	"github.com/fsnotify/fsnotify"
)

// Config configures a Watcher.
type Config struct {
	Dir string
	// Debounce is how long the directory must be quiet before a change is reported.
	Debounce time.Duration
	// Resync reports a change this often even without events (0: never).
	Resync time.Duration
	// Ready, if set, is called once the watch is in place: a change made after it
	// returns is never missed.
	Ready func()
}

// Run watches cfg.Dir until ctx is done, calling changed (from one goroutine, never
// concurrently) after each burst of events. It returns when ctx is done or the watch
// cannot be set up.
func Run(ctx context.Context, cfg Config, changed func()) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watch %s: %w", cfg.Dir, err)
	}
	defer w.Close()
	if err := w.Add(cfg.Dir); err != nil {
		return fmt.Errorf("watch %s: %w", cfg.Dir, err)
	}
	if cfg.Ready != nil {
		cfg.Ready()
	}
	var (
		timer   = time.NewTimer(time.Hour)
		pending bool
		resync  <-chan time.Time
	)
	timer.Stop()
	if cfg.Resync > 0 {
		t := time.NewTicker(cfg.Resync)
		defer t.Stop()
		resync = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case _, ok := <-w.Events:
			if !ok {
				return nil
			}
			// Any event in the directory: a write, a create, a rename onto a name, a
			// symlink swap. Reload the whole directory once things settle.
			pending = true
			timer.Reset(cfg.Debounce)
		case err, ok := <-w.Errors:
			if !ok {
				return nil
			}
			// An overflow means events were lost: reload to be safe.
			_ = err
			pending = true
			timer.Reset(cfg.Debounce)
		case <-timer.C:
			if pending {
				pending = false
				changed()
			}
		case <-resync:
			changed()
		}
	}
}
