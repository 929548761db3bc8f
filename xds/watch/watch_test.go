package watch

import (
	"context"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

func waitCount(t *testing.T, n *atomic.Int32, atLeast int32) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for n.Load() < atLeast {
		if time.Now().After(deadline) {
			t.Fatalf("saw %d changes, want at least %d", n.Load(), atLeast)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestWatchSeesWritesRenamesAndSymlinkSwaps(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	var n atomic.Int32
	done := make(chan error, 1)
	ready := make(chan struct{})
	go func() {
		done <- Run(ctx, Config{Dir: dir, Debounce: 150 * time.Millisecond, Ready: func() { close(ready) }}, func() { n.Add(1) })
	}()
	<-ready

	write := func(name, s string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// A burst of writes is one change.
	for i := 0; i < 5; i++ {
		write("a.yaml", "x")
	}
	waitCount(t, &n, 1)
	time.Sleep(300 * time.Millisecond)
	// Debounced: a burst is reloaded once (a loaded machine may split it, never per write).
	if got := n.Load(); got >= 5 {
		t.Fatalf("a burst of 5 writes gave %d changes: not debounced", got)
	}
	base := n.Load()
	// Editor style: write a temp file, rename it into place.
	write(".a.yaml.swp", "y")
	if err := os.Rename(filepath.Join(dir, ".a.yaml.swp"), filepath.Join(dir, "a.yaml")); err != nil {
		t.Fatal(err)
	}
	waitCount(t, &n, base+1)
	// Kubernetes ConfigMap style: ..data symlink swapped to a new timestamped directory.
	for i, d := range []string{"..2026_01", "..2026_02"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
		tmp := filepath.Join(dir, "..data_tmp")
		if err := os.Symlink(d, tmp); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, "..data")); err != nil {
			t.Fatal(err)
		}
		waitCount(t, &n, base+int32(2+i))
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestWatchMissingDir(t *testing.T) {
	err := Run(context.Background(), Config{Dir: filepath.Join(t.TempDir(), "nope")}, func() {})
	if err == nil {
		t.Fatal("want an error for a missing directory")
	}
}
