package fanout

import (
	"context"
	"fmt"
	"net"
	"os"
	"runtime/pprof"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/patchbay-io/patchbay/test/bench/xdsscale"
	"github.com/patchbay-io/patchbay/xds"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// size is one fan-out run: models configured, clients connected.
type size struct{ models, clients int }

func sizes() []size {
	if v := os.Getenv("PATCHBAY_FANOUT_SIZES"); v != "" {
		var s []size
		for _, f := range strings.Split(v, ",") {
			var z size
			if _, err := fmt.Sscanf(f, "%dx%d", &z.models, &z.clients); err == nil {
				s = append(s, z)
			}
		}
		return s
	}
	// 1 model x 100 clients is the same-run baseline.
	s := []size{{1, 100}, {1, 1000}, {1000, 100}, {1000, 1000}}
	if xdsscale.Large() {
		s = append(s, size{1000, 5000}, size{1000, 20000})
	}
	return s
}

// perConn is how many client streams share one TCP connection: one per connection (as
// every real proxy has its own) up to 5,000 clients; beyond, 4 per connection, so that
// 20,000 clients are 5,000 connections (10,000 file descriptors on loopback for both ends).
func perConn(clients int) int {
	if clients > 5000 {
		return 4
	}
	return 1
}

func raiseFDLimit(tb testing.TB) {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		tb.Fatal(err)
	}
	if l.Cur < l.Max {
		l.Cur = l.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
			tb.Fatal(err)
		}
	}
}

// edited is the model every run edits; it serves gRPC as well as REST, so proxyless
// clients (which watch it) have a listener for it.
const edited = 0

func pct(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	return d[int(q*float64(len(d)-1))]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// BenchmarkFanout runs the shipped control plane (`patchbay xds`, a separate process,
// default flags but the prober off: see xdsscale.HealthOff) with simulated clients (a
// quarter each: Envoy edge SotW and delta on the edited model's route config and Sample
// others (EnvoyRoutes), proxyless gRPC on the edited
// model's listener, ext_proc on the policy) over real gRPC ADS streams on loopback; then
// changes one model's split and reports p50/p99/max time until every client received it,
// and the server's CPU and memory per connected client. Sizes (models x clients): 1 x 100
// (the baseline), 1 x 1,000, 1,000 x 100, 1,000 x 1,000; with PATCHBAY_BENCH_LARGE=1 also
// 1,000 x 5,000 and 1,000 x 20,000; PATCHBAY_FANOUT_SIZES=MxC,... picks others.
func BenchmarkFanout(b *testing.B) {
	raiseFDLimit(b) // the server process inherits it
	bin := xdsscale.Binary(b)
	for _, sz := range sizes() {
		b.Run(fmt.Sprintf("models=%d/clients=%d", sz.models, sz.clients), func(b *testing.B) {
			for n := 0; n < b.N; n++ {
				fanoutOnce(b, bin, sz)
			}
		})
	}
}

func fanoutOnce(b *testing.B, bin string, sz size) {
	dir := b.TempDir()
	xdsscale.WriteModels(b, dir, sz.models, edited)
	p := xdsscale.Start(b, bin, dir, 5*time.Minute, xdsscale.HealthOff)
	pid := p.Cmd.Process.Pid
	memReady, _ := xdsscale.ReadMem(pid)
	cpuReady, _ := xdsscale.CPU(pid)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	conns := (sz.clients + perConn(sz.clients) - 1) / perConn(sz.clients)
	start := time.Now()
	f, err := Connect(ctx, p.ADS, sz.clients, conns, sz.models, xdsscale.ModelName(edited))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	wait := func(what string, c interface{ Load() int64 }, limit time.Duration) {
		last := time.Now()
		for t0 := time.Now(); c.Load() < int64(sz.clients); time.Sleep(5 * time.Millisecond) {
			if time.Since(last) > 10*time.Second {
				last = time.Now()
				mem, _ := xdsscale.ReadMem(pid)
				b.Logf("%s: %d of %d clients after %v, %.0f MB received, server RSS %.0f MiB, %d errors",
					what, c.Load(), sz.clients, time.Since(t0).Round(time.Second), float64(f.Bytes.Load())/1e6, mem.RSS/(1<<20), len(f.Errs()))
			}
			if time.Since(t0) > limit {
				b.Fatalf("%s: %d of %d clients after %v; errors: %v", what, c.Load(), sz.clients, limit, first(f.Errs(), 3))
			}
		}
	}
	wait("sync", &f.Synced, 10*time.Minute)
	syncTime := time.Since(start)
	time.Sleep(2 * time.Second) // let the initial pushes' garbage be collected
	memSynced, _ := xdsscale.ReadMem(pid)
	cpuSynced, _ := xdsscale.CPU(pid)
	bytesSynced := f.Bytes.Load()

	editStart := time.Now()
	f.Mark(editStart)
	xdsscale.EditModel(b, dir, edited, 1, true)
	wait("edit", &f.Updated, 10*time.Minute)
	all := time.Since(editStart)
	cpuEdit, _ := xdsscale.CPU(pid)
	memEdit, _ := xdsscale.ReadMem(pid)
	lat, byKind := f.Latencies()

	c := float64(sz.clients)
	b.ReportMetric(float64(sz.models), "models")
	b.ReportMetric(c, "clients")
	b.ReportMetric(float64(conns), "tcp-conns")
	b.ReportMetric(ms(pct(lat, 0.5)), "p50-ms")
	b.ReportMetric(ms(pct(lat, 0.99)), "p99-ms")
	b.ReportMetric(ms(pct(lat, 1)), "max-ms")
	b.ReportMetric(ms(all), "all-updated-ms")
	for k := Kind(0); k < kinds; k++ {
		b.ReportMetric(ms(pct(byKind[k], 0.99)), k.String()+"-p99-ms")
	}
	b.ReportMetric(ms(syncTime), "sync-ms")
	b.ReportMetric(float64((cpuSynced-cpuReady).Microseconds())/c, "connect-cpu-us/client")
	b.ReportMetric(float64((cpuEdit-cpuSynced).Microseconds())/c, "edit-cpu-us/client")
	b.ReportMetric(float64((cpuEdit - cpuSynced).Milliseconds()), "edit-cpu-ms")
	b.ReportMetric(max(memSynced.RSS-memReady.RSS, 0)/1024/c, "rss-KiB/client")
	b.ReportMetric(memReady.RSS/(1<<20), "rss-idle-MiB")
	b.ReportMetric(memSynced.RSS/(1<<20), "rss-synced-MiB")
	b.ReportMetric(memEdit.HWM/(1<<20), "hwm-MiB")
	b.ReportMetric(float64(f.Bytes.Load()-bytesSynced)/c, "edit-bytes/client")
	b.ReportMetric(float64(xdsscale.Threads(pid)), "server-threads")
	if errs := f.Errs(); len(errs) > 0 {
		b.Fatalf("%d stream errors: %v", len(errs), first(errs, 3))
	}
}

func first(errs []error, n int) []error { return errs[:min(n, len(errs))] }

// BenchmarkFanoutProfile runs the control plane in this process (xds.New, Run) with the
// same fleet and writes a CPU profile of the connect and the edit to
// $PATCHBAY_BENCH_CPUPROFILE (skipped without it). The fleet's goroutines carry the pprof
// label side=client, so `go tool pprof -tagignore side=client` shows the server alone.
// Sizes: PATCHBAY_FANOUT_MODELS (default 1000) and PATCHBAY_FANOUT_CLIENTS (default 1000).
func BenchmarkFanoutProfile(b *testing.B) {
	out := os.Getenv("PATCHBAY_BENCH_CPUPROFILE")
	if out == "" {
		b.Skip("set PATCHBAY_BENCH_CPUPROFILE=FILE")
	}
	raiseFDLimit(b)
	sz := size{models: envInt("PATCHBAY_FANOUT_MODELS", 1000), clients: envInt("PATCHBAY_FANOUT_CLIENTS", 1000)}
	dir := b.TempDir()
	xdsscale.WriteModels(b, dir, sz.models, edited)
	srv, err := xds.New(xds.Config{RolloutsDir: dir, Logger: zerolog.Nop(),
		Translate: translate.Options{EdgeAddress: "127.0.0.1:10000", SidecarAddress: "127.0.0.1:15001",
			ExtprocTimeout: translate.DefaultTimeout, AccessLog: true}})
	if err != nil {
		b.Fatal(err)
	}
	gl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	al, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Run(ctx, gl, al); close(done) }()
	defer func() { cancel(); <-done }()
	for t0 := time.Now(); srv.Version() == ""; time.Sleep(10 * time.Millisecond) {
		if time.Since(t0) > 5*time.Minute {
			b.Fatal("not ready")
		}
	}
	pf, err := os.Create(out)
	if err != nil {
		b.Fatal(err)
	}
	if err := pprof.StartCPUProfile(pf); err != nil {
		b.Fatal(err)
	}
	var f *Fleet
	pprof.Do(ctx, pprof.Labels("side", "client"), func(ctx context.Context) {
		f, err = Connect(ctx, gl.Addr().String(), sz.clients, sz.clients/perConn(sz.clients), sz.models, xdsscale.ModelName(edited))
	})
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	for t0 := time.Now(); f.Synced.Load() < int64(sz.clients); time.Sleep(5 * time.Millisecond) {
		if time.Since(t0) > 10*time.Minute {
			b.Fatal("sync timeout")
		}
	}
	t0 := time.Now()
	f.Mark(t0)
	xdsscale.EditModel(b, dir, edited, 1, true)
	for f.Updated.Load() < int64(sz.clients) {
		if time.Since(t0) > 10*time.Minute {
			b.Fatal("edit timeout")
		}
		time.Sleep(5 * time.Millisecond)
	}
	pprof.StopCPUProfile()
	pf.Close()
	lat, _ := f.Latencies()
	b.ReportMetric(ms(pct(lat, 0.99)), "p99-ms")
}

func envInt(k string, def int) int {
	var v int
	if _, err := fmt.Sscan(os.Getenv(k), &v); err != nil || v <= 0 {
		return def
	}
	return v
}
