package watch

import (
	"context"
	"fmt"
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
	// A plain write (TestDebounce counts bursts exactly).
	write("a.yaml", "x")
	waitCount(t, &n, 1)
	time.Sleep(300 * time.Millisecond)
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

// TestDebounce: what --debounce promises, exactly. N writes closer together than the
// debounce are one reload, made no sooner than the debounce after the last write; writes
// spaced wider than the debounce are one reload each. Debounce is long (400 ms) next to a
// tight write loop, so a busy machine cannot split the burst.
func TestDebounce(t *testing.T) {
	const debounce = 400 * time.Millisecond
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	var n atomic.Int32
	var lastReload atomic.Int64
	done := make(chan error, 1)
	ready := make(chan struct{})
	go func() {
		done <- Run(ctx, Config{Dir: dir, Debounce: debounce, Ready: func() { close(ready) }}, func() {
			lastReload.Store(time.Now().UnixNano())
			n.Add(1)
		})
	}()
	<-ready
	write := func(s string) {
		if err := os.WriteFile(filepath.Join(dir, "a.yaml"), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// exactly waits for the count to reach want, then one more debounce and twice over to
	// see that nothing further comes.
	exactly := func(want int32, what string) {
		t.Helper()
		waitCount(t, &n, want)
		time.Sleep(2 * debounce)
		if got := n.Load(); got != want {
			t.Fatalf("%s: %d reloads, want exactly %d", what, got, want)
		}
	}

	const burst = 5
	for i := 0; i < burst; i++ {
		write(fmt.Sprint("burst ", i))
	}
	lastWrite := time.Now()
	exactly(1, fmt.Sprintf("a burst of %d writes", burst))
	// A timer never fires early: the reload came after the directory was quiet for debounce.
	if quiet := time.Duration(lastReload.Load() - lastWrite.UnixNano()); quiet < debounce {
		t.Fatalf("reloaded %s after the last write, before the %s debounce", quiet, debounce)
	}

	// Spaced writes: each waits for the previous reload, which itself came a debounce after
	// the previous write, so the gaps are wider than the debounce.
	const spaced = 3
	for i := int32(1); i <= spaced; i++ {
		write(fmt.Sprint("spaced ", i))
		exactly(1+i, fmt.Sprintf("spaced write %d", i))
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
