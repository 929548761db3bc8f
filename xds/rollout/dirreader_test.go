package rollout

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// sameRead fails unless a DirReader's read is exactly what ReadDir reads now.
func sameRead(t *testing.T, what string, got []File, dir string) {
	t.Helper()
	want, err := ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !Same(want, got) {
		var w, g []string
		for _, f := range want {
			w = append(w, fmt.Sprintf("%s %d %v %q", filepath.Base(f.Path), f.Size, f.Err, f.Data))
		}
		for _, f := range got {
			g = append(g, fmt.Sprintf("%s %d %v %q", filepath.Base(f.Path), f.Size, f.Err, f.Data))
		}
		t.Fatalf("%s: DirReader read differs from ReadDir:\nReadDir:\n%s\nDirReader:\n%s", what, strings.Join(w, "\n"), strings.Join(g, "\n"))
	}
}

// notRacy dates a DirReader's reads an hour later, so that files just written count as
// settled (their bytes are reused) without the test waiting RacyWindow.
func notRacy(d *DirReader) { d.now = func() time.Time { return time.Now().Add(time.Hour) } }

func TestDirReaderReadsWhatReadDirReads(t *testing.T) {
	dir := writeMixedDir(t)
	d := &DirReader{Dir: dir}
	notRacy(d)
	for round := range 2 {
		files, err := d.Read()
		if err != nil {
			t.Fatal(err)
		}
		sameRead(t, fmt.Sprintf("read %d", round), files, dir)
		var c Cache
		set, err := c.LoadData(files)
		sameLoad(t, fmt.Sprintf("load %d", round), set, err, files)
	}
	// A new file appears, a deleted one disappears, a replaced one (rename over it: a new
	// inode) and a grown one are read again.
	if err := os.WriteFile(filepath.Join(dir, "model-00100.yaml"), []byte(scaleDoc(100, 0)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, "model-00002.yaml")); err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(dir, ".tmp")
	if err := os.WriteFile(tmp, []byte(scaleDoc(5, 4)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, "model-00005.yaml")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "model-00006.yaml"), []byte(scaleDoc(6, 0)+"retries: 2\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// The dangling symlink now points at a file; the too-large file shrinks.
	if err := os.WriteFile(filepath.Join(dir, "missing"), []byte(scaleDoc(300, 0)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "large.yaml"), []byte(scaleDoc(301, 0)), 0o644); err != nil {
		t.Fatal(err)
	}
	files, err := d.Read()
	if err != nil {
		t.Fatal(err)
	}
	sameRead(t, "after changes", files, dir)
	var c Cache
	set, err := c.LoadData(files)
	sameLoad(t, "after changes", set, err, files)
	// Reads from disk in all three reads: once before the change and once after it, or
	// once after it for the files that were new, unreadable or too large before.
	for p, want := range map[string]int{"model-00100.yaml": 1, "model-00005.yaml": 2, "model-00006.yaml": 2, "dangling.yaml": 1, "large.yaml": 1} {
		if got := d.reads(filepath.Join(dir, p)); got != want {
			t.Errorf("%s read %d times, want %d", p, got, want)
		}
	}
	if got := d.reads(filepath.Join(dir, "model-00001.yaml")); got != 1 {
		t.Errorf("an unchanged file was read %d times in three reads, want once", got)
	}
	if got := d.reads(filepath.Join(dir, "model-00002.yaml")); got != 0 {
		t.Errorf("a deleted file is still held (%d reads)", got)
	}
	d.mu.Lock()
	held := len(d.seen)
	d.mu.Unlock()
	if held != len(files) {
		t.Errorf("reader holds %d files, the directory has %d", held, len(files))
	}
}

// A file rewritten in place with the same size and its modification time set back is
// still seen (its change time and the racy window give it away).
func TestDirReaderSeesASameSizeSameMtimeEdit(t *testing.T) {
	dir := t.TempDir()
	for i := range 200 {
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("model-%05d.yaml", i)), []byte(scaleDoc(i, 0)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name  string
		clock func(d *DirReader)
	}{
		{"settled files", notRacy},
		{"files just written", func(*DirReader) {}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := &DirReader{Dir: dir}
			tc.clock(d)
			p := filepath.Join(dir, "model-00137.yaml")
			for edit := 1; edit <= 3; edit++ {
				if _, err := d.Read(); err != nil {
					t.Fatal(err)
				}
				st, err := os.Stat(p)
				if err != nil {
					t.Fatal(err)
				}
				data := []byte(scaleDoc(137, edit))
				if int64(len(data)) != st.Size() {
					t.Fatal("the edit changed the size")
				}
				if err := os.WriteFile(p, data, 0o644); err != nil {
					t.Fatal(err)
				}
				if err := os.Chtimes(p, st.ModTime(), st.ModTime()); err != nil {
					t.Fatal(err)
				}
				files, err := d.Read()
				if err != nil {
					t.Fatal(err)
				}
				sameRead(t, "after the edit", files, dir)
				set, err := LoadData(files)
				if err != nil {
					t.Fatal(err)
				}
				if got, want := set.Model("model-00137").Traffic["v2"], 10+edit; got != want {
					t.Fatalf("edit %d: v2 = %d, want %d", edit, got, want)
				}
			}
		})
	}
}

func TestRacyWindow(t *testing.T) {
	mtime := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		ctime  time.Time
		readAt time.Time
		want   bool
	}{
		{time.Time{}, mtime.Add(RacyWindow), false},
		{time.Time{}, mtime.Add(RacyWindow - time.Nanosecond), true},
		{time.Time{}, mtime.Add(-time.Minute), true}, // a file-system clock ahead of ours
		{mtime.Add(time.Second), mtime.Add(RacyWindow), true},
		{mtime.Add(time.Second), mtime.Add(time.Second + RacyWindow), false},
	} {
		if got := racy(fileID{mtime: mtime, ctime: tc.ctime}, tc.readAt); got != tc.want {
			t.Errorf("racy(mtime %v, ctime %v, read at %v) = %v, want %v", mtime, tc.ctime, tc.readAt, got, tc.want)
		}
	}
}
