package rollout

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// scaleModels is the directory size of the scale benchmarks: issue 13's 10,000 models.
const scaleModels = 10_000

// scaleDoc is model i's rollout in the shape test/bench/xdsscale generates (ModelDoc): five
// versions, one REST endpoint each on its own IP, a canary split on two of them.
func scaleDoc(i, edit int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: model-%05d\nversions:\n", i)
	for v := 1; v <= 5; v++ {
		fmt.Fprintf(&b, "  - name: v%d\n    endpoints: [\"10.%d.%d.%d:8000\"]\n", v, i/250, i%250, v)
	}
	shift := edit % 10
	fmt.Fprintf(&b, "traffic: {v1: %d, v2: %d, v3: 0, v4: 0, v5: 0}\n", 90-shift, 10+shift)
	return b.String()
}

func writeScaleDir(tb testing.TB, n int) string {
	tb.Helper()
	dir := tb.TempDir()
	for i := range n {
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("model-%05d.yaml", i)), []byte(scaleDoc(i, 0)), 0o644); err != nil {
			tb.Fatal(err)
		}
	}
	return dir
}

// BenchmarkReadDirLoadData is the baseline: every file read and parsed on every call.
func BenchmarkReadDirLoadData(b *testing.B) {
	dir := writeScaleDir(b, scaleModels)
	b.ResetTimer()
	for b.Loop() {
		files, err := ReadDir(dir)
		if err != nil {
			b.Fatal(err)
		}
		set, err := LoadData(files)
		if err != nil || len(set.Rollouts) != scaleModels {
			b.Fatalf("LoadData: %v", err)
		}
	}
}

// BenchmarkReadLoadOneEdit is a reload after a one-model edit at 10,000 files: a DirReader
// read (only changed or racy files read from disk) and a Cache load (only changed files
// parsed), against a plain ReadDir+LoadData measured in the same run (baseline-ns/op).
// ratio is baseline / this: how many times cheaper a reload got. The files are written
// RacyWindow before the clock starts, as a directory that has been in place for a while;
// files edited by the loop in the last RacyWindow are read again every time (the racy rule).
func BenchmarkReadLoadOneEdit(b *testing.B) {
	dir := writeScaleDir(b, scaleModels)
	time.Sleep(RacyWindow)
	var baseline time.Duration
	const baselineRuns = 3
	for range baselineRuns {
		start := time.Now()
		files, err := ReadDir(dir)
		if err != nil {
			b.Fatal(err)
		}
		if set, err := loadData(files, parseOnly); err != nil || len(set.Rollouts) != scaleModels {
			b.Fatalf("LoadData: %v", err)
		}
		baseline += time.Since(start)
	}
	baseline /= baselineRuns

	d := &DirReader{Dir: dir}
	var c Cache
	if files, err := d.Read(); err != nil {
		b.Fatal(err)
	} else if _, err := c.LoadData(files); err != nil {
		b.Fatal(err)
	}
	edit := 0
	b.ResetTimer()
	for b.Loop() {
		b.StopTimer()
		edit++
		i := edit * 7919 % scaleModels
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("model-%05d.yaml", i)), []byte(scaleDoc(i, edit)), 0o644); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		files, err := d.Read()
		if err != nil {
			b.Fatal(err)
		}
		set, err := c.LoadData(files)
		if err != nil || len(set.Rollouts) != scaleModels {
			b.Fatalf("LoadData: %v", err)
		}
		if got := set.Rollouts[i].Traffic["v2"]; got != 10+edit%10 {
			b.Fatalf("edit %d not seen: v2 = %d", edit, got)
		}
	}
	b.StopTimer()
	per := b.Elapsed() / time.Duration(b.N)
	b.ReportMetric(float64(baseline.Nanoseconds()), "baseline-ns/op")
	b.ReportMetric(float64(baseline)/float64(per), "ratio")
	b.Logf("10,000 files, one-model edit: ReadDir+LoadData %v, DirReader+Cache %v: %.1fx cheaper", baseline, per, float64(baseline)/float64(per))
}
