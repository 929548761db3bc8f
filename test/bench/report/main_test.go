package main

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestReportFromCapturedOutput feeds a captured `go test -bench` output of every suite
// (testdata/bench-output.txt) through the parser, the table and the chart data.
func TestReportFromCapturedOutput(t *testing.T) {
	b, err := os.ReadFile("testdata/bench-output.txt")
	if err != nil {
		t.Fatal(err)
	}
	rows := buildRows(parse(string(b)))
	if len(rows) == 0 {
		t.Fatal("no rows")
	}
	tbl := table(rows)
	for _, r := range rows {
		if r.better != "higher" && r.better != "lower" {
			t.Errorf("row %q: better = %q, want higher or lower", r.what, r.better)
		}
		if !r.ok {
			t.Errorf("row %q: not measured from the captured output", r.what)
		}
		if !strings.Contains(tbl, "| "+r.what+" |") || !strings.Contains(tbl, "| "+r.valueText()+" | "+r.better+" |") {
			t.Errorf("row %q: missing from the table with its value and direction", r.what)
		}
	}
	ps := panels(rows)
	plotted := 0
	for _, p := range ps {
		if len(p.names) != len(p.values) || len(p.labels) != len(p.values) || len(p.goals) != len(p.values) {
			t.Fatalf("panel %s: ragged data", p.unit)
		}
		for i, v := range p.values {
			plotted++
			if v < p.min || v > p.max || p.goals[i] < p.min || p.goals[i] > p.max {
				t.Errorf("panel %s, bar %q: value %v or goal %v outside the axis [%v, %v]", p.unit, p.names[i], v, p.goals[i], p.min, p.max)
			}
			if !strings.Contains(p.labels[i], "is better") {
				t.Errorf("panel %s, bar %q: label %q does not say which way is better", p.unit, p.names[i], p.labels[i])
			}
		}
		if p.unit == "ratio" && (1 < p.min || 1 > p.max) {
			t.Errorf("%s: axis [%v, %v] clips the reference line at 1", p.title, p.min, p.max)
		}
	}
	if plotted != len(rows) {
		t.Errorf("%d bars plotted for %d rows", plotted, len(rows))
	}
	for _, r := range rows {
		found := false
		for _, p := range ps {
			for i, n := range p.names {
				if n == short(r.what) && p.unit == r.unit && strings.HasPrefix(p.labels[i], r.valueText()) {
					found = true
				}
			}
		}
		if !found {
			t.Errorf("row %q (%s) has no bar labelled with its value", r.what, r.valueText())
		}
	}
	// Rows this issue depends on: BenchmarkDecide's time and allocations, and the
	// batching row as the ratio of the two medians it prints (40395 off, 28463 on).
	want := map[string]string{
		"ext_proc decision alone (BenchmarkDecide): time":                                                 "311 ns/decision",
		"ext_proc decision alone (BenchmarkDecide): allocations":                                          "0 allocs/decision",
		"batching on vs off, 64 clients, XGBoost ranker (CPU, ~0.3 µs/row) (ratio of median throughputs)": "0.70",
	}
	for _, r := range rows {
		if w, ok := want[r.what]; ok {
			if r.valueText() != w {
				t.Errorf("row %q = %q, want %q", r.what, r.valueText(), w)
			}
			delete(want, r.what)
		}
	}
	for w := range want {
		t.Errorf("no row %q", w)
	}
	// The ext_proc rows say the binary ran as shipped, against the tuned floor.
	for _, what := range []string{extprocThroughputRow, extprocCPURow} {
		if !strings.Contains(tbl, "| "+what+" |") || !strings.Contains(what, "as shipped") {
			t.Errorf("no ext_proc row %q saying as shipped", what)
		}
	}
	if !strings.Contains(tbl, "`patchbay extproc` as shipped") || !strings.Contains(tbl, "tuned floor") {
		t.Error("the ext_proc rows do not name the shipped binary and the tuned floor")
	}
	if err := drawPanels(filepath.Join(t.TempDir(), "figures.png"), ps); err != nil {
		t.Fatal(err)
	}
}

// TestSuitesHeader checks the suite list includes BenchmarkDecide with -benchmem.
func TestSuitesHeader(t *testing.T) {
	for _, s := range suites {
		if s.pkg == "./extproc/internal/assign/" {
			if !s.benchmem || !strings.Contains(s.command(), "-benchmem") || !strings.Contains(s.command(), "BenchmarkDecide") {
				t.Errorf("Decide suite command %q lacks -benchmem or the benchmark", s.command())
			}
			return
		}
	}
	t.Error("no BenchmarkDecide suite")
}

func TestTrimProcs(t *testing.T) {
	for in, want := range map[string]string{"BenchmarkDecide-2": "BenchmarkDecide", "BenchmarkDecide": "BenchmarkDecide",
		"BenchmarkExtprocDown/blackholed-bare-2": "BenchmarkExtprocDown/blackholed-bare", "BenchmarkBatching/accel-16": "BenchmarkBatching/accel"} {
		if got := trimProcs(in); got != want {
			t.Errorf("trimProcs(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestScaleRows checks the control plane's rows against models and clients (captured
// xdsscale and fanout output) and the cost-against-scale figure's data.
func TestScaleRows(t *testing.T) {
	b, err := os.ReadFile("testdata/bench-output.txt")
	if err != nil {
		t.Fatal(err)
	}
	all := parse(string(b))
	rows := buildRows(all)
	want := map[string]string{
		"route bytes sent for a one-model edit, 1,000 models":                                                                                  "12.4 KB",
		"route matchers a request for the last model passes through, 1,000 models":                                                             "10 matchers",
		"route matchers per request (ideal 1: lookup independent of models), 1,000 / 100 models":                                               "1.00",
		"route matchers per request in the flat table before Scoped RDS (reference), 1,000 / 100 models":                                       "10.06",
		"burst of 1,000 file edits in 1 s (1,000 models; 700 files, some edited 4 times): pushes an Envoy delta client received, no edit lost": "1 pushes",
		"fan-out: split edit → every client, 1000 model(s) × 100 clients: server RSS per connected client":                                     "",
		"one-model edit → Envoy delta client, 1,000 models × 5 versions (p50)":                                                                 "",
		"fan-out: split edit → every client, 1 model(s) × 1000 clients: p99 / 1 model × 100 clients":                                           "",
	}
	for _, r := range rows {
		if w, ok := want[r.what]; ok {
			if !r.ok || (w != "" && r.valueText() != w) {
				t.Errorf("row %q = %q (measured %v), want %q", r.what, r.valueText(), r.ok, w)
			}
			delete(want, r.what)
		}
		if strings.Contains(r.what, "10,000 models") {
			t.Errorf("row %q for a size that did not run", r.what)
		}
	}
	for w := range want {
		t.Errorf("no row %q", w)
	}
	models, clients := scaleSeries(all)
	if len(models) != 6 || len(clients) != 2 {
		t.Fatalf("scale figure: %d model series, %d client series; want 6 and 2", len(models), len(clients))
	}
	for _, s := range models {
		if len(s.xys) != 2 || s.xys[0].Y != 1 {
			t.Errorf("series %q = %v: want 100 and 1,000 models, the first at 1 (the baseline)", s.name, s.xys)
		}
	}
	if got := len(clients[1].xys); got != 4 {
		t.Errorf("1,000-model fan-out series has %d points, want 4 (100, 1,000, 5,000, 20,000 clients)", got)
	}
	if pc := perClientSeries(all); len(pc) != 3 || len(pc[0].xys) != 4 {
		t.Errorf("per-client cost series %v: want 3 series of 4 points", pc)
	}
	if err := drawScale(filepath.Join(t.TempDir(), "scale.png"), all); err != nil {
		t.Fatal(err)
	}
}

// TestScaleFigureWithoutData: a run where the scale benchmarks did not run still draws
// the figure (empty panels say so) instead of failing on log axes without data.
func TestScaleFigureWithoutData(t *testing.T) {
	if err := drawScale(filepath.Join(t.TempDir(), "scale.png"), nil); err != nil {
		t.Fatal(err)
	}
}

// TestFeatureRows: the feature assembly rows (per request and per batch, 1 and 64
// clients) carry the same run's client/assembled ratio and say higher is better; without
// redis-server the suite is not run and each row says so.
func TestFeatureRows(t *testing.T) {
	b, err := os.ReadFile("testdata/bench-output.txt")
	if err != nil {
		t.Fatal(err)
	}
	all := parse(string(b))
	var got []row
	for _, r := range buildRows(all) {
		if strings.HasPrefix(r.what, "feature assembly") {
			got = append(got, r)
		}
	}
	if len(got) != 4 {
		t.Fatalf("%d feature assembly rows, want 4 (per request and per batch, 1 and 64 clients)", len(got))
	}
	for i, want := range []struct {
		mode, bench string
		clients     string
	}{{"per request", "request", "1 client "}, {"per request", "request", "64 clients"}, {"per dynamic batch", "batch", "1 client "}, {"per dynamic batch", "batch", "64 clients"}} {
		r := got[i]
		b := "BenchmarkFeatureAssembly/" + want.bench + "/clients=" + strings.Fields(want.clients)[0]
		v, ok := get(all, b, "ratio-redis")
		if !ok || !r.ok || r.value != v || r.better != "higher" || r.unit != "ratio" {
			t.Errorf("row %q: value %v ok %v better %s, want the captured %s ratio-redis %v, higher", r.what, r.value, r.ok, r.better, b, v)
		}
		if !strings.Contains(r.what, want.mode) || !strings.Contains(r.what, want.clients) {
			t.Errorf("row %d is %q, want %s at %s", i, r.what, want.mode, want.clients)
		}
		if !strings.Contains(r.baseline, "client sends the features") || !strings.Contains(r.figure, "round trips/req") {
			t.Errorf("row %q: baseline %q, figure %q", r.what, r.baseline, r.figure)
		}
	}
	missing := append(all[:len(all):len(all)], result{name: "FeatureAssembly", skipped: "redis-server missing"})
	for i := range missing {
		if strings.HasPrefix(missing[i].name, "BenchmarkFeatureAssembly") {
			missing[i].name = "dropped"
		}
	}
	for _, r := range buildRows(missing) {
		if strings.HasPrefix(r.what, "feature assembly") && (r.ok || r.valueText() != "not measured: redis-server missing") {
			t.Errorf("row %q without redis-server: %q", r.what, r.valueText())
		}
	}
	names := map[string]bool{}
	for _, r := range got {
		names[short(r.what)] = true
	}
	if len(names) != 4 {
		t.Errorf("the 4 rows' chart labels are not distinct: %v", names)
	}
	for _, s := range suites {
		if s.pkg == "./modelhost/" && (s.needs != "redis-server" || !strings.Contains(s.command(), "-bench 'FeatureAssembly'")) {
			t.Errorf("feature suite %q needs %q", s.command(), s.needs)
		}
	}
}

// TestONNXRows: the ONNX rows (the shipped host vs ONNX Runtime called directly, per
// model; batching on vs off) come from the captured output with their values, the gRPC
// rows with the 0.9 goal; when the benchmarks skipped for want of the library
// (captured `go test -v` output) every row says so; the suite runs with -v so the skip
// reaches the report.
func TestONNXRows(t *testing.T) {
	b, err := os.ReadFile("testdata/bench-output.txt")
	if err != nil {
		t.Fatal(err)
	}
	all := parse(string(b))
	var got []row
	for _, r := range buildRows(all) {
		if strings.HasPrefix(r.what, "ONNX host") {
			got = append(got, r)
		}
	}
	want := []struct {
		bench, unit, contains string
		goal                  float64
	}{
		{"BenchmarkONNXInfer/model=mlp", "grpc-ratio", "gRPC infer at batch 1, fixture MLP", 0.9},
		{"BenchmarkONNXInfer/model=mlp", "rest-ratio", "REST infer at batch 1, fixture MLP", 0},
		{"BenchmarkONNXInfer/model=mlp", "grpc-floor-ratio", "no-op grpc-go + direct", 0},
		{"BenchmarkONNXInfer/model=mlp-large", "grpc-ratio", "gRPC infer at batch 1, MLP 256-1024-1024-1024-10", 0.9},
		{"BenchmarkONNXInfer/model=mlp-large", "rest-ratio", "REST infer at batch 1, MLP 256", 0},
		{"BenchmarkONNXInfer/model=mlp-large", "grpc-floor-ratio", "no-op grpc-go + direct", 0},
		{"BenchmarkONNXBatching/model=mlp", "ratio", "batching on vs off, 64 REST clients, fixture MLP", 0},
		{"BenchmarkONNXBatching/model=mlp-large", "ratio", "batching on vs off, 64 REST clients, MLP 256", 0},
	}
	if len(got) != len(want) {
		t.Fatalf("%d ONNX rows, want %d", len(got), len(want))
	}
	for i, w := range want {
		r := got[i]
		v, ok := get(all, w.bench, w.unit)
		if !ok || !r.ok || r.value != v || r.better != "higher" || r.unit != "ratio" || r.goal != w.goal {
			t.Errorf("row %q: value %v ok %v better %s goal %v, want the captured %s %s %v, higher, goal %v", r.what, r.value, r.ok, r.better, r.goal, w.bench, w.unit, v, w.goal)
		}
		if !strings.Contains(r.what, w.contains) {
			t.Errorf("row %d is %q, want it to say %q", i, r.what, w.contains)
		}
	}
	if !strings.Contains(got[0].figure, "inside the host") || !strings.Contains(got[0].baseline, "ONNX Runtime called directly") {
		t.Errorf("gRPC row: figure %q, baseline %q", got[0].figure, got[0].baseline)
	}

	skipped := `pkg: github.com/patchbay-io/patchbay/test/bench/onnx
BenchmarkONNXInfer
    bench_test.go:81: skipped: ONNX Runtime library not found: run ` + "`make onnxruntime`" + ` in the patchbay repository
--- SKIP: BenchmarkONNXInfer
BenchmarkONNXBatching
    bench_test.go:81: skipped: ONNX Runtime library not found: run ` + "`make onnxruntime`" + ` in the patchbay repository
--- SKIP: BenchmarkONNXBatching
PASS
`
	n := 0
	for _, r := range buildRows(parse(skipped)) {
		if strings.HasPrefix(r.what, "ONNX host") {
			n++
			if r.ok || r.valueText() != "not measured: ONNX Runtime library missing (make onnxruntime)" {
				t.Errorf("row %q without the library: %q", r.what, r.valueText())
			}
		}
	}
	if n != len(want) {
		t.Errorf("%d ONNX rows without the library, want %d", n, len(want))
	}
	for _, s := range suites {
		if s.pkg == "./test/bench/onnx/" && !strings.Contains(s.command(), "-bench 'ONNXInfer|ONNXBatching'") || s.pkg == "./test/bench/onnx/" && !slices.Contains(s.args(), "-v") {
			t.Errorf("ONNX suite: %s (want -bench 'ONNXInfer|ONNXBatching' and -v)", s.command())
		}
	}
}
