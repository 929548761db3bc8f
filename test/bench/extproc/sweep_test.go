package extprocbench

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// The floor is the best case, tuned the way shared/design.md describes: GOGC and
// grpc.NumStreamWorkers. Its settings are the best of the floor variants measured with
// BenchmarkExtprocSweep (extproc/README.md, "Runtime defaults"); PATCHBAY_BENCH_FLOOR_GOGC
// and PATCHBAY_BENCH_FLOOR_WORKERS override them for a sweep.
const (
	floorGOGC = "800"
	// floorWorkersPerProc × GOMAXPROCS stream workers: enough that a stream nearly always
	// finds an idle worker (a worker's stack has grown already; a new goroutine per
	// stream grows its own, which costs the floor ~3 µs per stream here).
	floorWorkersPerProc = 8
)

// floorOptions are the floor's gRPC server options (its stream workers).
func floorOptions() []grpc.ServerOption {
	n := floorWorkersPerProc * runtime.GOMAXPROCS(0)
	if v := os.Getenv("PATCHBAY_BENCH_FLOOR_WORKERS"); v != "" {
		n, _ = strconv.Atoi(v)
		if n <= 0 {
			return nil // a goroutine per stream, grpc-go's default
		}
	}
	return []grpc.ServerOption{grpc.NumStreamWorkers(uint32(n))}
}

// libraryWorkers is the stream workers of the library child (extproc.New in this test
// binary): PATCHBAY_BENCH_FLOOR_WORKERS when set, else 0 (the library's default).
func libraryWorkers() uint32 {
	n, _ := strconv.Atoi(os.Getenv("PATCHBAY_BENCH_FLOOR_WORKERS"))
	return uint32(max(n, 0))
}

// floorEnv is the floor process's GOGC.
func floorEnv() []string {
	if v := os.Getenv("PATCHBAY_BENCH_FLOOR_GOGC"); v != "" {
		return []string{"GOGC=" + v}
	}
	return []string{"GOGC=" + floorGOGC}
}

// runtimeFree is this process's environment without the Go runtime's tuning variables,
// so a child runs with what it sets itself (or with only what the caller adds).
func runtimeFree() []string {
	return slices.DeleteFunc(os.Environ(), func(kv string) bool {
		for _, k := range []string{"GOGC=", "GOMEMLIMIT=", "GOMAXPROCS=", "GODEBUG="} {
			if strings.HasPrefix(kv, k) {
				return true
			}
		}
		return false
	})
}

// startShipped runs the shipped binary as `patchbay extproc` with its address flags
// (listen, xds, admin) and nothing else but args, in a runtime-free environment plus env.
func startShipped(b *testing.B, name, bin, xds string, env, args []string) *child {
	addr := freeAddr(b)
	cmd := exec.Command(bin, append([]string{"extproc", "--listen", addr, "--xds", xds, "--admin", freeAddr(b)}, args...)...)
	cmd.Env = append(runtimeFree(), env...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = cmd.Process.Signal(os.Interrupt); _ = cmd.Wait() })
	c := &child{name: name, addr: addr, cmd: cmd}
	for range 2 {
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { conn.Close() })
		c.conn = append(c.conn, conn)
	}
	return c
}

// variant is one server configuration of a sweep.
type variant struct {
	name  string
	floor bool     // the floor server (env only) instead of patchbay extproc
	lib   bool     // extproc.New in a child of the test binary (env only; no telemetry)
	bin   string   // another patchbay binary instead of the one built from this tree
	env   []string // KEY=VALUE added to the runtime-free environment
	args  []string // flags after the address flags
}

// parseSweep reads PATCHBAY_BENCH_SWEEP: variants separated by ";", each
// "name: token token ...", a token being a flag (--x=y), KEY=VALUE for the environment,
// "floor" for a floor variant, or "library" for extproc.New in a child of the test binary
// (PATCHBAY_BENCH_FLOOR_WORKERS=N sets its stream workers), or "bin:PATH" for another
// patchbay binary (an A/B of two builds in one run). "name:" alone is the binary as shipped.
func parseSweep(spec string) ([]variant, error) {
	var vs []variant
	for _, part := range strings.Split(spec, ";") {
		if strings.TrimSpace(part) == "" {
			continue
		}
		name, rest, ok := strings.Cut(part, ":")
		if !ok || strings.TrimSpace(name) == "" {
			return nil, fmt.Errorf("sweep variant %q: want name: tokens", part)
		}
		v := variant{name: strings.TrimSpace(name)}
		for _, tok := range strings.Fields(rest) {
			switch {
			case tok == "floor":
				v.floor = true
			case tok == "library":
				v.lib = true
			case strings.HasPrefix(tok, "bin:"):
				v.bin = strings.TrimPrefix(tok, "bin:")
			case strings.HasPrefix(tok, "--"):
				v.args = append(v.args, tok)
			case strings.Contains(tok, "="):
				v.env = append(v.env, tok)
			default:
				return nil, fmt.Errorf("sweep variant %q: token %q is not a flag, KEY=VALUE or floor", v.name, tok)
			}
		}
		vs = append(vs, v)
	}
	return vs, nil
}

func TestParseSweep(t *testing.T) {
	vs, err := parseSweep("shipped: ; gc400: GOGC=400 --stream-workers=2; f: floor PATCHBAY_BENCH_FLOOR_WORKERS=0; old: bin:/tmp/pb")
	if err != nil {
		t.Fatal(err)
	}
	if len(vs) != 4 || vs[3].bin != "/tmp/pb" || vs[0].bin != "" || vs[0].name != "shipped" || len(vs[0].env)+len(vs[0].args) != 0 ||
		!slices.Equal(vs[1].env, []string{"GOGC=400"}) || !slices.Equal(vs[1].args, []string{"--stream-workers=2"}) ||
		!vs[2].floor || vs[1].floor {
		t.Fatalf("parseSweep = %+v", vs)
	}
	if _, err := parseSweep("x: GOGC"); err == nil {
		t.Fatal("a bare word was accepted")
	}
}

// BenchmarkExtprocSweep measures server settings: every variant of
// PATCHBAY_BENCH_SWEEP (see parseSweep) runs as its own process at once, idle but
// for its turn; each round drives the reference floor, then every variant in a rotated
// order, for roundTime each. Printed per variant: the median over rounds of its
// throughput and CPU per decision as ratios to the floor's round, with their spread
// (min–max), and its median req/s, CPU µs/decision and resident memory. Skipped unless
// the variable is set; not part of `make bench`. PATCHBAY_BENCH_SWEEP_ROUNDS sets the
// number of rounds (default 6).
func BenchmarkExtprocSweep(b *testing.B) {
	spec := os.Getenv("PATCHBAY_BENCH_SWEEP")
	if spec == "" {
		b.Skip("set PATCHBAY_BENCH_SWEEP (see extproc/README.md, Runtime defaults)")
	}
	vs, err := parseSweep(spec)
	if err != nil {
		b.Fatal(err)
	}
	nRounds := 6
	if v := os.Getenv("PATCHBAY_BENCH_SWEEP_ROUNDS"); v != "" {
		if nRounds, err = strconv.Atoi(v); err != nil || nRounds < 1 {
			b.Fatalf("PATCHBAY_BENCH_SWEEP_ROUNDS=%q", v)
		}
	}
	bin := buildPatchbay(b)
	xds := startADS(b)
	ref := startChild(b, "floor", "floor", floorEnv()...)
	var cs []*child
	for _, v := range vs {
		switch {
		case v.floor:
			cs = append(cs, startChild(b, v.name, "floor", append(floorEnv(), v.env...)...))
		case v.lib:
			cs = append(cs, startChild(b, v.name, "patchbay:"+xds, v.env...))
		case v.bin != "":
			cs = append(cs, startShipped(b, v.name, v.bin, xds, v.env, v.args))
		default:
			cs = append(cs, startShipped(b, v.name, bin, xds, v.env, v.args))
		}
	}
	reqs := make([]*extprocv3.ProcessingRequest, 4096)
	for i := range reqs {
		reqs[i] = request("user-" + strconv.Itoa(i))
	}
	for _, c := range append([]*child{ref}, cs...) {
		waitDeciding(b, c, reqs[0])
		w := &child{name: c.name, cmd: c.cmd, conn: c.conn}
		w.round(b, reqs, 300*time.Millisecond)
	}
	b.ResetTimer()
	for r := range nRounds {
		ref.round(b, reqs, roundTime)
		for i := range cs {
			cs[(i+r)%len(cs)].round(b, reqs, roundTime)
		}
	}
	b.StopTimer()
	// The table goes to stdout: testing trims a benchmark's log to 10 lines.
	fmt.Printf("%d rounds of %v; ratios to the tuned floor's round (GOGC=%s), median [min–max]; floor median %.0f req/s, %.2f µs/decision\n",
		nRounds, roundTime, strings.TrimPrefix(floorEnv()[0], "GOGC="), median(ref.roundRPS), median(ref.roundCPU))
	fmt.Printf("%-22s %-28s %-28s %9s %9s %8s", "variant", "throughput/floor", "floor CPU/variant CPU", "req/s", "µs/dec", "RSS MiB\n")
	for _, c := range cs {
		var tr, cr []float64
		for i := range c.roundRPS {
			tr = append(tr, c.roundRPS[i]/ref.roundRPS[i])
			cr = append(cr, ref.roundCPU[i]/c.roundCPU[i])
		}
		fmt.Printf("%-22s %.3f [%.2f–%.2f]           %.3f [%.2f–%.2f]           %9.0f %9.2f %8.1f\n", c.name,
			median(tr), slices.Min(tr), slices.Max(tr), median(cr), slices.Min(cr), slices.Max(cr),
			median(c.roundRPS), median(c.roundCPU), rssMiB(c.cmd.Process.Pid))
	}
}

// rssMiB is a process's resident set size from /proc/<pid>/statm (0 if unreadable).
func rssMiB(pid int) float64 {
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/statm")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(raw))
	if len(f) < 2 {
		return 0
	}
	pages, _ := strconv.ParseFloat(f[1], 64)
	return pages * float64(os.Getpagesize()) / (1 << 20)
}
