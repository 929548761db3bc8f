package xds

import (
	"context"
	"sync"
	"time"

	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/watch"
)

// dirSource is the default Source: the rollout files of a directory, watched with fsnotify
// (debounced, with a periodic resync) and read only once they have settled.
type dirSource struct {
	dir                      string
	debounce, resync, settle time.Duration

	readerOnce sync.Once
	reader     *rollout.DirReader // re-reads only the files whose size, times or inode changed
}

// readDir reads the directory as rollout.ReadDir does, from disk only the files that may
// have changed since the last read (see rollout.DirReader): at 10,000 files, a reload after
// a one-file edit reads one file, not 10,000.
func (d *dirSource) readDir() ([]rollout.File, error) {
	d.readerOnce.Do(func() { d.reader = &rollout.DirReader{Dir: d.dir} })
	return d.reader.Read()
}

func (d *dirSource) Describe() string { return d.dir }

func (d *dirSource) Watch(ctx context.Context, ready, changed func()) error {
	return watch.Run(ctx, watch.Config{Dir: d.dir, Debounce: d.debounce, Resync: d.resync, Ready: ready}, changed)
}

// settleTries bounds how many settle intervals one read waits for files that keep changing.
const settleTries = 20

// Read reads the rollout files until two reads a settle interval apart agree (same names,
// sizes, modification times and bytes) and returns the second read; what is parsed is
// exactly what was seen unchanged. settled is false when the files kept changing (or ctx
// ended): the writes in progress will cause another reload.
func (d *dirSource) Read(ctx context.Context) (files []rollout.File, settled bool, err error) {
	prev, err := d.readDir()
	if err != nil || d.settle < 0 {
		return prev, true, err
	}
	for range settleTries {
		t := time.NewTimer(d.settle)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, false, nil
		case <-t.C:
		}
		cur, err := d.readDir()
		if err != nil {
			return nil, true, err
		}
		if rollout.Same(prev, cur) {
			return cur, true, nil
		}
		prev = cur
	}
	return nil, false, nil
}
