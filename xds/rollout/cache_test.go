package rollout

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// writeMixedDir writes a directory of good and bad rollout files: generated models, the
// testdata files, and one file for each kind of problem the loader reports (a YAML syntax
// error, an unknown field, a wrong type, a non-mapping document, a bad byte, a model
// defined twice across files, a file over MaxFileSize, a dangling symlink) beside what
// ReadDir skips (a hidden file, a directory named like a rollout file).
func writeMixedDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	write := func(name, data string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 20 {
		write(fmt.Sprintf("model-%05d.yaml", i), scaleDoc(i, 0))
	}
	for _, name := range []string{"good", "bad"} {
		b, err := os.ReadFile(filepath.Join("testdata", name, "ranker.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		write(name+"-ranker.yaml", string(b))
	}
	write("syntax.yaml", "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: [unclosed\n")
	write("unknown.yml", strings.Replace(scaleDoc(100, 0), "traffic:", "trafic: {v1: 100}\ntraffic:", 1))
	write("wrongtype.yaml", strings.Replace(scaleDoc(101, 0), "model: model-00101", "model: [a, b]", 1))
	write("scalar.yaml", "just a string\n")
	write("badbyte.yaml", "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: x\x01y\n")
	write("twice.yaml", scaleDoc(3, 1))
	write("multi.yaml", scaleDoc(200, 0)+"---\n"+scaleDoc(201, 2)+"---\n")
	write("large.yaml", strings.Repeat("#", MaxFileSize+1))
	write(".hidden.yaml", "not: read")
	if err := os.Mkdir(filepath.Join(dir, "sub.yaml"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(dir, "missing"), filepath.Join(dir, "dangling.yaml")); err != nil {
		t.Fatal(err)
	}
	return dir
}

// sameLoad fails unless a cached load gave exactly the Set and errors of an uncached one.
func sameLoad(t *testing.T, what string, gotSet *Set, gotErr error, files []File) {
	t.Helper()
	wantSet, wantErr := loadData(files, parseOnly)
	if diff := cmp.Diff(wantSet, gotSet, cmp.AllowUnexported(Rollout{})); diff != "" {
		t.Errorf("%s: Set differs from an uncached load (-want +got):\n%s", what, diff)
	}
	if (wantErr == nil) != (gotErr == nil) {
		t.Fatalf("%s: error %v, uncached %v", what, gotErr, wantErr)
	}
	if wantErr != nil {
		if diff := cmp.Diff(strings.Split(wantErr.Error(), "\n"), strings.Split(gotErr.Error(), "\n")); diff != "" {
			t.Errorf("%s: errors differ from an uncached load (-want +got):\n%s", what, diff)
		}
		if w, g := len(flatErrors(wantErr)), len(flatErrors(gotErr)); w != g {
			t.Errorf("%s: %d joined errors, uncached %d", what, g, w)
		}
	}
}

func flatErrors(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

func TestCacheGivesTheSameSetAndErrorsAsAParse(t *testing.T) {
	dir := writeMixedDir(t)
	var c Cache
	files, err := ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	set, err := c.LoadData(files)
	if err == nil {
		t.Fatal("the mixed directory loaded without errors")
	}
	for _, want := range []string{"syntax.yaml:2:", "unknown.yml:", `unknown field "trafic"`, "wrongtype.yaml:", "scalar.yaml:1: a rollout document must be a mapping",
		"badbyte.yaml:3:", `twice.yaml:3: model: "model-00003" is already defined at`, "large.yaml: file larger than", "dangling.yaml: stat",
		"bad-ranker.yaml:26: retries: 20 is outside 0..10"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("errors lack %q:\n%v", want, err)
		}
	}
	sameLoad(t, "first load", set, err, files)
	set, err = c.LoadData(files) // every parse reused
	sameLoad(t, "second load", set, err, files)

	// Good files only: a Set, the same from the cache.
	var good []File
	for _, f := range files {
		if strings.Contains(f.Path, "model-") {
			good = append(good, f)
		}
	}
	set, err = c.LoadData(good)
	if err != nil || len(set.Rollouts) != 20 {
		t.Fatalf("good files: %v", err)
	}
	sameLoad(t, "good files", set, err, good)
	set, err = c.LoadData(good)
	sameLoad(t, "good files again", set, err, good)

	// The same bytes under another name: the name is in the errors and positions.
	moved := append([]File(nil), files...)
	for i := range moved {
		moved[i].Path = strings.Replace(moved[i].Path, "bad-ranker", "zz-ranker", 1)
	}
	set, err = c.LoadData(moved)
	sameLoad(t, "renamed file", set, err, moved)
	if !strings.Contains(err.Error(), "zz-ranker.yaml:26: retries") || strings.Contains(err.Error(), "bad-ranker") {
		t.Errorf("a renamed file's errors name the old file:\n%v", err)
	}
}

func TestCacheReparsesOnlyChangedFilesAndKeepsTheLastCallOnly(t *testing.T) {
	var files []File
	for i := range 50 {
		d := []byte(scaleDoc(i, 0))
		files = append(files, File{Path: fmt.Sprintf("dir/model-%05d.yaml", i), Data: d, Size: int64(len(d))})
	}
	var c Cache
	first, err := c.LoadData(files)
	if err != nil {
		t.Fatal(err)
	}
	// Edit model 7: same size, other split.
	edited := append([]File(nil), files...)
	edited[7].Data = []byte(scaleDoc(7, 3))
	if len(edited[7].Data) != len(files[7].Data) {
		t.Fatal("the edit changed the size")
	}
	second, err := c.LoadData(edited)
	if err != nil {
		t.Fatal(err)
	}
	sameLoad(t, "after an edit", second, err, edited)
	for i := range files {
		reused := first.Rollouts[i] == second.Rollouts[i]
		if reused == (i == 7) {
			t.Errorf("model %d: parse reused %v, want %v", i, reused, i != 7)
		}
	}
	if got := second.Rollouts[7].Traffic["v2"]; got != 13 {
		t.Errorf("edited model's v2 = %d, want 13", got)
	}
	// Deleted files leave the cache: it holds the last call's files only.
	if _, err := c.LoadData(edited[:5]); err != nil {
		t.Fatal(err)
	}
	if got := c.Len(); got != 5 {
		t.Errorf("cache holds %d files after a call of 5", got)
	}
	// A one-file LoadData (xds/kube validates every object alone) does not evict the
	// package cache's directory.
	if _, err := LoadData(edited); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadData(edited[3:4]); err != nil {
		t.Fatal(err)
	}
	if got := defaultCache.Len(); got != len(edited) {
		t.Errorf("package cache holds %d files after a one-file call, want %d", got, len(edited))
	}
}

func TestCacheConcurrentLoads(t *testing.T) {
	var c Cache
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for round := range 20 {
				var files []File
				for i := range 30 {
					d := []byte(scaleDoc(i, (g+round+i)%3))
					files = append(files, File{Path: fmt.Sprintf("m%02d.yaml", i), Data: d})
				}
				set, err := c.LoadData(files)
				if err != nil {
					t.Error(err)
					return
				}
				for i, r := range set.Rollouts {
					if want := 10 + (g+round+i)%3; r.Traffic["v2"] != want {
						t.Errorf("goroutine %d round %d model %d: v2 = %d, want %d", g, round, i, r.Traffic["v2"], want)
					}
				}
			}
		}()
	}
	wg.Wait()
}

// sortedErrors is err's lines in order: problems on one line come in the order a map of
// match headers is walked, which differs between two validations of the same document.
func sortedErrors(err error) []string {
	if err == nil {
		return nil
	}
	l := strings.Split(err.Error(), "\n")
	sort.Strings(l)
	return l
}

// FuzzCacheLoadsLikeAParse: for any three documents, loading a.yaml and b.yaml through a
// Cache, again, then with b.yaml replaced by the third (and back) gives each time the Set
// and the problems of a load without a cache, including the rules that span files (the
// same model, experiment or layer in both).
func FuzzCacheLoadsLikeAParse(f *testing.F) {
	good, err := os.ReadFile("testdata/good/ranker.yaml")
	if err != nil {
		f.Fatal(err)
	}
	bad, err := os.ReadFile("testdata/bad/ranker.yaml")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good, bad, []byte(scaleDoc(1, 0)))
	f.Add([]byte(scaleDoc(1, 0)), []byte(scaleDoc(2, 0)), []byte(scaleDoc(1, 3)))
	f.Add(good, good, []byte(strings.Replace(string(good), "ranker", "other", 1)))
	f.Add([]byte(scaleDoc(1, 0)+"---\n"+scaleDoc(2, 0)), []byte("model: [x\n"), []byte("\x01"))
	f.Fuzz(func(t *testing.T, a, b, c []byte) {
		if len(a)+len(b)+len(c) > 16<<10 {
			return // rollout files are small; large inputs only slow the search down
		}
		var cache Cache
		for step, bData := range [][]byte{b, b, c, b} {
			files := []File{{Path: "a.yaml", Data: a}, {Path: "b.yaml", Data: bData}}
			got, gotErr := cache.LoadData(files)
			want, wantErr := loadData(files, parseOnly)
			if d := cmp.Diff(want, got, cmp.AllowUnexported(Rollout{})); d != "" {
				t.Fatalf("step %d: Set differs from an uncached load (-want +got):\n%s", step, d)
			}
			if d := cmp.Diff(sortedErrors(wantErr), sortedErrors(gotErr)); d != "" {
				t.Fatalf("step %d: errors differ from an uncached load (-want +got):\n%s", step, d)
			}
		}
	})
}
