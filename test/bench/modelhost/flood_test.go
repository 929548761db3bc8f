package modelhostbench

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

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

func medianDur(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	slices.Sort(d)
	return d[len(d)/2]
}

// TestFloodStaysBounded starts the real `patchbay modelhost` and floods it with
// maximum-size REST requests from many concurrent senders while ordinary small requests
// (REST and gRPC) keep coming. It asserts that the host's peak RSS stays within rssBound
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
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			_, err := gc.ModelInfer(ctx, smallGRPC)
			cancel()
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
