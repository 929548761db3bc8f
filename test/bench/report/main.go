// Command report runs patchbay's benchmarks, each of which measures a baseline in the same
// run, and writes one Markdown report plus a PNG chart of the ratios:
//
//	go run ./test/bench/report -out docs/bench
//
// It is a measurement tool, never a pass/fail test. Run it from the repository root.
package main

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

// suite is one `go test -bench` invocation.
type suite struct {
	title string
	pkg   string
	bench string
	time  string
}

var suites = []suite{
	{"control plane", "./xds/", "Translate1000x3|EditToRoute|MemoryPer1000Models", "1x"},
	{"ext_proc vs floor, mTLS on vs off", "./test/bench/extproc/", "ExtprocVsFloor|ExtprocMTLS", "1x"},
	{"model host", "./test/bench/modelhost/", ".", "2000x"},
	{"whole chain", "./test/e2e/", ".", "1x"},
	{"ext_proc down (test model of Envoy honouring the bootstrap's ext_proc health check and outlier detection)", "./test/bench/extprocdown/", "ExtprocDown", "1x"},
}

// result is one benchmark line: its name and metrics by unit.
type result struct {
	name    string
	metrics map[string]float64
	logs    []string
}

func main() {
	out := flag.String("out", "docs/bench", "output directory")
	flag.Parse()
	if err := run(*out); err != nil {
		fmt.Fprintln(os.Stderr, "report:", err)
		os.Exit(1)
	}
}

func run(out string) error {
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	var (
		all []result
		raw bytes.Buffer
	)
	for _, s := range suites {
		fmt.Fprintf(os.Stderr, "running %s (%s)...\n", s.title, s.pkg)
		cmd := exec.Command("go", "test", "-run", "^$", "-bench", s.bench, "-benchtime", s.time, "-count", "1", s.pkg)
		var buf bytes.Buffer
		cmd.Stdout, cmd.Stderr = &buf, &buf
		err := cmd.Run()
		fmt.Fprintf(&raw, "### %s: `go test -run '^$' -bench '%s' -benchtime %s %s`\n\n```\n", s.title, s.bench, s.time, s.pkg)
		for _, l := range strings.Split(buf.String(), "\n") {
			if strings.HasPrefix(strings.TrimSpace(l), "{") {
				continue // process JSON logs
			}
			raw.WriteString(l + "\n")
		}
		raw.WriteString("```\n\n")
		if err != nil {
			fmt.Fprintf(&raw, "(suite failed: %v)\n\n", err)
		}
		all = append(all, parse(buf.String())...)
	}
	get := func(bench, unit string) (float64, bool) {
		for _, r := range all {
			if strings.HasPrefix(r.name, bench) {
				v, ok := r.metrics[unit]
				return v, ok
			}
		}
		return 0, false
	}
	type row struct {
		what, figure, baseline, ratio, goal string
		ratioV                              float64
		goalV                               float64
	}
	var rows []row
	add := func(what, bench, unit, figure, baseline string, goal float64) {
		v, ok := get(bench, unit)
		r := row{what: what, figure: figure, baseline: baseline, ratio: "not measured", goalV: goal}
		if ok {
			r.ratio, r.ratioV = fmt.Sprintf("%.2f", v), v
		}
		if goal > 0 {
			r.goal = fmt.Sprintf("≥ %.2f", goal)
		}
		rows = append(rows, r)
	}
	f := func(bench, unit, format string) string {
		v, ok := get(bench, unit)
		if !ok {
			return "—"
		}
		return fmt.Sprintf(format, v)
	}
	add("ext_proc throughput, one stream per request, 16 workers", "BenchmarkExtprocVsFloor", "throughput-ratio",
		"patchbay ext_proc", "trivial ext_proc floor server (fixed answer, same shape)", 0.9)
	add("ext_proc CPU per decision (floor/patchbay)", "BenchmarkExtprocVsFloor", "cpu-efficiency-ratio",
		f("BenchmarkExtprocVsFloor", "patchbay-cpu-us/decision", "%.2f µs/decision"), f("BenchmarkExtprocVsFloor", "floor-cpu-us/decision", "floor %.2f µs"), 0.9)
	add("ext_proc with mTLS: throughput, TLS on / off", "BenchmarkExtprocMTLS", "mtls-throughput-ratio",
		"`patchbay extproc --tls-cert --tls-key --client-ca`", "the same binary in plaintext", 0)
	add("ext_proc with mTLS: CPU per decision, TLS on / off (above 1: TLS costs more)", "BenchmarkExtprocMTLS", "mtls-cpu-ratio",
		f("BenchmarkExtprocMTLS", "mtls-cpu-us/decision", "%.2f µs/decision"), f("BenchmarkExtprocMTLS", "plain-cpu-us/decision", "plaintext %.2f µs"), 0)
	add("REST infer, 16 floats", "BenchmarkRESTInfer", "ratio",
		f("BenchmarkRESTInfer", "modelhost-ns/req", "%.0f ns/req"), f("BenchmarkRESTInfer", "baseline-ns/req", "bare net/http echo %.0f ns"), 0.7)
	add("gRPC ModelInfer, 16 floats", "BenchmarkGRPCInfer", "ratio",
		f("BenchmarkGRPCInfer", "modelhost-ns/req", "%.0f ns/req"), f("BenchmarkGRPCInfer", "baseline-ns/req", "no-op grpc-go unary %.0f ns"), 0.8)
	for _, obj := range []string{"binary", "regression", "multiclass"} {
		b := "BenchmarkXGBoostVsReference/" + obj
		add("XGBoost per row vs XGBoost itself, "+obj, b, "ratio",
			f(b, "ns/row", "%.0f ns/row"), f(b, "xgboost-ns/row", "xgboost (python3-xgboost, 1 thread) %.0f ns/row"), 1.0)
	}
	for _, m := range []struct{ name, what string }{
		{"ranker", "XGBoost ranker (CPU, ~0.3 µs/row)"},
		{"accel", "model with a 200 µs fixed cost per call"},
	} {
		b := "BenchmarkBatching/" + m.name
		add("batching on vs off, 64 clients, "+m.what, b, "ratio",
			f(b, "batched-req/s", "%.0f req/s"), f(b, "unbatched-req/s", "off %.0f req/s"), 0)
	}
	add("chain throughput kept vs host direct", "BenchmarkChainVsDirect", "throughput-kept-ratio",
		f("BenchmarkChainVsDirect", "chain-req/s", "%.0f req/s")+", +"+f("BenchmarkChainVsDirect", "added-p50-us", "%.0f µs")+" p50, +"+f("BenchmarkChainVsDirect", "added-p99-us", "%.0f µs")+" p99",
		f("BenchmarkChainVsDirect", "direct-req/s", "direct %.0f req/s"), 0)
	add("translate+validate 1,000 models × 3 versions", "BenchmarkTranslate1000x3", "build/bare-ratio",
		f("BenchmarkTranslate1000x3", "build-ms/op", "%.0f ms"), f("BenchmarkTranslate1000x3", "bare-translate-ms/op", "bare translation %.0f ms"), 0)
	add("control-plane heap, 1,000 models", "BenchmarkMemoryPer1000Models", "ratio",
		f("BenchmarkMemoryPer1000Models", "control-plane-MiB/1000-models", "%.1f MiB"), f("BenchmarkMemoryPer1000Models", "rollouts-MiB", "parsed rollouts %.1f MiB"), 0)

	var md strings.Builder
	fmt.Fprintf(&md, "# patchbay benchmark report\n\nTaken %s on %s; Go %s; commit %s.\n", time.Now().UTC().Format("2006-01-02 15:04 MST"), machine(), runtime.Version(), commit())
	md.WriteString("Every figure comes with a baseline measured in the same run; ratios above 1 favour patchbay unless noted. " +
		"These are measurements, not pass/fail tests. The chain figures use `test/envoymodel` (a test model of Envoy, a Go reverse proxy) in Envoy's place: no Envoy binary can be installed here.\n\n")
	md.WriteString("| what | figure | baseline (same run) | ratio | goal |\n|---|---|---|---|---|\n")
	for _, r := range rows {
		fmt.Fprintf(&md, "| %s | %s | %s | %s | %s |\n", r.what, r.figure, r.baseline, r.ratio, r.goal)
	}
	fmt.Fprintf(&md, "\n| latency | p50 | p99 | baseline |\n|---|---|---|---|\n")
	fmt.Fprintf(&md, "| rollout edit → grpc-go client routes on it | %s | %s | one RPC p50 %s |\n",
		f("BenchmarkEditToRoute", "edit-to-route-p50-ms", "%.1f ms"), f("BenchmarkEditToRoute", "edit-to-route-p99-ms", "%.1f ms"), f("BenchmarkEditToRoute", "rpc-p50-ms", "%.2f ms"))
	fmt.Fprintf(&md, "| rollout edit → traffic moved through the chain | %s | %s | one request p50 %s |\n",
		f("BenchmarkEditToTrafficMoved", "p50-ms", "%.1f ms"), f("BenchmarkEditToTrafficMoved", "p99-ms", "%.1f ms"), f("BenchmarkEditToTrafficMoved", "request-p50-ms", "%.2f ms"))
	for _, c := range []struct{ bench, what string }{
		{"BenchmarkExtprocDown/killed", "request with ext_proc killed, after detection (detected in " + f("BenchmarkExtprocDown/killed", "detect-ms", "%.0f ms") + ")"},
		{"BenchmarkExtprocDown/blackholed", "request with ext_proc black-holed, after detection (detected in " + f("BenchmarkExtprocDown/blackholed", "detect-ms", "%.0f ms") + ")"},
	} {
		fmt.Fprintf(&md, "| %s | %s | %s | ext_proc healthy, same run: p50 %s, p99 %s (added p99 %s) |\n", c.what,
			f(c.bench, "down-p50-µs", "%.0f µs"), f(c.bench, "down-p99-µs", "%.0f µs"),
			f(c.bench, "healthy-p50-µs", "%.0f µs"), f(c.bench, "healthy-p99-µs", "%.0f µs"), f(c.bench, "added-p99-µs", "%.0f µs"))
	}
	if us, ok := get("BenchmarkExtprocVsFloor", "patchbay-cpu-us/decision"); ok && us > 0 {
		fmt.Fprintf(&md, "\nDecisions per second per core (server CPU only, gRPC included): %.0f.\n", 1e6/us)
	}
	md.WriteString("\n![ratios](ratios.png)\n\n## Raw output\n\n")
	md.WriteString(raw.String())
	if err := os.WriteFile(filepath.Join(out, "report.md"), []byte(md.String()), 0o644); err != nil {
		return err
	}
	var bars plotter.Values
	var names []string
	for _, r := range rows {
		if r.ratioV > 0 && r.goalV > 0 {
			bars = append(bars, r.ratioV/r.goalV)
			names = append(names, short(r.what))
		}
	}
	return chart(filepath.Join(out, "ratios.png"), bars, names)
}

func chart(path string, vals plotter.Values, names []string) error {
	p := plot.New()
	p.Title.Text = "patchbay vs same-run baselines: ratio / goal (at or above the line meets the goal)"
	p.Y.Label.Text = "ratio / goal"
	if len(vals) == 0 {
		vals, names = plotter.Values{0}, []string{"no data"}
	}
	bars, err := plotter.NewBarChart(vals, vg.Points(28))
	if err != nil {
		return err
	}
	p.Add(bars)
	one, err := plotter.NewLine(plotter.XYs{{X: -0.5, Y: 1}, {X: float64(len(vals)) - 0.5, Y: 1}})
	if err != nil {
		return err
	}
	p.Add(one)
	p.NominalX(names...)
	p.X.Tick.Label.Rotation = 0.35
	p.X.Tick.Label.XAlign = -0.9
	return p.Save(9*vg.Inch, 5*vg.Inch, path)
}

func short(s string) string {
	s = strings.NewReplacer("XGBoost per row vs XGBoost itself, ", "xgb ", "ext_proc ", "extproc ", " (floor/patchbay)", "",
		", one stream per request, 16 workers", "", ", 16 floats", "").Replace(s)
	return s
}

// parse reads `go test -bench` output: result lines and the log lines under them.
func parse(out string) []result {
	var res []result
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "Benchmark") {
			fields := strings.Fields(line)
			if len(fields) < 3 {
				continue
			}
			r := result{name: fields[0], metrics: map[string]float64{}}
			for i := 2; i+1 < len(fields); i += 2 {
				if v, err := strconv.ParseFloat(fields[i], 64); err == nil {
					r.metrics[fields[i+1]] = v
				}
			}
			res = append(res, r)
		}
	}
	return res
}

func machine() string {
	model := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				model = strings.TrimSpace(strings.SplitN(l, ":", 2)[1])
				break
			}
		}
	}
	mem := ""
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		if f := strings.Fields(strings.SplitN(string(b), "\n", 2)[0]); len(f) >= 2 {
			if kb, err := strconv.ParseFloat(f[1], 64); err == nil {
				mem = fmt.Sprintf(", %.0f GiB", kb/(1<<20))
			}
		}
	}
	return fmt.Sprintf("%d × %s%s", runtime.NumCPU(), model, mem)
}

func commit() string {
	b, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(b))
}
