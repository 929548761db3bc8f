package xds

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/store"
)

// modelDoc is a rollout of five versions in test/bench/xdsscale's shape; edit moves edit%10
// points of the split from v1 to v2 without changing the file's size.
func modelDoc(i, edit int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: model-%05d\nversions:\n", i)
	for v := 1; v <= 5; v++ {
		fmt.Fprintf(&b, "  - name: v%d\n    endpoints: [\"10.%d.%d.%d:8000\"]\n", v, i/250, i%250, v)
	}
	fmt.Fprintf(&b, "traffic: {v1: %d, v2: %d, v3: 0, v4: 0, v5: 0}\n", 90-edit%10, 10+edit%10)
	return b.String()
}

func writeRollout(t *testing.T, p, data string) {
	t.Helper()
	if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

// readLoad is one reload's read and load through dirSource, checked against the same
// directory read and parsed from scratch (rollout.ReadDir, an empty rollout.Cache).
func readLoad(t *testing.T, d *dirSource) (*rollout.Set, error) {
	t.Helper()
	files, settled, err := d.Read(context.Background())
	if err != nil || !settled {
		t.Fatalf("Read: settled %v, %v", settled, err)
	}
	set, lerr := rollout.LoadData(files)
	want, err := rollout.ReadDir(d.dir)
	if err != nil {
		t.Fatal(err)
	}
	if !rollout.Same(want, files) {
		t.Fatal("dirSource read differs from rollout.ReadDir")
	}
	var fresh rollout.Cache // empty: every file parsed
	wantSet, wantErr := fresh.LoadData(want)
	if diff := cmp.Diff(wantSet, set, cmpopts.IgnoreUnexported(rollout.Rollout{})); diff != "" {
		t.Errorf("Set differs from a fresh read (-want +got):\n%s", diff)
	}
	if fmt.Sprint(wantErr) != fmt.Sprint(lerr) {
		t.Errorf("errors differ from a fresh read:\nwant %v\ngot  %v", wantErr, lerr)
	}
	return set, lerr
}

func TestDirSourceSeesOneEditAmongManyFiles(t *testing.T) {
	dir := t.TempDir()
	const models = 500
	for i := range models {
		writeRollout(t, filepath.Join(dir, fmt.Sprintf("model-%05d.yaml", i)), modelDoc(i, 0))
	}
	d := &dirSource{dir: dir, settle: 5 * time.Millisecond}
	if _, err := readLoad(t, d); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "model-00321.yaml")
	for edit := 1; edit <= 3; edit++ {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		// Same size, modification time set back to what the last read saw.
		writeRollout(t, p, modelDoc(321, edit))
		if err := os.Chtimes(p, st.ModTime(), st.ModTime()); err != nil {
			t.Fatal(err)
		}
		set, err := readLoad(t, d)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := set.Model("model-00321").Traffic["v2"], 10+edit; got != want {
			t.Fatalf("edit %d not seen: v2 = %d, want %d", edit, got, want)
		}
	}
	// A deleted file disappears, a new one appears.
	if err := os.Remove(filepath.Join(dir, "model-00007.yaml")); err != nil {
		t.Fatal(err)
	}
	writeRollout(t, filepath.Join(dir, "model-00999.yaml"), modelDoc(999, 0))
	set, err := readLoad(t, d)
	if err != nil {
		t.Fatal(err)
	}
	if set.Model("model-00007") != nil || set.Model("model-00999") == nil || len(set.Rollouts) != models {
		t.Errorf("after a delete and a create: %d models, model-00007 %v, model-00999 %v",
			len(set.Rollouts), set.Model("model-00007") != nil, set.Model("model-00999") != nil)
	}
}

func TestDirSourceGoodAndBadFilesLoadAsAFreshRead(t *testing.T) {
	dir := t.TempDir()
	for i := range 30 {
		writeRollout(t, filepath.Join(dir, fmt.Sprintf("model-%05d.yaml", i)), modelDoc(i, 0))
	}
	d := &dirSource{dir: dir, settle: 5 * time.Millisecond}
	if _, err := readLoad(t, d); err != nil {
		t.Fatal(err)
	}
	// Break some files, one at a time, then mend them: each reload reports exactly what a
	// fresh read and parse would.
	bad := map[string]string{
		"model-00003.yaml": "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: [unclosed\n",
		"model-00004.yaml": strings.Replace(modelDoc(4, 0), "traffic:", "trafic: {v1: 1}\ntraffic:", 1),
		"model-00005.yaml": modelDoc(6, 0), // model-00006 defined twice
		"model-00008.yaml": strings.Replace(modelDoc(8, 0), "v2: 10", "v2: 11", 1),
		"model-00009.yaml": strings.Repeat("#", rollout.MaxFileSize+1),
	}
	for name, data := range bad {
		writeRollout(t, filepath.Join(dir, name), data)
	}
	_, err := readLoad(t, d)
	if err == nil {
		t.Fatal("broken files loaded")
	}
	for _, want := range []string{"model-00003.yaml:2:", `model-00004.yaml:15: unknown field "trafic"`, `model-00006.yaml:3: model: "model-00006" is already defined at`,
		"model-00008.yaml:15: traffic: weights sum to 101, want 100", "model-00009.yaml: file larger than"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("errors lack %q:\n%v", want, err)
		}
	}
	for name := range bad {
		var i int
		fmt.Sscanf(name, "model-%05d.yaml", &i)
		writeRollout(t, filepath.Join(dir, name), modelDoc(i, 0))
	}
	if _, err := readLoad(t, d); err != nil {
		t.Fatalf("mended files: %v", err)
	}
}

// LoadData shares the parsed rollouts of unchanged files between reloads; a rollback in
// force (effectiveRollout, closeDoors) must change a copy, never the shared rollout.
func TestRollbackDoesNotChangeTheSharedRollout(t *testing.T) {
	var files []rollout.File
	for i := range 3 {
		files = append(files, rollout.File{Path: fmt.Sprintf("m%d.yaml", i), Data: []byte(modelDoc(i, 0))})
	}
	var cache rollout.Cache // what rollout.LoadData uses, private to this test
	first, err := cache.LoadData(files)
	if err != nil {
		t.Fatal(err)
	}
	eff := effectiveRollout(first.Rollouts[1], &store.Rollback{Traffic: map[string]int{"v3": 100}})
	if eff == first.Rollouts[1] || !eff.Closed["v1"] || eff.Traffic["v3"] != 100 {
		t.Fatalf("rollback target: %+v", eff)
	}
	again, err := cache.LoadData(files)
	if err != nil {
		t.Fatal(err)
	}
	r := again.Rollouts[1]
	if r != first.Rollouts[1] {
		t.Fatal("the second load parsed an unchanged file again (the cache is not used)")
	}
	if r.Closed != nil || !cmp.Equal(r.Traffic, map[string]int{"v1": 90, "v2": 10, "v3": 0, "v4": 0, "v5": 0}) {
		t.Errorf("the shared rollout was changed by a rollback: traffic %v, closed %v", r.Traffic, r.Closed)
	}
}
