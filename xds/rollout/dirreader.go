package rollout

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// RacyWindow is how close to the moment it was read a file's modification (or change)
// time may be for its bytes to be reused on the next read. A file rewritten with the same
// size within one timestamp tick of a read keeps the timestamps that read saw, so such a
// file is read again next time (git's "racy clean" rule); 2 s covers the coarsest common
// timestamps (FAT's 2 s, ext3's and HFS+'s 1 s).
const RacyWindow = 2 * time.Second

// DirReader reads a directory's rollout files like ReadDir, but re-reads only the files
// whose identity changed since its last Read: size, modification time, inode and device,
// and (where the platform has them) change time, which also moves when a file is rewritten
// and its modification time is set back (os.Chtimes, touch -d). A file read within
// RacyWindow of its last change, or whose read failed, is read again every time. The bytes
// of the others are kept from the last Read; a deleted file disappears and a new one is
// read. It holds the files of its last Read only; the Data of files it returns is shared
// with the next Read's, so callers must not modify it. Safe for concurrent use.
type DirReader struct {
	Dir string

	mu   sync.Mutex
	seen map[string]seenFile // path → what the last Read saw; replaced whole
	now  func() time.Time    // the clock reads are dated with (tests)
}

// seenFile is a file as one Read saw it.
type seenFile struct {
	id    fileID
	data  []byte
	racy  bool // changed within RacyWindow of its read: read it again next time
	reads int  // times read from disk (tests)
}

// fileID is what identifies a file's content without reading it.
type fileID struct {
	size        int64
	mtime       time.Time
	ctime       time.Time // zero where the platform has none
	dev, ino    uint64    // zero where the platform has none
	hasIdentity bool      // ctime, dev and ino are known
}

func statID(st os.FileInfo) fileID {
	id := fileID{size: st.Size(), mtime: st.ModTime()}
	id.dev, id.ino, id.ctime, id.hasIdentity = sysID(st)
	return id
}

func (a fileID) same(b fileID) bool {
	return a.size == b.size && a.mtime.Equal(b.mtime) && a.ctime.Equal(b.ctime) &&
		a.dev == b.dev && a.ino == b.ino && a.hasIdentity == b.hasIdentity
}

// Read returns the rollout files of Dir exactly as ReadDir would (same files, order, sizes,
// modification times, bytes and errors), reading from disk only what may have changed.
func (d *DirReader) Read() ([]File, error) {
	entries, err := os.ReadDir(d.Dir)
	if err != nil {
		return nil, fmt.Errorf("read rollout directory: %w", err)
	}
	d.mu.Lock()
	prev := d.seen
	now := time.Now
	if d.now != nil {
		now = d.now
	}
	d.mu.Unlock()
	next := make(map[string]seenFile, len(prev))
	var files []File
	for _, e := range entries {
		if !IsRolloutFile(e.Name()) {
			continue
		}
		p := filepath.Join(d.Dir, e.Name())
		// Follow symlinks (ConfigMap mounts) but skip directories.
		st, err := os.Stat(p)
		if err == nil && st.IsDir() {
			continue
		}
		f := File{Path: p}
		if err != nil {
			f.Err = err
			files = append(files, f)
			continue
		}
		f.Size, f.ModTime = st.Size(), st.ModTime()
		id := statID(st)
		if old, ok := prev[p]; ok && !old.racy && old.id.same(id) {
			f.Data = old.data
			next[p] = old
			files = append(files, f)
			continue
		}
		readAt := now()
		f.Data, f.Err = readBounded(p)
		if f.Err == nil {
			// A failed read is not kept: it is read again next time.
			s := seenFile{id: id, data: f.Data, racy: racy(id, readAt)}
			if old, ok := prev[p]; ok {
				s.reads = old.reads
			}
			s.reads++
			next[p] = s
		}
		files = append(files, f)
	}
	d.mu.Lock()
	d.seen = next
	d.mu.Unlock()
	return files, nil
}

// racy reports whether a file's last change is within RacyWindow of when it was read (or
// after it: a clock skewed against the file system's), so that a same-size rewrite in the
// same timestamp tick could leave its identity unchanged.
func racy(id fileID, readAt time.Time) bool {
	last := id.mtime
	if id.ctime.After(last) {
		last = id.ctime
	}
	return readAt.Sub(last) < RacyWindow
}

// reads is how many times the last Read's file at path was read from disk (tests).
func (d *DirReader) reads(path string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.seen[path].reads
}
