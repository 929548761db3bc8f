package rollout

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
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
