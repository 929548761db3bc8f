// Package extprocbench measures patchbay's ext_proc server against a floor: a trivial,
// well-tuned ext_proc server that returns a fixed answer of the same shape without
// deciding anything. patchbay runs as shipped (the built cmd/patchbay, no tuning flags),
// the floor as a child of this test binary; both are separate processes, so their CPU is
// read from /proc/<pid>/stat without the load generator's. Run:
//
//	go test ./test/bench/extproc -run '^$' -bench . -benchtime 1x
package extprocbench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/patchbay-io/patchbay/api/headers"
	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
	"github.com/patchbay-io/patchbay/extproc"
)

const (
	workers   = 16
	rounds    = 12
	roundTime = 750 * time.Millisecond
	serverEnv = "PATCHBAY_BENCH_SERVER" // "patchbay:<xds addr>" or "floor"
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(serverEnv); mode != "" {
		os.Exit(runServer(mode))
	}
	os.Exit(m.Run())
}

// runServer serves one of the two servers on 127.0.0.1:0, prints its address and
// exits when stdin closes.
func runServer(mode string) int {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); cancel() }()
	fmt.Println(lis.Addr().String())
	// PATCHBAY_BENCH_CPUPROFILE=dir writes <dir>/<server>.pprof for each server.
	if dir := os.Getenv("PATCHBAY_BENCH_CPUPROFILE"); dir != "" {
		name, _, _ := strings.Cut(mode, ":")
		if f, err := os.Create(filepath.Join(dir, name+".pprof")); err == nil {
			defer f.Close()
			if pprof.StartCPUProfile(f) == nil {
				defer pprof.StopCPUProfile()
			}
		}
	}
	if xds, ok := strings.CutPrefix(mode, "patchbay:"); ok {
		srv, err := extproc.New(extproc.Config{XDSAddress: xds, NumStreamWorkers: libraryWorkers()})
		if err == nil {
			err = srv.Serve(ctx, lis)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		return 0
	}
	gs := grpc.NewServer(floorOptions()...)
	extprocv3.RegisterExternalProcessorServer(gs, floor{})
	go func() { <-ctx.Done(); gs.Stop() }()
	_ = gs.Serve(lis)
	return 0
}

// floor answers request headers with a fixed mutation of the same shape as a
// patchbay decision (four headers, clear_route_cache), built once.
type floor struct {
	extprocv3.UnimplementedExternalProcessorServer
}

var floorAnswer = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{
	RequestHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{
		HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{
			fixed(headers.Model, "ranker"), fixed(headers.Bucket, "12754204003123123123"), fixed(headers.Version, "v8"), fixed(headers.Experiments, "ltv=treatment"),
		}},
		ClearRouteCache: true,
	}},
}}

func fixed(k, v string) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: k, RawValue: []byte(v)}, AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD}
}

func (floor) Process(s extprocv3.ExternalProcessor_ProcessServer) error {
	for {
		req, err := s.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if req.GetRequestHeaders() != nil {
			if err := s.Send(floorAnswer); err != nil {
				return err
			}
		}
	}
}

func benchPolicy() *policyv1.Policy {
	arms := func(a, va, b, vb string) []*policyv1.Arm {
		return []*policyv1.Arm{{Name: a, Version: va, Weight: 50}, {Name: b, Version: vb, Weight: 50}}
	}
	return &policyv1.Policy{
		ConfigVersion: "bench",
		Layers:        []*policyv1.Layer{{Name: "ranking", Salt: "L1"}, {Name: "ui", Salt: "L2"}},
		Models: []*policyv1.Model{{
			Name: "ranker", Salt: "ranker-salt", Versions: []string{"v7", "v8"},
			Experiments: []*policyv1.Experiment{
				{Name: "ltv", Layer: "ranking", SlotStart: 0, SlotEnd: 2000, Salt: "ltv", Arms: arms("control", "v7", "treatment", "v8")},
				{Name: "fresh", Layer: "ranking", SlotStart: 2000, SlotEnd: 3000, Salt: "fresh", Arms: arms("off", "v7", "on", "v8")},
				{Name: "color", Layer: "ui", SlotStart: 0, SlotEnd: 5000, Salt: "color",
					Match: []*policyv1.HeaderMatch{{Name: "x-country", Values: []string{"US", "CA"}}},
					Arms:  arms("a", "v7", "b", "v8")},
			},
		}},
	}
}

// startADS serves the policy from go-control-plane's ADS server on 127.0.0.1:0.
func startADS(b *testing.B) string {
	c := cachev3.NewLinearCache(policyv1.TypeURL)
	if err := c.UpdateResource(policyv1.ResourceName, benchPolicy()); err != nil {
		b.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	gs := grpc.NewServer()
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(gs, serverv3.NewServer(ctx, c, nil))
	go func() { _ = gs.Serve(lis) }()
	b.Cleanup(func() { gs.Stop(); cancel() })
	return lis.Addr().String()
}

type child struct {
	name string
	addr string
	cmd  *exec.Cmd
	conn []*grpc.ClientConn
	// per round: requests/s and CPU per decision (us)
	roundRPS, roundCPU []float64
	// totals over all rounds
	n       int
	elapsed time.Duration
	cpu     time.Duration
	lat     []time.Duration
}

// startChild runs this test binary as the server mode names ("floor" or
// "patchbay:<xds>"), with env added to a runtime-neutral environment (runtimeFree).
func startChild(b *testing.B, name, mode string, env ...string) *child {
	cmd := exec.Command(os.Args[0], "-test.run=^$", "-test.bench=^$")
	cmd.Env = append(append(runtimeFree(), serverEnv+"="+mode), env...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { stdin.Close(); _ = cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		b.Fatalf("%s address: %v", name, err)
	}
	c := &child{name: name, addr: strings.TrimSpace(line), cmd: cmd}
	// Two HTTP/2 connections, as a two-worker Envoy would hold.
	for range 2 {
		conn, err := grpc.NewClient(c.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { conn.Close() })
		c.conn = append(c.conn, conn)
	}
	return c
}

// cpuTime is the process's user+system CPU from /proc/<pid>/stat (all its threads).
func cpuTime(pid int) (time.Duration, error) {
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// Fields after the parenthesised command name; utime and stime are fields 14, 15.
	f := strings.Fields(string(raw[strings.LastIndexByte(string(raw), ')')+2:]))
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return time.Duration(ut+st) * (time.Second / 100), nil // USER_HZ = 100 on Linux
}

func request(user string) *extprocv3.ProcessingRequest {
	kv := []string{":authority", "edge.example", ":path", "/v2/models/ranker/infer", ":method", "POST", ":scheme", "http",
		"content-type", "application/json", "content-length", "412", "user-agent", "client/1.0",
		"x-request-id", "0d2b5f0e-5e9b-4a8f-9c53-1f2a3b4c5d6e", "x-forwarded-proto", "http", "x-country", "US",
		headers.UserID, user, "x-envoy-expected-rq-timeout-ms", "2000"}
	hm := &corev3.HeaderMap{}
	for i := 0; i < len(kv); i += 2 {
		hm.Headers = append(hm.Headers, &corev3.HeaderValue{Key: kv[i], RawValue: []byte(kv[i+1])})
	}
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{Headers: hm}}}
}

// once is one request as Envoy makes it: a new stream, request headers, the answer,
// half-close, end of stream.
func once(ctx context.Context, c extprocv3.ExternalProcessorClient, req *extprocv3.ProcessingRequest) error {
	s, err := c.Process(ctx)
	if err != nil {
		return err
	}
	if err := s.Send(req); err != nil {
		return err
	}
	r, err := s.Recv()
	if err != nil {
		return err
	}
	if len(r.GetRequestHeaders().GetResponse().GetHeaderMutation().GetSetHeaders()) == 0 {
		return errors.New("answer without header mutation")
	}
	if err := s.CloseSend(); err != nil {
		return err
	}
	if _, err := s.Recv(); !errors.Is(err, io.EOF) {
		return fmt.Errorf("end of stream: %v", err)
	}
	return nil
}

// round runs 16 workers against c for d and adds to c's totals.
func (c *child) round(b *testing.B, reqs []*extprocv3.ProcessingRequest, d time.Duration) {
	cpu0, err := cpuTime(c.cmd.Process.Pid)
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	start := time.Now()
	deadline := start.Add(d)
	var wg sync.WaitGroup
	lats := make([][]time.Duration, workers)
	errs := make([]error, workers)
	for w := range workers {
		client := extprocv3.NewExternalProcessorClient(c.conn[w%len(c.conn)])
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for time.Now().Before(deadline) {
				t0 := time.Now()
				if err := once(ctx, client, reqs[rng.IntN(len(reqs))]); err != nil {
					errs[w] = err
					return
				}
				lats[w] = append(lats[w], time.Since(t0))
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	cpu1, err := cpuTime(c.cmd.Process.Pid)
	if err != nil {
		b.Fatal(err)
	}
	if err := errors.Join(errs...); err != nil {
		b.Fatalf("%s: %v", c.name, err)
	}
	n := 0
	for _, l := range lats {
		n += len(l)
		c.lat = append(c.lat, l...)
	}
	c.n += n
	c.roundRPS = append(c.roundRPS, float64(n)/elapsed.Seconds())
	c.roundCPU = append(c.roundCPU, float64((cpu1-cpu0).Microseconds())/float64(n))
	c.elapsed += elapsed
	c.cpu += cpu1 - cpu0
}

func (c *child) report(b *testing.B) (rps, cpuPer float64, p50, p99 time.Duration) {
	slices.Sort(c.lat)
	rps = float64(c.n) / c.elapsed.Seconds()
	cpuPer = float64(c.cpu.Microseconds()) / float64(c.n)
	p50, p99 = c.lat[len(c.lat)/2], c.lat[len(c.lat)*99/100]
	b.Logf("%-9s %8.0f req/s   p50 %7v   p99 %7v   server CPU %.2f us/decision   (%d requests, %v CPU)",
		c.name, rps, p50.Round(time.Microsecond), p99.Round(time.Microsecond), cpuPer, c.n, c.cpu)
	return
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func fmtRatios(xs []float64) string {
	parts := make([]string, len(xs))
	for i, x := range xs {
		parts[i] = strconv.FormatFloat(x, 'f', 2, 64)
	}
	return "[" + strings.Join(parts, " ") + "]"
}

// BenchmarkExtprocVsFloor is a measurement, not a pass/fail test: it runs the binary
// as shipped (`go build ./cmd/patchbay`, then `patchbay extproc` with only its address
// flags, no tuning flags and no GOGC/GOMEMLIMIT in its environment) against the tuned
// floor (floorGOGC, floorWorkers), and prints both servers' figures and the ratios
// (goal: >= 0.9 on throughput and on CPU efficiency). It runs its fixed schedule once
// whatever b.N is. PATCHBAY_BENCH_AA=1 replaces the floor by a second shipped patchbay
// (an A/A run) to show how much the machine's noise moves the ratios;
// PATCHBAY_BENCH_LIBRARY=1 replaces the shipped binary by extproc.New in a child of this
// test binary (no telemetry, runtime defaults), and with PATCHBAY_BENCH_CPUPROFILE=dir
// profiles both children.
func BenchmarkExtprocVsFloor(b *testing.B) {
	xds := startADS(b)
	var pb *child
	if os.Getenv("PATCHBAY_BENCH_LIBRARY") != "" {
		pb = startChild(b, "library", "patchbay:"+xds)
	} else {
		pb = startShipped(b, "patchbay", buildPatchbay(b), xds, nil, nil)
	}
	fl := startChild(b, "floor", "floor", floorEnv()...)
	if os.Getenv("PATCHBAY_BENCH_AA") != "" {
		// A/A run: a second patchbay stands in for the floor, showing the noise level.
		fl = startShipped(b, "patchbay2", buildPatchbay(b), xds, nil, nil)
	}

	reqs := make([]*extprocv3.ProcessingRequest, 4096)
	for i := range reqs {
		reqs[i] = request("user-" + strconv.Itoa(i))
	}
	// Wait for patchbay's policy (its answers then carry a bucket) and warm both up.
	waitDeciding(b, pb, reqs[0])
	waitDeciding(b, fl, reqs[0])
	warm := []*child{{name: pb.name, cmd: pb.cmd, conn: pb.conn}, {name: fl.name, cmd: fl.cmd, conn: fl.conn}}
	for _, c := range warm {
		c.round(b, reqs, 300*time.Millisecond)
	}

	b.ResetTimer()
	for r := range rounds {
		order := []*child{pb, fl}
		if r%2 == 1 {
			order = []*child{fl, pb}
		}
		for _, c := range order {
			c.round(b, reqs, roundTime)
		}
	}
	b.StopTimer()
	pRPS, pCPU, pP50, pP99 := pb.report(b)
	fRPS, fCPU, fP50, fP99 := fl.report(b)
	b.Logf("ratios patchbay/floor: throughput %.3f   CPU efficiency (floor CPU / patchbay CPU per decision) %.3f   p50 %.2fx   p99 %.2fx",
		pRPS/fRPS, fCPU/pCPU, float64(pP50)/float64(fP50), float64(pP99)/float64(fP99))
	// Per adjacent pair of rounds (run back to back), the ratios' median: robust to
	// other load on the machine drifting during the run.
	var tr, cr []float64
	for i := range pb.roundRPS {
		tr = append(tr, pb.roundRPS[i]/fl.roundRPS[i])
		cr = append(cr, fl.roundCPU[i]/pb.roundCPU[i])
	}
	b.Logf("per-round ratios: throughput %s (median %.3f)   CPU efficiency %s (median %.3f)", fmtRatios(tr), median(tr), fmtRatios(cr), median(cr))
	b.ReportMetric(median(tr), "median-throughput-ratio")
	b.ReportMetric(median(cr), "median-cpu-efficiency-ratio")
	b.ReportMetric(pRPS/fRPS, "throughput-ratio")
	b.ReportMetric(fCPU/pCPU, "cpu-efficiency-ratio")
	b.ReportMetric(pCPU, "patchbay-cpu-us/decision")
	b.ReportMetric(fCPU, "floor-cpu-us/decision")
}
