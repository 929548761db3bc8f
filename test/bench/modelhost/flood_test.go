package modelhostbench

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/test/harness"
)

func TestMain(m *testing.M) { os.Exit(harness.Main(m)) }

// Flood parameters. The host runs with --max-body-bytes floodBody, --max-inflight
// floodSlots and --max-inflight-bytes floodBytes.
const (
	floodBody     = 4 << 20
	floodBytes    = 16 << 20
	floodSlots    = 16
	floodClients  = 48 // concurrent senders of maximum-size requests
	floodEach     = 8  // requests per sender: the flood ends by itself
	ordinaryLimit = 400
)

// rssBound is the most the host's peak RSS may grow over its warmed-up baseline: every
// admitted body byte is held as the body buffer, at most once more as the decoded FP32
// tensor (4-byte literals "0.5," decode to 4 bytes), plus small outputs: ~2x live; Go's
// GC (GOGC=100) lets the heap reach twice the live set: 4x; freed pages not yet returned
// to the OS and per-connection buffers of the refused requests: a further 2x. So 8x the
// in-flight byte bound. Without the bounds every sender's request is admitted at once
// (48 x ~7 MB live, ~0.7 GB of heap).
const rssBound = 8 * floodBytes

// maxBody is an OIP request for lin16 (16 FP32 features per row) as close to floodBody as
// it gets.
func maxBody() []byte {
	const head = `{"inputs":[{"name":"x","datatype":"FP32","shape":[`
	rows := (floodBody - 200) / (16 * 4) // "0.5," per element
	var b bytes.Buffer
	b.Grow(floodBody)
	b.WriteString(head + strconv.Itoa(rows) + `,16],"data":[`)
	for i := range rows * 16 {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString("0.5")
	}
	b.WriteString("]}]}")
	return b.Bytes()
}

// vmKB reads a "Vm...:  N kB" line of /proc/<pid>/status.
func vmKB(t *testing.T, pid int, field string) int64 {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), field+":"); ok {
			n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("/proc/%d/status has no %s", pid, field)
	return 0
}

// pidOf finds the child whose command line holds marker (its unique repository path).
func pidOf(t *testing.T, marker string) int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Skip("no /proc: RSS cannot be read here")
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmd, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmd, []byte("modelhost\x00")) && bytes.Contains(cmd, []byte(marker)) {
			return pid
		}
	}
	t.Fatal("modelhost process not found in /proc")
	return 0
}

// inferRetrying is an ordinary gRPC client: it retries RESOURCE_EXHAUSTED a bounded number
// of times, as a client of any bounded gRPC server should (Envoy: retry_on
// resource-exhausted). A gRPC request declares no size, so the host admits every ModelInfer
// stream as the largest message it could send (modelhost/limits.go, tap): while maximum-size
// requests fill the large-request share, a small gRPC call waits for one of them to end,
// where a small REST request (its Content-Length declared) runs in the reserved eighth.
// It reports how many attempts were refused.
func inferRetrying(gc oip.GRPCInferenceServiceClient, req *oip.ModelInferRequest) (refusals int, err error) {
	for range 100 {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, err = gc.ModelInfer(ctx, req)
		cancel()
		if status.Code(err) != codes.ResourceExhausted {
			return refusals, err
		}
		refusals++
		time.Sleep(10 * time.Millisecond)
	}
	return refusals, err
}

func medianDur(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	slices.Sort(d)
	return d[len(d)/2]
}

// TestFloodStaysBounded starts the real `patchbay modelhost` and floods it with
// maximum-size REST requests from many concurrent senders while ordinary small requests
// (REST and gRPC, the gRPC ones retrying RESOURCE_EXHAUSTED: see inferRetrying) keep coming. It asserts that the host's peak RSS stays within rssBound
// of its warmed-up baseline, that the excess was refused with 429 + Retry-After faster
// than a maximum-size request is served (medians of the same run), and that ordinary
// requests kept succeeding.
func TestFloodStaysBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("flood test: skipped in -short")
	}
	repo := benchRepo(t)
	httpAddr, grpcAddr, adminAddr := harness.FreeAddr(t), harness.FreeAddr(t), harness.FreeAddr(t)
	harness.Start(t, "modelhost", "http://"+httpAddr+"/v2/health/ready", harness.Binary(t),
		"modelhost", "--repository", repo, "--http", httpAddr, "--grpc", grpcAddr, "--admin", adminAddr,
		"--max-body-bytes", strconv.Itoa(floodBody), "--max-inflight", strconv.Itoa(floodSlots),
		"--max-inflight-bytes", strconv.Itoa(floodBytes))
	pid := pidOf(t, repo)
	url := "http://" + httpAddr + "/v2/models/lin16/infer"
	big := maxBody()
	small := body16()

	send := func(c *http.Client, body []byte, expect bool) (int, http.Header, time.Duration, error) {
		start := time.Now()
		req, err := http.NewRequest("POST", url, bytes.NewReader(body))
		if err != nil {
			return 0, nil, 0, err
		}
		req.Header.Set("Content-Type", "application/json")
		if expect {
			req.Header.Set("Expect", "100-continue")
		}
		resp, err := c.Do(req)
		if err != nil {
			return 0, nil, time.Since(start), err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, resp.Header, time.Since(start), nil
	}
	// Warm up: a few of each, one at a time, then the baseline.
	warm := &http.Client{}
	for range 3 {
		if code, _, _, err := send(warm, big, false); err != nil || code != 200 {
			t.Fatalf("warm-up maximum-size request: %d %v", code, err)
		}
		if code, _, _, err := send(warm, small, false); err != nil || code != 200 {
			t.Fatalf("warm-up small request: %d %v", code, err)
		}
	}
	baseline := vmKB(t, pid, "VmRSS") << 10

	conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	gc := oip.NewGRPCInferenceServiceClient(conn)
	smallGRPC := &oip.ModelInferRequest{ModelName: "lin16", Inputs: []*oip.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32",
		Shape: []int64{1, 16}, Contents: &oip.InferTensorContents{Fp32Contents: make([]float32, 16)}}}}

	var (
		mu                 sync.Mutex
		served, refused    []time.Duration // refused: senders using Expect: 100-continue
		refusedPushed      []time.Duration // refused: senders pushing the body at once
		otherStatus        = map[string]int{}
		noRetryAfter       int
		ordOK, ordAll      int
		ordFailures        = map[string]int{}
		floodDone          = make(chan struct{})
		wg, ordinary       sync.WaitGroup
		floodClient        = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: floodClients, ExpectContinueTimeout: 10 * time.Second}}
		ordinaryHTTPClient = &http.Client{}
	)
	for i := range floodClients {
		// Half the senders ask "Expect: 100-continue" (as curl does for large bodies): a
		// refusal then costs no upload, and its latency is the host's. The others push
		// their body at once, as Envoy does; the host refuses them as soon as the headers
		// are read, but the client has pushed megabytes into the socket by then.
		expect := i%2 == 0
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range floodEach {
				code, h, d, err := send(floodClient, big, expect)
				mu.Lock()
				switch {
				case err != nil:
					otherStatus["error: "+err.Error()]++
				case code == 200:
					served = append(served, d)
				case code == 429 && expect:
					refused = append(refused, d)
					fallthrough
				case code == 429:
					if !expect {
						refusedPushed = append(refusedPushed, d)
					}
					if h.Get("Retry-After") == "" {
						noRetryAfter++
					}
				default:
					otherStatus[strconv.Itoa(code)]++
				}
				mu.Unlock()
			}
		}()
	}
	record := func(err error) {
		mu.Lock()
		defer mu.Unlock()
		ordAll++
		if err == nil {
			ordOK++
		} else {
			ordFailures[err.Error()]++
		}
	}
	ordinary.Add(2)
	go func() { // ordinary REST requests, one at a time, while the flood lasts
		defer ordinary.Done()
		for range ordinaryLimit {
			select {
			case <-floodDone:
				return
			default:
			}
			code, _, _, err := send(ordinaryHTTPClient, small, false)
			if err == nil && code != 200 {
				err = fmt.Errorf("REST status %d", code)
			}
			record(err)
		}
	}()
	go func() { // and over gRPC
		defer ordinary.Done()
		for range ordinaryLimit {
			select {
			case <-floodDone:
				return
			default:
			}
			_, err := inferRetrying(gc, smallGRPC)
			record(err)
		}
	}()
	wg.Wait()
	close(floodDone)
	ordinary.Wait()

	peak := vmKB(t, pid, "VmHWM") << 10
	growth := peak - baseline
	t.Logf("flood: %d maximum-size requests (%d bytes each) from %d senders: %d served (median %v), %d refused with 429 (%d of them pushing the body), other %v",
		floodClients*floodEach, len(big), floodClients, len(served), medianDur(served), len(refused)+len(refusedPushed), len(refusedPushed), otherStatus)
	t.Logf("RSS: baseline %d MiB, peak %d MiB, growth %d MiB, bound %d MiB (8 x --max-inflight-bytes)", baseline>>20, peak>>20, growth>>20, rssBound>>20)
	pct := func(d []time.Duration) string {
		slices.Sort(d)
		if len(d) == 0 {
			return "none"
		}
		return fmt.Sprintf("p10 %v p50 %v p90 %v", d[len(d)/10], d[len(d)/2], d[len(d)*9/10])
	}
	t.Logf("served %s; refused with Expect %s; refused pushing the body %s", pct(served), pct(refused), pct(refusedPushed))
	t.Logf("ordinary requests during the flood: %d of %d succeeded %v", ordOK, ordAll, ordFailures)

	if growth > rssBound {
		t.Errorf("peak RSS grew by %d MiB over the baseline, bound %d MiB", growth>>20, rssBound>>20)
	}
	if len(refused) == 0 || len(refusedPushed) == 0 {
		t.Errorf("refused: %d with Expect, %d pushing the body; want both > 0 (the flood was not bounded)", len(refused), len(refusedPushed))
	}
	if len(served) == 0 {
		t.Fatal("no maximum-size request was served during the flood")
	}
	if noRetryAfter > 0 {
		t.Errorf("%d refusals without Retry-After", noRetryAfter)
	}
	if ms, mr := medianDur(served), medianDur(refused); mr >= ms {
		t.Errorf("refusals (median %v) were not faster than serving a maximum-size request (median %v)", mr, ms)
	}
	if len(otherStatus) > 0 {
		t.Errorf("maximum-size requests answered neither 200 nor 429: %v", otherStatus)
	}
	if ordAll < 20 {
		t.Fatalf("only %d ordinary requests were sent during the flood", ordAll)
	}
	if ratio := float64(ordOK) / float64(ordAll); ratio < 0.95 {
		t.Errorf("ordinary requests during the flood: %.2f succeeded, want >= 0.95", ratio)
	}
}

// grpcFloodSlots is the gRPC flood's --max-inflight: more than the senders, so that only the
// byte bound can hold the flood back (one slot per stream is not a memory bound).
const grpcFloodSlots = 4 * floodClients

// grpcFloodEach is the calls per sender in the gRPC flood: a refusal costs a gRPC sender far
// less than a REST one (the host refuses on the HEADERS frame, before the message's window is
// opened), so the gRPC flood needs more calls to last as long.
const grpcFloodEach = 32

// maxGRPC is a ModelInfer request for lin16 as close to floodBody as it gets: raw FP32
// rows of 16 features.
func maxGRPC() *oip.ModelInferRequest {
	rows := (floodBody - 256) / (16 * 4)
	return &oip.ModelInferRequest{ModelName: "lin16", Inputs: []*oip.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32",
		Shape: []int64{int64(rows), 16}}}, RawInputContents: [][]byte{make([]byte, rows*16*4)}}
}

// TestGRPCFloodStaysBounded is TestFloodStaysBounded over gRPC: the real `patchbay
// modelhost`, maximum-size ModelInfer calls from many concurrent senders over several
// connections (one connection may hold --max-inflight streams), ordinary small REST and gRPC
// requests during the flood. It asserts that peak RSS stays within rssBound of the warmed-up
// baseline, that the excess was refused with RESOURCE_EXHAUSTED (that a refusal comes before
// the message is sent is TestGRPCHeldMessagesStayBounded's; a gRPC client's refusal latency
// here is mostly its own marshalling, so it is logged, not compared), that nothing else went wrong, and that ordinary requests kept
// succeeding: REST at the first try (>= 95%), gRPC within inferRetrying's bounded retries.
//
// The bound: an admitted stream reserves --max-body-bytes until its message is decoded, so at
// most 7/8 x --max-inflight-bytes of messages are admitted at once; each is held as grpc-go's
// receive buffers, once more while the proto decodes (raw bytes are copied out), and once
// more as the decoded FP32 tensor: under 3x live, the receive buffers going back to grpc-go's
// pool as each message is decoded. Go's GC lets the heap reach twice the live set, and the
// pool and pages not yet returned to the OS add slack: 8 x --max-inflight-bytes, as for REST.
// TestGRPCHeldMessagesStayBounded shows the same bound against streams that hold their
// messages instead of completing them.
func TestGRPCFloodStaysBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("flood test: skipped in -short")
	}
	repo := benchRepo(t)
	httpAddr, grpcAddr, adminAddr := harness.FreeAddr(t), harness.FreeAddr(t), harness.FreeAddr(t)
	harness.Start(t, "modelhost", "http://"+httpAddr+"/v2/health/ready", harness.Binary(t),
		"modelhost", "--repository", repo, "--http", httpAddr, "--grpc", grpcAddr, "--admin", adminAddr,
		"--max-body-bytes", strconv.Itoa(floodBody), "--max-inflight", strconv.Itoa(grpcFloodSlots),
		"--max-inflight-bytes", strconv.Itoa(floodBytes))
	pid := pidOf(t, repo)
	const conns = 4
	clients := make([]oip.GRPCInferenceServiceClient, conns)
	for i := range clients {
		conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		clients[i] = oip.NewGRPCInferenceServiceClient(conn)
	}
	big := maxGRPC()
	smallGRPC := &oip.ModelInferRequest{ModelName: "lin16", Inputs: []*oip.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32",
		Shape: []int64{1, 16}, Contents: &oip.InferTensorContents{Fp32Contents: make([]float32, 16)}}}}
	small := body16()
	url := "http://" + httpAddr + "/v2/models/lin16/infer"
	call := func(gc oip.GRPCInferenceServiceClient, req *oip.ModelInferRequest) (time.Duration, error) {
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		_, err := gc.ModelInfer(ctx, req)
		return time.Since(start), err
	}
	for range 3 {
		if _, err := call(clients[0], big); err != nil {
			t.Fatalf("warm-up maximum-size call: %v", err)
		}
		if _, err := call(clients[0], smallGRPC); err != nil {
			t.Fatalf("warm-up small call: %v", err)
		}
	}
	baseline := vmKB(t, pid, "VmRSS") << 10

	var (
		mu              sync.Mutex
		served, refused []time.Duration
		otherStatus     = map[string]int{}
		restOK, restAll int
		grpcOK, grpcAll int
		grpcRefusals    int
		failures        = map[string]int{}
		floodDone       = make(chan struct{})
		wg, ordinary    sync.WaitGroup
		ordinaryHTTP    = &http.Client{}
		ordinaryGRPC    = clients[0]
		recordOrdinary  = func(ok, all *int, err error) {
			mu.Lock()
			defer mu.Unlock()
			*all++
			if err == nil {
				*ok++
			} else {
				failures[err.Error()]++
			}
		}
	)
	for i := range floodClients {
		gc := clients[i%conns]
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range grpcFloodEach {
				d, err := call(gc, big)
				mu.Lock()
				switch status.Code(err) {
				case codes.OK:
					served = append(served, d)
				case codes.ResourceExhausted:
					refused = append(refused, d)
				default:
					otherStatus[status.Code(err).String()+": "+status.Convert(err).Message()]++
				}
				mu.Unlock()
			}
		}()
	}
	ordinary.Add(2)
	go func() {
		defer ordinary.Done()
		for range ordinaryLimit {
			select {
			case <-floodDone:
				return
			default:
			}
			resp, err := ordinaryHTTP.Post(url, "application/json", bytes.NewReader(small))
			if err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					err = fmt.Errorf("REST status %d", resp.StatusCode)
				}
			}
			recordOrdinary(&restOK, &restAll, err)
		}
	}()
	go func() {
		defer ordinary.Done()
		for range ordinaryLimit {
			select {
			case <-floodDone:
				return
			default:
			}
			n, err := inferRetrying(ordinaryGRPC, smallGRPC)
			mu.Lock()
			grpcRefusals += n
			mu.Unlock()
			recordOrdinary(&grpcOK, &grpcAll, err)
		}
	}()
	wg.Wait()
	close(floodDone)
	ordinary.Wait()

	peak := vmKB(t, pid, "VmHWM") << 10
	growth := peak - baseline
	t.Logf("gRPC flood: %d maximum-size calls (%d raw bytes each) from %d senders on %d connections: %d served (median %v), %d refused with RESOURCE_EXHAUSTED (median %v), other %v",
		floodClients*grpcFloodEach, len(big.RawInputContents[0]), floodClients, conns, len(served), medianDur(served), len(refused), medianDur(refused), otherStatus)
	t.Logf("RSS: baseline %d MiB, peak %d MiB, growth %d MiB, bound %d MiB (8 x --max-inflight-bytes)", baseline>>20, peak>>20, growth>>20, rssBound>>20)
	t.Logf("ordinary requests during the flood: REST %d of %d succeeded at the first try; gRPC %d of %d succeeded (%d refused attempts retried) %v",
		restOK, restAll, grpcOK, grpcAll, grpcRefusals, failures)

	if growth > rssBound {
		t.Errorf("peak RSS grew by %d MiB over the baseline, bound %d MiB", growth>>20, rssBound>>20)
	}
	if len(refused) == 0 {
		t.Error("no maximum-size call was refused: the flood was not bounded")
	}
	if len(served) == 0 {
		t.Fatal("no maximum-size call was served during the flood")
	}
	if len(otherStatus) > 0 {
		t.Errorf("maximum-size calls answered neither OK nor RESOURCE_EXHAUSTED: %v", otherStatus)
	}
	if restAll < 10 || grpcAll < 10 {
		t.Fatalf("only %d REST and %d gRPC ordinary requests were sent during the flood", restAll, grpcAll)
	}
	if ratio := float64(restOK) / float64(restAll); ratio < 0.95 {
		t.Errorf("ordinary REST requests during the flood: %.2f succeeded, want >= 0.95", ratio)
	}
	if ratio := float64(grpcOK) / float64(grpcAll); ratio < 0.95 {
		t.Errorf("ordinary gRPC requests during the flood: %.2f succeeded, want >= 0.95", ratio)
	}
}

// stallingConn passes writes through until limit bytes have been written, then blocks every
// further write until release is closed, and then closes the connection: a gRPC client whose message stops just short of
// its end, the server having already buffered the rest.
type stallingConn struct {
	net.Conn
	limit   int64
	written atomic.Int64
	stalled chan struct{} // closed once the limit is reached
	release chan struct{}
	once    sync.Once
}

func (c *stallingConn) Write(p []byte) (int, error) {
	if room := c.limit - c.written.Load(); int64(len(p)) > room {
		n, _ := c.Conn.Write(p[:max(room, 0)])
		c.written.Add(int64(n))
		c.once.Do(func() { close(c.stalled) })
		<-c.release
		c.Conn.Close() // the client goes away with its message unfinished
		return n, net.ErrClosed
	}
	n, err := c.Conn.Write(p)
	c.written.Add(int64(n))
	return n, err
}

// TestGRPCHeldMessagesStayBounded: heldSenders clients each start a maximum-size ModelInfer
// call and stop sending ~50 KB before the end of its message, each on its own connection,
// so the host buffers almost the whole message and waits (grpc-go opens a stream's window
// for the whole message once it has read its length prefix). The host must admit only what
// --max-inflight-bytes allows (a stream reserves --max-body-bytes until its message is
// decoded, 7/8 of the budget for such streams: 3 of them here) and refuse the rest with
// RESOURCE_EXHAUSTED before they send; its peak RSS stays within rssBound of the baseline;
// small REST requests keep succeeding at the first try while the streams are held; once they
// go, small gRPC calls succeed again. Before the fix every stream was admitted (bytes were
// charged only once a message was complete) and the host held ~heldSenders x 4 MiB.
func TestGRPCHeldMessagesStayBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("flood test: skipped in -short")
	}
	const heldSenders = 48
	repo := benchRepo(t)
	httpAddr, grpcAddr, adminAddr := harness.FreeAddr(t), harness.FreeAddr(t), harness.FreeAddr(t)
	harness.Start(t, "modelhost", "http://"+httpAddr+"/v2/health/ready", harness.Binary(t),
		"modelhost", "--repository", repo, "--http", httpAddr, "--grpc", grpcAddr, "--admin", adminAddr,
		"--max-body-bytes", strconv.Itoa(floodBody), "--max-inflight", strconv.Itoa(4*heldSenders),
		"--max-inflight-bytes", strconv.Itoa(floodBytes))
	pid := pidOf(t, repo)
	conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	gc := oip.NewGRPCInferenceServiceClient(conn)
	big := maxGRPC()
	smallGRPC := &oip.ModelInferRequest{ModelName: "lin16", Inputs: []*oip.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32",
		Shape: []int64{1, 16}, Contents: &oip.InferTensorContents{Fp32Contents: make([]float32, 16)}}}}
	for range 3 {
		if _, err := gc.ModelInfer(context.Background(), big); err != nil {
			t.Fatalf("warm-up maximum-size call: %v", err)
		}
	}
	baseline := vmKB(t, pid, "VmRSS") << 10

	release := make(chan struct{})
	var results []chan error
	var wg sync.WaitGroup
	defer func() { close(release); wg.Wait() }()
	var stalled []chan struct{}
	var conns []*stallingConn
	for range heldSenders {
		sc := &stallingConn{limit: floodBody - 50_000, stalled: make(chan struct{}), release: release}
		stalled = append(stalled, sc.stalled)
		conns = append(conns, sc)
		dial := func(ctx context.Context, addr string) (net.Conn, error) {
			c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
			sc.Conn = c
			return sc, err
		}
		cc, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithContextDialer(dial))
		if err != nil {
			t.Fatal(err)
		}
		res := make(chan error, 1)
		results = append(results, res)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer cc.Close()
			_, err := oip.NewGRPCInferenceServiceClient(cc).ModelInfer(context.Background(), big)
			res <- err
		}()
	}
	// Every sender either is held by the host (its connection stalled at the limit) or was
	// answered.
	held, refused, other := 0, 0, map[string]int{}
	var pushed int64 // the most a refused sender wrote
	for i, st := range stalled {
		select {
		case <-st:
			held++
		case err := <-results[i]:
			if status.Code(err) == codes.ResourceExhausted {
				refused++
				pushed = max(pushed, conns[i].written.Load())
			} else {
				other[fmt.Sprint(err)]++
			}
		}
	}
	rest, restOK := 0, 0
	for range 50 {
		resp, err := http.Post("http://"+httpAddr+"/v2/models/lin16/infer", "application/json", bytes.NewReader(body16()))
		rest++
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 {
				restOK++
			}
		}
	}
	peak := vmKB(t, pid, "VmHWM") << 10
	growth := peak - baseline
	t.Logf("%d senders stopping ~50 KB short of a %d-byte message: %d held by the host, %d refused with RESOURCE_EXHAUSTED, other %v",
		heldSenders, len(big.RawInputContents[0]), held, refused, other)
	t.Logf("RSS: baseline %d MiB, peak %d MiB, growth %d MiB, bound %d MiB (8 x --max-inflight-bytes)", baseline>>20, peak>>20, growth>>20, rssBound>>20)
	t.Logf("small REST requests while the streams are held: %d of %d succeeded; a refused sender wrote at most %d bytes", restOK, rest, pushed)
	// Refused on its HEADERS frame, a sender can have sent no more than the stream's initial
	// flow-control window (grpc-go's default 64 KiB) and the connection's preface and headers.
	if pushed > 128<<10 {
		t.Errorf("a refused sender wrote %d bytes: it was refused only after sending its message", pushed)
	}
	if want := int((floodBytes - floodBytes/8) / floodBody); held > want {
		t.Errorf("%d streams held, want at most %d (7/8 of --max-inflight-bytes / --max-body-bytes)", held, want)
	}
	if growth > rssBound {
		t.Errorf("peak RSS grew by %d MiB over the baseline, bound %d MiB", growth>>20, rssBound>>20)
	}
	if len(other) > 0 {
		t.Errorf("senders answered other than RESOURCE_EXHAUSTED: %v", other)
	}
	if restOK != rest {
		t.Errorf("small REST requests while streams are held: %d of %d succeeded", restOK, rest)
	}
	close(release)
	wg.Wait()
	release = make(chan struct{}) // for the deferred close
	if _, err := inferRetrying(gc, smallGRPC); err != nil {
		t.Errorf("small gRPC call once the held streams went: %v", err)
	}
}
