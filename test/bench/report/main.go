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
	"image/color"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// suite is one `go test -bench` invocation.
type suite struct {
	title    string
	pkg      string
	bench    string
	time     string
	benchmem bool
	needs    string // a program the suite needs on PATH; without it the suite is not run
}

// args is the suite's `go test` command line after "go".
func (s suite) args() []string {
	a := []string{"test", "-run", "^$", "-bench", s.bench, "-benchtime", s.time, "-count", "1"}
	if verbose[s.pkg] {
		a = append(a, "-v")
	}
	if s.benchmem {
		a = append(a, "-benchmem")
	}
	return append(a, s.pkg)
}

// command is the suite's command line as a person would type it.
func (s suite) command() string {
	a := s.args()
	a[2], a[4] = "'^$'", "'"+s.bench+"'"
	return "go " + strings.Join(a, " ")
}

// verbose packages run with -v, so a benchmark's skip and its reason reach the report
// (parse records them; without -v `go test` prints nothing for a skipped benchmark).
var verbose = map[string]bool{"./test/bench/onnx/": true}

// suites are every suite `make bench` runs; the report's header lists them again.
var suites = []suite{
	{"control plane", "./xds/", "Translate1000x3|EditToRoute|MemoryPer1000Models", "1x", false, ""},
	{"ext_proc decision alone", "./extproc/internal/assign/", "^BenchmarkDecide$", "1s", true, ""},
	{"ext_proc vs floor, mTLS on vs off", "./test/bench/extproc/", "ExtprocVsFloor|ExtprocMTLS", "1x", false, ""},
	{"model host", "./test/bench/modelhost/", ".", "2000x", false, ""},
	{"feature assembly (a real redis-server; client-sent features vs the host assembling them, per request and per dynamic batch)", "./modelhost/", "FeatureAssembly", "1000x", false, "redis-server"},
	{"whole chain", "./test/e2e/", ".", "1x", false, ""},
	{"ext_proc down (test model of Envoy honouring the bootstrap's ext_proc health check and outlier detection)", "./test/bench/extprocdown/", "ExtprocDown", "1x", false, ""},
	{"control plane against models and a burst of 1,000 edits (the shipped binary, 100 and 1,000 models; 10,000 with PATCHBAY_BENCH_LARGE=1)", "./test/bench/xdsscale/", "XDSScale|Burst", "1x", false, ""},
	{"ONNX model host (the shipped binary) vs ONNX Runtime called directly", "./test/bench/onnx/", "ONNXInfer|ONNXBatching", "1000x", false, ""},
	{"control plane fan-out to simulated ADS clients and a restart under 1,000 clients (the shipped binary; 1,000 models x 5,000/20,000 clients with PATCHBAY_BENCH_LARGE=1)", "./test/bench/fanout/", "^BenchmarkFanout$|^BenchmarkRestart$", "1x", false, ""},
}

// result is one benchmark line: its name and metrics by unit.
type result struct {
	name    string
	metrics map[string]float64
	skipped string // why the benchmark's suite did not run ("" when it did)
}

// row is one line of the report's table and one bar of its chart.
type row struct {
	what, figure, baseline string
	value                  float64 // the plotted value: a ratio, or a cost in unit
	ok                     bool    // false: not measured in this run
	why                    string  // why not measured, when known
	unit                   string  // "ratio", or the cost's unit ("ms", "µs", "ns/decision", ...)
	format                 string  // how value is printed, e.g. "%.2f"
	better                 string  // "higher" or "lower"
	goal                   float64 // 0: no goal; otherwise the goal for value (≥ when better is higher)
}

// valueText is the value as the table and the bar label print it.
func (r row) valueText() string {
	if !r.ok && r.why != "" {
		return "not measured: " + r.why
	}
	if !r.ok {
		return "not measured"
	}
	s := fmt.Sprintf(r.format, r.value)
	if r.unit != "ratio" {
		s += " " + r.unit
	}
	return s
}

// goalText is the goal as the table prints it.
func (r row) goalText() string {
	if r.goal == 0 {
		return ""
	}
	if r.better == "lower" {
		return fmt.Sprintf("≤ %.2f", r.goal)
	}
	return fmt.Sprintf("≥ %.2f", r.goal)
}

func main() {
	out := flag.String("out", "docs/bench", "output directory")
	only := flag.String("suites", "", "run only the suites whose title or package matches this regexp (try one section: -suites feature -out /tmp/bench)")
	flag.Parse()
	if *only != "" {
		re, err := regexp.Compile(*only)
		if err != nil {
			fmt.Fprintln(os.Stderr, "report: -suites:", err)
			os.Exit(2)
		}
		suites = slices.DeleteFunc(suites, func(s suite) bool { return !re.MatchString(s.title) && !re.MatchString(s.pkg) })
	}
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
		ran []string
	)
	for _, s := range suites {
		if s.needs != "" {
			if _, err := exec.LookPath(s.needs); err != nil {
				why := s.needs + " missing"
				fmt.Fprintf(os.Stderr, "not running %s: %s\n", s.title, why)
				ran = append(ran, fmt.Sprintf("%s — `%s` (**not run: %s**)", s.title, s.command(), why))
				all = append(all, result{name: strings.SplitN(s.bench, "|", 2)[0], skipped: why})
				continue
			}
		}
		fmt.Fprintf(os.Stderr, "running %s (%s)...\n", s.title, s.pkg)
		cmd := exec.Command("go", s.args()...)
		var buf bytes.Buffer
		cmd.Stdout, cmd.Stderr = &buf, &buf
		err := cmd.Run()
		fmt.Fprintf(&raw, "### %s: `%s`\n\n```\n", s.title, s.command())
		for _, l := range strings.Split(buf.String(), "\n") {
			if strings.HasPrefix(strings.TrimSpace(l), "{") {
				continue // process JSON logs
			}
			raw.WriteString(l + "\n")
		}
		raw.WriteString("```\n\n")
		status := "ok"
		if err != nil {
			fmt.Fprintf(&raw, "(suite failed: %v)\n\n", err)
			status = fmt.Sprintf("**failed: %v**", err)
		}
		ran = append(ran, fmt.Sprintf("%s — `%s` (%s)", s.title, s.command(), status))
		all = append(all, parse(buf.String())...)
	}
	rows := buildRows(all)

	var md strings.Builder
	fmt.Fprintf(&md, "# patchbay benchmark report\n\nTaken %s on %s; Go %s; commit %s.\n\n", time.Now().UTC().Format("2006-01-02 15:04 MST"), machine(), runtime.Version(), commit())
	fmt.Fprintf(&md, "The %d suites that ran, in order (these and no others):\n\n", len(ran))
	for i, s := range ran {
		fmt.Fprintf(&md, "%d. %s\n", i+1, s)
	}
	md.WriteString("\nEvery ratio comes with a baseline measured in the same run; the \"better\" column says which way is better for each row. " +
		"These are measurements, not pass/fail tests. The chain figures use `test/envoymodel` (a test model of Envoy, a Go reverse proxy) in Envoy's place: no Envoy binary can be installed here.\n\n")
	md.WriteString(table(rows))
	if us, ok := get(all, "BenchmarkExtprocVsFloor", "patchbay-cpu-us/decision"); ok && us > 0 {
		fmt.Fprintf(&md, "\nDecisions per second per core, `patchbay extproc` as shipped (server CPU only, gRPC included): %.0f.\n", 1e6/us)
	}
	md.WriteString("\n![every row of the table: ratios on one axis, each cost on its own](figures.png)\n\n")
	md.WriteString("Cost against scale: the control plane's costs against models (each over the same run's 100-model figure; dashed: the ideal 1 and linear growth), the fan-out p99 against connected clients, and the server's CPU and RSS per client against clients at 1,000 models (`test/bench/xdsscale`, `test/bench/fanout`; capacity plan: `docs/capacity.md`).\n\n![cost against scale](scale.png)\n\n## Raw output\n\n")
	md.WriteString(raw.String())
	if err := os.WriteFile(filepath.Join(out, "report.md"), []byte(md.String()), 0o644); err != nil {
		return err
	}
	// figures.png replaces the older ratios.png, which plotted only the rows with goals.
	_ = os.Remove(filepath.Join(out, "ratios.png"))
	if err := drawPanels(filepath.Join(out, "figures.png"), panels(rows)); err != nil {
		return err
	}
	return drawScale(filepath.Join(out, "scale.png"), all)
}

// series is one line of the scale figure: x (models or clients) against y.
type series struct {
	name string
	xys  plotter.XYs
}

// scaleSeries are the scale figure's lines: against models, each control-plane cost over
// the same run's 100-model figure; against clients, the fan-out p99 per model count.
func scaleSeries(all []result) (models, clients []series) {
	for _, c := range []struct{ name, unit string }{
		{"one-model edit time", "edit-p50-ms"}, {"route bytes per edit", "route-bytes/edit"},
		{"RSS", "rss-MiB"}, {"start → full config at a client", "full-start-s"}, {"route matchers per request", "rest-matchers"},
		{"matchers, flat table before Scoped RDS", "old-flat-matchers"},
	} {
		s := series{name: c.name}
		base, ok := get(all, "BenchmarkXDSScale/models=100", c.unit)
		for _, m := range []int{100, 1000, 10000} {
			if v, ok2 := get(all, fmt.Sprintf("BenchmarkXDSScale/models=%d", m), c.unit); ok && ok2 && base > 0 {
				s.xys = append(s.xys, plotter.XY{X: float64(m), Y: v / base})
			}
		}
		if len(s.xys) > 0 {
			models = append(models, s)
		}
	}
	for _, m := range []int{1, 1000} {
		s := series{name: fmt.Sprintf("p99, %d model(s)", m)}
		for _, c := range []int{100, 1000, 5000, 20000} {
			if v, ok := get(all, fmt.Sprintf("BenchmarkFanout/models=%d/clients=%d", m, c), "p99-ms"); ok {
				s.xys = append(s.xys, plotter.XY{X: float64(c), Y: v})
			}
		}
		if len(s.xys) > 0 {
			clients = append(clients, s)
		}
	}
	return models, clients
}

// perClientSeries are the fan-out's server costs per connected client at 1,000 models
// against clients: CPU for the edit and RSS.
func perClientSeries(all []result) []series {
	var out []series
	for _, c := range []struct{ name, unit string }{
		{"server CPU for the edit, µs per client", "edit-cpu-us/client"}, {"server RSS, KiB per client", "rss-KiB/client"},
		{"server CPU to connect and sync, µs per client", "connect-cpu-us/client"},
	} {
		s := series{name: c.name}
		for _, n := range []int{100, 1000, 5000, 20000} {
			if v, ok := get(all, fmt.Sprintf("BenchmarkFanout/models=1000/clients=%d", n), c.unit); ok && v > 0 {
				s.xys = append(s.xys, plotter.XY{X: float64(n), Y: v})
			}
		}
		if len(s.xys) > 0 {
			out = append(out, s)
		}
	}
	return out
}

// drawScale draws cost against scale: control-plane costs against models (× the 100-model
// figure, with the ideal 1 and linear growth drawn), fan-out p99 against clients, and the
// server's cost per client against clients at 1,000 models, on log axes, side by side in
// one PNG.
func drawScale(path string, all []result) error {
	models, clients := scaleSeries(all)
	perClient := perClientSeries(all)
	w, h := 18*vg.Inch, 5*vg.Inch
	img := vgimg.New(w, h)
	dc := draw.New(img)
	colors := []color.Color{color.RGBA{R: 200, A: 255}, color.RGBA{B: 200, A: 255}, color.RGBA{G: 150, A: 255},
		color.RGBA{R: 150, B: 150, A: 255}, color.RGBA{R: 200, G: 120, A: 255}, color.RGBA{G: 150, B: 170, A: 255}, color.Gray{Y: 60}}
	mk := func(title, xl, yl string, ss []series, ref bool) (*plot.Plot, error) {
		p := plot.New()
		p.Title.Text, p.X.Label.Text, p.Y.Label.Text = title, xl, yl
		if len(ss) == 0 {
			p.Title.Text += " (not measured in this run)"
			return p, nil
		}
		p.X.Scale, p.Y.Scale = plot.LogScale{}, plot.LogScale{}
		p.X.Tick.Marker, p.Y.Tick.Marker = plot.LogTicks{Prec: -1}, plot.LogTicks{Prec: -1}
		// Costs rise to the right: the legend goes where the lines are not.
		p.Legend.Top, p.Legend.Left = ref, ref
		for i, s := range ss {
			l, pts, err := plotter.NewLinePoints(s.xys)
			if err != nil {
				return nil, err
			}
			l.Color, pts.Color = colors[i%len(colors)], colors[i%len(colors)]
			p.Add(l, pts)
			p.Legend.Add(s.name, l, pts)
		}
		if ref && len(ss) > 0 {
			x0, x1 := ss[0].xys[0].X, ss[0].xys[len(ss[0].xys)-1].X
			for _, r := range []struct {
				name string
				xys  plotter.XYs
			}{{"ideal (1: independent of models)", plotter.XYs{{X: x0, Y: 1}, {X: x1, Y: 1}}},
				{"linear in models", plotter.XYs{{X: x0, Y: 1}, {X: x1, Y: x1 / x0}}}} {
				l, err := plotter.NewLine(r.xys)
				if err != nil {
					return nil, err
				}
				l.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
				if r.name != "ideal (1: independent of models)" {
					l.Color, l.Dashes = color.Gray{Y: 140}, []vg.Length{vg.Points(1), vg.Points(3)}
				}
				p.Add(l)
				p.Legend.Add(r.name, l)
			}
		}
		return p, nil
	}
	left, err := mk("control plane cost against models (× the 100-model figure)", "models (5 versions each)", "× 100-model figure", models, true)
	if err != nil {
		return err
	}
	right, err := mk("fan-out: split edit → every client, p99", "connected ADS clients", "p99 ms", clients, false)
	if err != nil {
		return err
	}
	third, err := mk("fan-out at 1,000 models: server cost per client", "connected ADS clients", "per client", perClient, false)
	if err != nil {
		return err
	}
	left.Draw(draw.Canvas{Canvas: dc.Canvas, Rectangle: vg.Rectangle{Min: vg.Point{}, Max: vg.Point{X: w / 3, Y: h}}})
	right.Draw(draw.Canvas{Canvas: dc.Canvas, Rectangle: vg.Rectangle{Min: vg.Point{X: w / 3}, Max: vg.Point{X: 2 * w / 3, Y: h}}})
	third.Draw(draw.Canvas{Canvas: dc.Canvas, Rectangle: vg.Rectangle{Min: vg.Point{X: 2 * w / 3}, Max: vg.Point{X: w, Y: h}}})
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// get finds bench's metric unit; bench is a benchmark name without the -GOMAXPROCS suffix.
func get(all []result, bench, unit string) (float64, bool) {
	for _, r := range all {
		if trimProcs(r.name) == bench {
			v, ok := r.metrics[unit]
			return v, ok
		}
	}
	return 0, false
}

// trimProcs drops the "-N" GOMAXPROCS suffix `go test` adds to benchmark names.
func trimProcs(name string) string {
	if i := strings.LastIndexByte(name, '-'); i > 0 {
		if _, err := strconv.Atoi(name[i+1:]); err == nil {
			return name[:i]
		}
	}
	return name
}

// The ext_proc rows compare the binary as users run it (no flags) with the best case.
const (
	extprocThroughputRow = "ext_proc as shipped, throughput, one stream per request, 16 workers (patchbay/floor)"
	extprocCPURow        = "ext_proc as shipped, CPU efficiency per decision (floor CPU/patchbay CPU)"
	floorBaseline        = "trivial ext_proc floor server (fixed answer, same shape), tuned: GOGC=800, 8 × GOMAXPROCS gRPC stream workers"
)

// buildRows turns the parsed results into the report's rows, in table order.
func buildRows(all []result) []row {
	var rows []row
	f := func(bench, unit, format string) string {
		v, ok := get(all, bench, unit)
		if !ok {
			return "—"
		}
		return fmt.Sprintf(format, v)
	}
	add := func(r row, v float64, ok bool) {
		r.value, r.ok = v, ok
		if r.format == "" {
			r.format = "%.2f"
		}
		rows = append(rows, r)
	}
	ratio := func(what, bench, unit, figure, baseline, better string, goal float64) {
		v, ok := get(all, bench, unit)
		add(row{what: what, figure: figure, baseline: baseline, unit: "ratio", better: better, goal: goal}, v, ok)
	}
	cost := func(what, bench, unit, shown, format, figure, baseline string) {
		v, ok := get(all, bench, unit)
		add(row{what: what, figure: figure, baseline: baseline, unit: shown, format: format, better: "lower"}, v, ok)
	}

	ratio(extprocThroughputRow, "BenchmarkExtprocVsFloor", "throughput-ratio",
		"`patchbay extproc` as shipped: the built binary, its address flags only, no GOGC/GOMEMLIMIT; median of per-round ratios "+f("BenchmarkExtprocVsFloor", "median-throughput-ratio", "%.2f"),
		floorBaseline, "higher", 0.9)
	ratio(extprocCPURow, "BenchmarkExtprocVsFloor", "cpu-efficiency-ratio",
		f("BenchmarkExtprocVsFloor", "patchbay-cpu-us/decision", "%.2f µs/decision as shipped")+"; median of per-round ratios "+f("BenchmarkExtprocVsFloor", "median-cpu-efficiency-ratio", "%.2f"),
		f("BenchmarkExtprocVsFloor", "floor-cpu-us/decision", "tuned floor %.2f µs"), "higher", 0.9)
	ratio("ext_proc with mTLS: throughput, TLS on / off", "BenchmarkExtprocMTLS", "mtls-throughput-ratio",
		"`patchbay extproc --tls-cert --tls-key --client-ca`", "the same binary in plaintext", "higher", 0)
	ratio("ext_proc with mTLS: CPU per decision, TLS on / off", "BenchmarkExtprocMTLS", "mtls-cpu-ratio",
		f("BenchmarkExtprocMTLS", "mtls-cpu-us/decision", "%.2f µs/decision"), f("BenchmarkExtprocMTLS", "plain-cpu-us/decision", "plaintext %.2f µs"), "lower", 0)
	cost("ext_proc decision alone (BenchmarkDecide): time", "BenchmarkDecide", "ns/op", "ns/decision", "%.0f",
		f("BenchmarkDecide", "B/op", "%.0f B/op"), "—")
	cost("ext_proc decision alone (BenchmarkDecide): allocations", "BenchmarkDecide", "allocs/op", "allocs/decision", "%.0f",
		f("BenchmarkDecide", "allocs/op", "%.0f allocs/op"), "—")
	ratio("REST infer, 16 floats (baseline/host time)", "BenchmarkRESTInfer", "ratio",
		f("BenchmarkRESTInfer", "modelhost-ns/req", "%.0f ns/req"), f("BenchmarkRESTInfer", "baseline-ns/req", "bare net/http echo %.0f ns"), "higher", 0.7)
	ratio("gRPC ModelInfer, 16 floats (baseline/host time)", "BenchmarkGRPCInfer", "ratio",
		f("BenchmarkGRPCInfer", "modelhost-ns/req", "%.0f ns/req"), f("BenchmarkGRPCInfer", "baseline-ns/req", "no-op grpc-go unary %.0f ns"), "higher", 0.8)
	for _, obj := range []string{"binary", "regression", "multiclass"} {
		b := "BenchmarkXGBoostVsReference/" + obj
		ratio("XGBoost per row vs XGBoost itself, "+obj+" (xgboost time/ours)", b, "ratio",
			f(b, "ns/row", "%.0f ns/row"), f(b, "xgboost-ns/row", "xgboost (python3-xgboost, 1 thread) %.0f ns/row"), "higher", 1.0)
	}
	for _, m := range []struct{ name, what string }{
		{"ranker", "XGBoost ranker (CPU, ~0.3 µs/row)"},
		{"accel", "model with a 200 µs fixed cost per call"},
	} {
		// The benchmark reports the median of per-round ratios as "ratio"; the row's
		// label promises the ratio of the two median throughputs it prints, so compute that.
		b := "BenchmarkBatching/" + m.name
		on, okOn := get(all, b, "batched-req/s")
		off, okOff := get(all, b, "unbatched-req/s")
		add(row{what: "batching on vs off, 64 clients, " + m.what + " (ratio of median throughputs)",
			figure:   f(b, "batched-req/s", "%.0f req/s (median of rounds)"),
			baseline: f(b, "unbatched-req/s", "off %.0f req/s (median of rounds)") + "; median of per-round ratios " + f(b, "ratio", "%.2f"),
			unit:     "ratio", better: "higher"}, on/max(off, 1e-9), okOn && okOff && off > 0)
	}
	ratio("chain throughput kept vs host direct", "BenchmarkChainVsDirect", "throughput-kept-ratio",
		f("BenchmarkChainVsDirect", "chain-req/s", "%.0f req/s")+", +"+f("BenchmarkChainVsDirect", "added-p50-us", "%.0f µs")+" p50, +"+f("BenchmarkChainVsDirect", "added-p99-us", "%.0f µs")+" p99",
		f("BenchmarkChainVsDirect", "direct-req/s", "direct %.0f req/s"), "higher", 0)
	ratio("translate+validate 1,000 models × 3 versions (build/bare translation)", "BenchmarkTranslate1000x3", "build/bare-ratio",
		f("BenchmarkTranslate1000x3", "build-ms/op", "%.0f ms"), f("BenchmarkTranslate1000x3", "bare-translate-ms/op", "bare translation %.0f ms"), "lower", 0)
	ratio("control-plane heap, 1,000 models (heap/parsed rollouts)", "BenchmarkMemoryPer1000Models", "ratio",
		f("BenchmarkMemoryPer1000Models", "control-plane-MiB/1000-models", "%.1f MiB"), f("BenchmarkMemoryPer1000Models", "rollouts-MiB", "parsed rollouts %.1f MiB"), "lower", 0)
	for _, q := range []string{"p50", "p99"} {
		cost("rollout edit → grpc-go client routes on it, "+q, "BenchmarkEditToRoute", "edit-to-route-"+q+"-ms", "ms", "%.1f",
			"—", f("BenchmarkEditToRoute", "rpc-p50-ms", "one RPC p50 %.2f ms"))
	}
	for _, q := range []string{"p50", "p99"} {
		cost("rollout edit → traffic moved through the chain, "+q, "BenchmarkEditToTrafficMoved", q+"-ms", "ms", "%.1f",
			"—", f("BenchmarkEditToTrafficMoved", "request-p50-ms", "one request p50 %.2f ms"))
	}
	for _, c := range []struct{ bench, what string }{
		{"BenchmarkExtprocDown/killed", "request p99 with ext_proc killed, after detection"},
		{"BenchmarkExtprocDown/blackholed", "request p99 with ext_proc black-holed, after detection"},
	} {
		cost(c.what, c.bench, "down-p99-µs", "µs", "%.0f",
			"p50 "+f(c.bench, "down-p50-µs", "%.0f µs")+"; detected in "+f(c.bench, "detect-ms", "%.0f ms"),
			"ext_proc healthy, same run: p50 "+f(c.bench, "healthy-p50-µs", "%.0f µs")+", p99 "+f(c.bench, "healthy-p99-µs", "%.0f µs")+" (added p99 "+f(c.bench, "added-p99-µs", "%.0f µs")+")")
	}
	rows = append(rows, featureRows(all, f)...)
	rows = append(rows, onnxRows(all, f)...)
	rows = append(rows, scaleRows(all, f)...)
	return rows
}

// featureRows are the feature assembly rows (modelhost's BenchmarkFeatureAssembly): the
// same request with the features sent by the client over the host assembling them from
// a real Redis (cache off), time ratio client/assembled, per request and per dynamic
// batch (one pipelined round trip per batch window), at 1 and 64 clients. Without
// redis-server the suite does not run and the rows say so.
func featureRows(all []result, f func(bench, unit, format string) string) []row {
	var why string
	for _, r := range all {
		if r.name == "FeatureAssembly" && r.skipped != "" {
			why = r.skipped
		}
	}
	var rows []row
	for _, mode := range []struct{ name, what, trips string }{{"request", "per request", "one HMGET per request"}, {"batch", "per dynamic batch", "one pipelined round trip per batch"}} {
		for _, c := range []int{1, 64} {
			b := fmt.Sprintf("BenchmarkFeatureAssembly/%s/clients=%d", mode.name, c)
			v, ok := get(all, b, "ratio-redis")
			clients := "clients"
			if c == 1 {
				clients = "client"
			}
			r := row{
				what: fmt.Sprintf("feature assembly via Redis, %s, %d %s (client-sent time/assembled time; %s)", mode.what, c, clients, mode.trips),
				figure: f(b, "redis-us/req", "host assembles: %.0f µs/req") + ", " + f(b, "redis-trips/req", "%.2f Redis round trips/req") +
					"; from the local cache " + f(b, "cached-us/req", "%.0f µs/req") + " (ratio " + f(b, "ratio-cached", "%.2f") + ")",
				baseline: f(b, "client-us/req", "client sends the features: %.0f µs/req"),
				unit:     "ratio", format: "%.2f", better: "higher", value: v, ok: ok, why: why,
			}
			if !ok {
				r.figure, r.baseline = "—", "—"
			}
			rows = append(rows, r)
		}
	}
	return rows
}

// onnxMissing is why the ONNX rows are not measured when the library was not found.
const onnxMissing = "ONNX Runtime library missing (make onnxruntime)"

// onnxRows are the onnx runtime's rows (test/bench/onnx: the shipped patchbay binary in
// its own process vs ONNX Runtime called directly from Go in the bench process), per
// model: the fixture MLP (~5 µs; the loopback transport dominates) and mlp-large
// (compute-bound; the model dominates). Without the library the benchmarks skip and the
// rows say so.
func onnxRows(all []result, f func(bench, unit, format string) string) []row {
	var why string
	for _, r := range all {
		if n := trimProcs(r.name); r.skipped != "" && (n == "BenchmarkONNXInfer" || n == "BenchmarkONNXBatching") {
			why = r.skipped
			if strings.Contains(r.skipped, "ONNX Runtime library") {
				why = onnxMissing
			}
		}
	}
	us := func(b, unit, format string) string {
		v, ok := get(all, b, unit)
		if !ok {
			return "—"
		}
		return fmt.Sprintf(format, v/1e3)
	}
	var rows []row
	add := func(r row, b, unit string) {
		r.value, r.ok = get(all, b, unit)
		r.why, r.unit, r.format, r.better = why, "ratio", "%.2f", "higher"
		if !r.ok {
			r.figure, r.baseline = "—", "—"
		}
		rows = append(rows, r)
	}
	for _, m := range []struct{ name, what string }{
		{"mlp", "fixture MLP 8-16-16-3 (~5 µs a row: the transport dominates)"},
		{"mlp-large", "MLP 256-1024-1024-1024-10 (compute-bound: the model dominates)"},
	} {
		b := "BenchmarkONNXInfer/model=" + m.name
		direct := us(b, "direct-ns/req", "ONNX Runtime called directly from Go, same row: %.1f µs")
		add(row{what: "ONNX host as shipped, gRPC infer at batch 1, " + m.what + " (direct time/host time)",
			figure: us(b, "grpc-ns/req", "host gRPC %.1f µs/req") + us(b, "host-own-ns/req", " (inside the host, decode to encode: %.1f µs)"), baseline: direct, goal: 0.9}, b, "grpc-ratio")
		add(row{what: "ONNX host as shipped, REST infer at batch 1, " + m.what + " (direct time/host time)",
			figure: us(b, "rest-ns/req", "host REST %.1f µs/req"), baseline: direct}, b, "rest-ratio")
		add(row{what: "ONNX host as shipped, gRPC at batch 1, " + m.what + " ((no-op grpc-go + direct)/host time: 1 = the host adds nothing)",
			figure: us(b, "grpc-ns/req", "host gRPC %.1f µs/req"), baseline: us(b, "noop-grpc-ns/req", "no-op grpc-go ModelInfer in its own process %.1f µs") + " + " + us(b, "direct-ns/req", "direct %.1f µs")}, b, "grpc-floor-ratio")
	}
	for _, m := range []struct{ name, what string }{{"mlp", "fixture MLP"}, {"mlp-large", "MLP 256-1024-1024-1024-10"}} {
		b := "BenchmarkONNXBatching/model=" + m.name
		add(row{what: "ONNX host as shipped, dynamic batching on vs off, 64 REST clients, " + m.what + " (median of per-round throughput ratios)",
			figure: f(b, "batched-req/s", "on %.0f req/s (median of rounds)"), baseline: f(b, "unbatched-req/s", "off %.0f req/s (median of rounds)")}, b, "ratio")
	}
	return rows
}

// scaleRows are the control plane's rows against models (xdsscale) and clients (fanout):
// each size's cost, and each cost over the same run's smallest size. Sizes that only run
// with PATCHBAY_BENCH_LARGE=1 get rows only when they ran.
func scaleRows(all []result, f func(bench, unit, format string) string) []row {
	var rows []row
	keep := func(r row, v float64, ok bool) {
		if r.format == "" {
			r.format = "%.2f"
		}
		r.value, r.ok = v, ok
		rows = append(rows, r)
	}
	xs := func(m int) string { return fmt.Sprintf("BenchmarkXDSScale/models=%d", m) }
	base := xs(100)
	for _, m := range []int{100, 1000, 10000} {
		b := xs(m)
		if _, ok := get(all, b, "models"); !ok && m == 10000 {
			continue
		}
		n := fmt.Sprintf("%d", m)
		if m >= 1000 {
			n = fmt.Sprintf("%d,%03d", m/1000, m%1000)
		}
		// Issue 13's goals at 10,000 models × 5 versions, in each row's shown unit.
		goals := map[string]float64{"edit-p50-ms": 50, "route-bytes/edit": 64, "rss-MiB": 500, "full-start-s": 3}
		cost := func(what, unit, shown, format, figure, baseline string, scale float64) {
			v, ok := get(all, b, unit)
			r := row{what: what, figure: figure, baseline: baseline, unit: shown, format: format, better: "lower"}
			if m == 10000 {
				r.goal = goals[unit]
			}
			keep(r, v*scale, ok)
		}
		cost("one-model edit → Envoy delta client, "+n+" models × 5 versions (p50)", "edit-p50-ms", "ms", "%.0f",
			"max "+f(b, "edit-max-ms", "%.0f ms"), f(base, "edit-p50-ms", "100 models %.0f ms"), 1)
		cost("route bytes sent for a one-model edit, "+n+" models", "route-bytes/edit", "KB", "%.1f",
			f(b, "route-bytes/model", "%.0f B of routes per model"), f(base, "route-bytes/edit", "100 models %.0f B"), 1e-3)
		cost("control plane RSS, "+n+" models", "rss-MiB", "MiB", "%.0f",
			f(b, "rss-KiB/model", "%.0f KiB per model")+", peak after edits "+f(b, "hwm-after-edits-MiB", "%.0f MiB"), f(base, "rss-MiB", "100 models %.0f MiB"), 1)
		cost("control plane start → ready, "+n+" models", "ready-s", "s", "%.1f", "—", f(base, "ready-s", "100 models %.1f s"), 1)
		cost("control plane start → an Envoy delta client holds the full config, "+n+" models", "full-start-s", "s", "%.1f",
			f(b, "full-config-bytes", "%.0f B")+" ("+f(b, "config-bytes/model", "%.0f B/model")+": "+f(b, "route-configs", "%.0f route configs, ")+f(b, "scopes", "%.0f scopes, ")+f(b, "clusters", "%.0f clusters, ")+f(b, "endpoint-sets", "%.0f endpoint sets")+")",
			f(base, "full-start-s", "100 models %.1f s"), 1)
		cost("route matchers a request for the last model passes through, "+n+" models", "rest-matchers", "matchers", "%.0f",
			f(b, "scope-lookups", "%.0f scope lookup(s) + ")+f(b, "routes", "the walk of a %.0f-route table"), f(b, "old-flat-matchers", "flat table before Scoped RDS (reference, same files): %.0f"), 1)
		if m == 100 {
			continue
		}
		ratio := func(what, unit string) {
			v, ok := get(all, b, unit+"-x-baseline")
			keep(row{what: what + ", " + n + " / 100 models", figure: f(b, unit, "%.4g"), baseline: f(base, unit, "100 models %.4g"),
				unit: "ratio", better: "lower"}, v, ok)
		}
		ratio("route bytes per one-model edit (ideal 1: proportional to the change)", "route-bytes/edit")
		ratio("route matchers per request (ideal 1: lookup independent of models)", "rest-matchers")
		ratio("route matchers per request in the flat table before Scoped RDS (reference)", "old-flat-matchers")
		ratio("one-model edit time", "edit-p50-ms")
		ratio("control plane RSS", "rss-MiB")
	}
	fb := func(m, c int) string { return fmt.Sprintf("BenchmarkFanout/models=%d/clients=%d", m, c) }
	fbase := fb(1, 100)
	for _, sz := range [][2]int{{1, 100}, {1, 1000}, {1000, 100}, {1000, 1000}, {1000, 5000}, {1000, 20000}} {
		b := fb(sz[0], sz[1])
		if _, ok := get(all, b, "clients"); !ok && sz[1] > 1000 {
			continue
		}
		what := fmt.Sprintf("fan-out: split edit → every client, %d model(s) × %d clients", sz[0], sz[1])
		v, ok := get(all, b, "p99-ms")
		goal := 0.0
		if sz[1] == 20000 {
			goal = 1000 // issue 13: p99 ≤ 1 s at 20,000 clients, load generator included
		}
		keep(row{what: what + " (p99)", unit: "ms", format: "%.0f", better: "lower", goal: goal,
			figure:   "p50 " + f(b, "p50-ms", "%.0f ms") + ", max " + f(b, "max-ms", "%.0f ms") + "; " + f(b, "tcp-conns", "%.0f TCP connections"),
			baseline: f(fbase, "p99-ms", "1 model × 100 clients p99 %.0f ms")}, v, ok)
		v, ok = get(all, b, "edit-cpu-us/client")
		keep(row{what: what + ": server CPU per client for the edit", unit: "µs/client", format: "%.0f", better: "lower",
			figure:   f(b, "edit-cpu-ms", "%.0f ms in all") + "; connect " + f(b, "connect-cpu-us/client", "%.0f µs/client"),
			baseline: f(fbase, "edit-cpu-us/client", "1 model × 100 clients %.0f µs/client")}, v, ok)
		v, ok = get(all, b, "rss-KiB/client")
		keep(row{what: what + ": server RSS per connected client", unit: "KiB/client", format: "%.0f", better: "lower",
			figure:   f(b, "rss-synced-MiB", "%.0f MiB synced") + ", " + f(b, "rss-idle-MiB", "%.0f MiB before"),
			baseline: f(fbase, "rss-KiB/client", "1 model × 100 clients %.0f KiB/client")}, v, ok)
		if b == fbase {
			continue
		}
		p, ok1 := get(all, b, "p99-ms")
		p0, ok2 := get(all, fbase, "p99-ms")
		keep(row{what: what + ": p99 / 1 model × 100 clients", figure: f(b, "p99-ms", "%.0f ms"), baseline: f(fbase, "p99-ms", "%.0f ms"),
			unit: "ratio", better: "lower"}, p/max(p0, 1e-9), ok1 && ok2 && p0 > 0)
	}
	rows = append(rows, burstRestartRows(all, f)...)
	return rows
}

// burstRestartRows: the burst of 1,000 edits (pushes each client received, against one
// edit of one model) and the restart under clients (resync against the initial sync).
func burstRestartRows(all []result, f func(bench, unit, format string) string) []row {
	var rows []row
	const bb, rb = "BenchmarkBurst", "BenchmarkRestart"
	for _, k := range []string{"delta", "sotw"} {
		v, ok := get(all, bb, k+"-pushes")
		rows = append(rows, row{what: "burst of 1,000 file edits in 1 s (1,000 models; 700 files, some edited 4 times): pushes an Envoy " + k + " client received, no edit lost",
			figure:   f(bb, k+"-rds-pushes", "%.0f RDS responses, ") + f(bb, k+"-route-MB", "%.2f MB of routes, ") + f(bb, k+"-settle-ms", "every last edit held %.0f ms after the last write"),
			baseline: f(bb, "single-"+k+"-pushes", "one edit of one model: %.0f push(es), ") + f(bb, "single-"+k+"-settle-ms", "%.0f ms"),
			unit:     "pushes", format: "%.0f", better: "lower", value: v, ok: ok})
	}
	v, ok := get(all, rb, "resync-p99-ms")
	rows = append(rows, row{what: "control plane killed and restarted under its ADS clients: kill → every client resynced (p99)",
		figure: f(rb, "clients", "%.0f clients, ") + f(rb, "models", "%.0f models; ") + "p50 " + f(rb, "resync-p50-ms", "%.0f ms") + ", max " + f(rb, "resync-max-ms", "%.0f ms") + "; restart → ready " + f(rb, "restart-ready-ms", "%.0f ms") +
			"; clients that saw an empty or partial config: " + f(rb, "partial-or-empty", "%.0f"),
		baseline: f(rb, "initial-sync-p99-ms", "initial sync p99 %.0f ms"), unit: "ms", format: "%.0f", better: "lower", value: v, ok: ok})
	return rows
}

// table is the Markdown table of rows.
func table(rows []row) string {
	var b strings.Builder
	b.WriteString("| what | figure | baseline (same run) | value | better | goal |\n|---|---|---|---|---|---|\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s |\n", r.what, r.figure, r.baseline, r.valueText(), r.better, r.goalText())
	}
	return b.String()
}

// panel is one chart: the rows sharing a unit (ratios split three ways), on an axis from min to max.
type panel struct {
	title    string
	unit     string
	names    []string
	values   []float64 // 0 for a row not measured (its label says so)
	labels   []string
	goals    []float64 // 0: no goal
	min, max float64
}

// group is the title of the panel a row is plotted in.
func group(r row) string {
	switch {
	case r.unit != "ratio":
		return "costs in " + r.unit + " (lower is better)"
	case r.goal > 0:
		return "ratios with goals, higher is better (line: 1; red triangles: goals)"
	case r.better == "higher":
		return "ratios without goals, higher is better (line: 1)"
	default:
		return "ratios, lower is better (line: 1)"
	}
}

// panels groups every row (ratios with goals, ratios without goals higher and lower is
// better, then each cost unit, in table order) and sets each axis from its data, so no
// bar, goal or reference line is clipped.
func panels(rows []row) []panel {
	var ps []panel
	idx := map[string]int{}
	for _, r := range rows {
		if _, ok := idx[group(r)]; !ok {
			idx[group(r)] = len(ps)
			ps = append(ps, panel{title: group(r), unit: r.unit})
		}
	}
	for _, r := range rows {
		p := &ps[idx[group(r)]]
		v := 0.0
		if r.ok {
			v = r.value
		}
		label := r.valueText() + ", " + r.better + " is better"
		if r.goal > 0 {
			label += ", goal " + r.goalText()
		}
		p.names = append(p.names, short(r.what))
		p.values = append(p.values, v)
		p.labels = append(p.labels, label)
		p.goals = append(p.goals, r.goal)
	}
	for i := range ps {
		p := &ps[i]
		lo, hi := 0.0, 0.0
		if p.unit == "ratio" {
			hi = 1 // the reference line at 1
		}
		for i, v := range p.values {
			lo, hi = min(lo, v, p.goals[i]), max(hi, v, p.goals[i])
		}
		if hi == lo {
			hi = lo + 1
		}
		// Room on the right for each bar's label.
		p.min, p.max = lo-0.02*(hi-lo)*boolf(lo < 0), hi+0.6*(hi-lo)
	}
	return ps
}

func boolf(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// drawPanels draws each panel as horizontal bars, one above the other, in one PNG.
func drawPanels(path string, ps []panel) error {
	const perBar, extra = 0.32, 1.1 // inches
	var h float64
	for _, p := range ps {
		h += perBar*float64(len(p.values)) + extra
	}
	w := 11 * vg.Inch
	img := vgimg.New(w, vg.Length(h)*vg.Inch)
	dc := draw.New(img)
	top := vg.Length(h) * vg.Inch
	for _, p := range ps {
		ph := vg.Length(perBar*float64(len(p.values))+extra) * vg.Inch
		c := draw.Canvas{Canvas: dc.Canvas, Rectangle: vg.Rectangle{Min: vg.Point{X: 0, Y: top - ph}, Max: vg.Point{X: w, Y: top}}}
		top -= ph
		pl, err := panelPlot(p)
		if err != nil {
			return err
		}
		pl.Draw(c)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func panelPlot(p panel) (*plot.Plot, error) {
	pl := plot.New()
	pl.Title.Text = p.title
	pl.X.Label.Text = p.unit
	pl.X.Min, pl.X.Max = p.min, p.max
	n := len(p.values)
	// Rows from top to bottom in table order: bar i sits at y = n-1-i.
	vals := make(plotter.Values, n)
	names := make([]string, n)
	lab := plotter.XYLabels{XYs: make(plotter.XYs, n), Labels: make([]string, n)}
	var goals plotter.XYs
	for i := range n {
		y := n - 1 - i
		vals[y], names[y] = p.values[i], p.names[i]
		lab.XYs[y] = plotter.XY{X: max(p.values[i], 0), Y: float64(y)}
		lab.Labels[y] = " " + p.labels[i]
		if p.goals[i] > 0 {
			goals = append(goals, plotter.XY{X: p.goals[i], Y: float64(y)})
		}
	}
	bars, err := plotter.NewBarChart(vals, vg.Points(14))
	if err != nil {
		return nil, err
	}
	bars.Horizontal = true
	bars.Color = color.Gray{Y: 150}
	bars.LineStyle.Width = 0
	pl.Add(bars)
	labels, err := plotter.NewLabels(lab)
	if err != nil {
		return nil, err
	}
	for i := range labels.TextStyle {
		labels.TextStyle[i].YAlign = draw.YCenter
	}
	pl.Add(labels)
	if len(goals) > 0 {
		s, err := plotter.NewScatter(goals)
		if err != nil {
			return nil, err
		}
		s.GlyphStyle.Shape = draw.PyramidGlyph{}
		s.GlyphStyle.Radius = vg.Points(4)
		s.GlyphStyle.Color = color.RGBA{R: 200, A: 255}
		pl.Add(s)
	}
	if p.unit == "ratio" {
		one, err := plotter.NewLine(plotter.XYs{{X: 1, Y: -0.5}, {X: 1, Y: float64(n) - 0.5}})
		if err != nil {
			return nil, err
		}
		pl.Add(one)
	}
	pl.NominalY(names...)
	return pl, nil
}

// short is a row's name on the chart's axis.
func short(s string) string {
	if i := strings.Index(s, " ("); i > 0 && !strings.HasPrefix(s, "ext_proc decision alone") {
		s = s[:i]
	}
	return strings.NewReplacer("XGBoost per row vs XGBoost itself, ", "xgb ", "ext_proc ", "extproc ",
		", one stream per request, 16 workers", "", ", 16 floats", "", "batching on vs off, 64 clients, ", "batching ",
		"ext_proc decision alone (BenchmarkDecide): ", "Decide ", ", after detection", "").Replace(s)
}

// parse reads `go test -bench` output: result lines and the log lines under them.
func parse(out string) []result {
	var (
		res     []result
		skipWhy = "skipped"
	)
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, "--- SKIP: "); ok && strings.HasPrefix(rest, "Benchmark") {
			// (-v) the benchmark's last log line, above this one, says why.
			res = append(res, result{name: strings.Fields(rest)[0], skipped: skipWhy})
			continue
		}
		if strings.HasPrefix(line, "    ") {
			if _, after, ok := strings.Cut(strings.TrimSpace(line), ": "); ok {
				skipWhy = strings.TrimPrefix(after, "skipped: ")
			}
			continue
		}
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
