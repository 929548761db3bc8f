package modelhost_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/modelhost"
	"github.com/patchbay-io/patchbay/modelhost/runtime/builtin"
)

// gatedHost serves model "slow" whose calls block until g.release is closed.
func gatedHost(t *testing.T, mutate func(*modelhost.Config)) (*host, *gate) {
	t.Helper()
	repo := testRepo(t)
	writeFile(t, filepath.Join(repo, "slow", "v1", "model.yaml"), `runtime: gate
inputs:  [{name: x, datatype: FP32, shape: [-1, 1]}]
outputs: [{name: y, datatype: FP32, shape: [-1]}]
`)
	g := &gate{started: make(chan struct{}, 64), release: make(chan struct{})}
	h := startHost(t, repo, func(c *modelhost.Config) {
		c.Runtimes = builtin.Loaders()
		c.Runtimes["gate"] = g.load
		if mutate != nil {
			mutate(c)
		}
	})
	return h, g
}

const slowBody = `{"inputs":[{"name":"x","datatype":"FP32","shape":[1,1],"data":[1]}]}`

func slowGRPC() *oip.ModelInferRequest {
	return &oip.ModelInferRequest{ModelName: "slow", Inputs: []*oip.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{1, 1},
		Contents: &oip.InferTensorContents{Fp32Contents: []float32{1}}}}}
}

// post sends a REST infer in the background and reports its status.
func post(url, body string, out chan<- int) {
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		out <- -1
		return
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	out <- resp.StatusCode
}

// TestInflightBoundRefusesAtOnce: with --max-inflight 4 requests held in the model, a
// fifth REST request gets 429 with Retry-After and an OIP error, a fifth gRPC call
// RESOURCE_EXHAUSTED, and neither reaches the model (before the bound both queued in the
// model). Once the held requests finish, every slot is back (no leak on any path).
func TestInflightBoundRefusesAtOnce(t *testing.T) {
	h, g := gatedHost(t, func(c *modelhost.Config) { c.MaxInflight = 4 })
	held := make(chan int, 4)
	grpcHeld := make(chan error, 2)
	for range 2 {
		go post(h.url+"/v2/models/slow/infer", slowBody, held)
		go func() { _, err := h.grpc.ModelInfer(context.Background(), slowGRPC()); grpcHeld <- err }()
	}
	for range 4 {
		<-g.started
	}
	var e struct{ Error string }
	r := h.do(t, "POST", "/v2/models/slow/infer", slowBody, nil, &e)
	if r.StatusCode != http.StatusTooManyRequests || r.Header.Get("Retry-After") == "" || !strings.Contains(e.Error, "--max-inflight") {
		t.Errorf("fifth REST request: %d Retry-After %q %q, want 429 with Retry-After naming --max-inflight", r.StatusCode, r.Header.Get("Retry-After"), e.Error)
	}
	if _, err := h.grpc.ModelInfer(context.Background(), slowGRPC()); statusCode(err) != codes.ResourceExhausted {
		t.Errorf("fifth gRPC call: %v, want ResourceExhausted", err)
	}
	// Metadata and health are not inference and stay available.
	if r := h.do(t, "GET", "/v2/models/slow", "", nil, nil); r.StatusCode != 200 {
		t.Errorf("metadata while at capacity: %d", r.StatusCode)
	}
	select {
	case <-g.started:
		t.Error("a request beyond the bound reached the model")
	default:
	}
	close(g.release)
	for range 2 {
		if code := <-held; code != 200 {
			t.Errorf("held REST request: %d", code)
		}
		if err := <-grpcHeld; err != nil {
			t.Errorf("held gRPC call: %v", err)
		}
	}
	// A gRPC message over the size limit is refused by grpc-go after the tap admitted the
	// stream: its slot must come back too.
	big := slowGRPC()
	big.Id = strings.Repeat("x", 9<<20)
	if _, err := h.grpc.ModelInfer(context.Background(), big); statusCode(err) != codes.ResourceExhausted {
		t.Errorf("oversized gRPC message: %v", err)
	}
	waitFor(t, func() bool { n, b := h.srv.Inflight(); return n == 0 && b == 0 })
	for range 4 { // the whole budget is usable again
		if r := h.do(t, "POST", "/v2/models/slow/infer", slowBody, nil, nil); r.StatusCode != 200 {
			t.Fatalf("after the burst: %d", r.StatusCode)
		}
	}
}

// TestInflightBytesBound: requests held in the model count their bytes; one that would
// pass --max-inflight-bytes is refused at once, REST and gRPC.
func TestInflightBytesBound(t *testing.T) {
	h, g := gatedHost(t, func(c *modelhost.Config) { c.MaxBodyBytes = 4096; c.MaxInflightBytes = 8192 })
	padded := `{"id":"` + strings.Repeat("p", 3000) + `",` + slowBody[1:] // ~3 KB
	held := make(chan int, 2)
	for range 2 {
		go post(h.url+"/v2/models/slow/infer", padded, held)
	}
	for range 2 {
		<-g.started
	}
	var e struct{ Error string }
	if r := h.do(t, "POST", "/v2/models/slow/infer", padded, nil, &e); r.StatusCode != 429 || !strings.Contains(e.Error, "--max-inflight-bytes") {
		t.Errorf("third 3 KB request with 8 KB in flight allowed: %d %q, want 429 naming --max-inflight-bytes", r.StatusCode, e.Error)
	}
	bigGRPC := slowGRPC()
	bigGRPC.Inputs[0].Shape = []int64{900, 1}
	bigGRPC.Inputs[0].Contents.Fp32Contents = make([]float32, 900) // 3600 bytes
	if _, err := h.grpc.ModelInfer(context.Background(), bigGRPC); statusCode(err) != codes.ResourceExhausted {
		t.Errorf("3.6 KB gRPC call with 6 KB in flight: %v, want ResourceExhausted", err)
	}
	// A small request still fits.
	small := make(chan int, 1)
	go post(h.url+"/v2/models/slow/infer", slowBody, small)
	<-g.started
	close(g.release)
	if code := <-small; code != 200 {
		t.Errorf("small request next to held large ones: %d", code)
	}
	for range 2 {
		if code := <-held; code != 200 {
			t.Errorf("held request: %d", code)
		}
	}
	waitFor(t, func() bool { n, b := h.srv.Inflight(); return n == 0 && b == 0 })
}

// TestInflightConfigErrors: bounds that could never admit a largest request are refused.
func TestInflightConfigErrors(t *testing.T) {
	if _, err := modelhost.New(modelhost.Config{Repository: testRepo(t), MaxBodyBytes: 1 << 20, MaxInflightBytes: 1 << 19}); err == nil {
		t.Error("max in-flight bytes below max body bytes: no error")
	}
	if _, err := modelhost.New(modelhost.Config{Repository: testRepo(t), ReadTimeout: -1}); err == nil {
		t.Error("negative timeout: no error")
	}
}

// TestSlowBodyCannotHoldASlot: a client that sends its headers and then trickles nothing
// holds its in-flight slot and bytes only until ReadTimeout; the host then answers or
// closes the connection and the budget is whole again (before the timeouts, such a
// connection stayed open for good).
func TestSlowBodyCannotHoldASlot(t *testing.T) {
	h := startHost(t, testRepo(t), func(c *modelhost.Config) { c.ReadTimeout = 300 * time.Millisecond; c.MaxInflight = 2 })
	conn, err := net.Dial("tcp", strings.TrimPrefix(h.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, "POST /v2/models/ranker/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"inputs\":"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { n, _ := h.srv.Inflight(); return n == 1 })
	closed := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, conn) // returns when the host closes the connection
		closed <- err
	}()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("the host kept a connection with a stalled body open")
	}
	waitFor(t, func() bool { n, b := h.srv.Inflight(); return n == 0 && b == 0 })
}

// TestBatchQueueBoundsOverTheWire: a batched version whose queue (max_queue: 1) is full
// refuses at once with 429 + Retry-After / RESOURCE_EXHAUSTED (before the bound the call
// waited for room in a 1024-deep queue). Deadlines in the queue: internal/batch tests.
func TestBatchQueueBoundsOverTheWire(t *testing.T) {
	repo := testRepo(t)
	writeFile(t, filepath.Join(repo, "slowb", "v1", "model.yaml"), `runtime: gate
inputs:  [{name: x, datatype: FP32, shape: [-1, 1]}]
outputs: [{name: y, datatype: FP32, shape: [-1]}]
batching: {max_batch_size: 1, max_delay: 0s, instances: 1, max_queue: 1}
`)
	g := &gate{started: make(chan struct{}, 64), release: make(chan struct{})}
	h := startHost(t, repo, func(c *modelhost.Config) {
		c.Runtimes = builtin.Loaders()
		c.Runtimes["gate"] = g.load
	})
	body := strings.Replace(slowBody, "[1]}", "[7]}", 1)
	url := h.url + "/v2/models/slowb/infer"
	type answer struct {
		code       int
		retryAfter string
		body       string
	}
	answers := make(chan answer, 5)
	send := func() {
		resp, err := http.Post(url, "application/json", strings.NewReader(body))
		if err != nil {
			answers <- answer{code: -1, body: err.Error()}
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		answers <- answer{resp.StatusCode, resp.Header.Get("Retry-After"), string(b)}
	}
	go send()
	<-g.started // the one instance is busy
	// Four more: the collector holds one waiting for the instance, the queue (max_queue: 1)
	// one more, so exactly two are refused, at once, while the others wait.
	for range 4 {
		go send()
	}
	for range 2 {
		a := <-answers
		if a.code != http.StatusTooManyRequests || a.retryAfter == "" || !strings.Contains(a.body, "batch queue is full") {
			t.Errorf("on a full batch queue: %d Retry-After %q %s, want 429 with Retry-After", a.code, a.retryAfter, a.body)
		}
	}
	req := slowGRPC()
	req.ModelName = "slowb"
	if _, err := h.grpc.ModelInfer(context.Background(), req); statusCode(err) != codes.ResourceExhausted {
		t.Errorf("gRPC on a full batch queue: %v, want ResourceExhausted", err)
	}
	close(g.release)
	for range 3 {
		if a := <-answers; a.code != 200 {
			t.Errorf("queued request: %d %s", a.code, a.body)
		}
	}
}

// stalledStream opens a ModelInfer stream that sends its headers and never its message.
func stalledStream(t *testing.T, h *host) grpc.ClientStream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	cs, err := h.conn.NewStream(ctx, &grpc.StreamDesc{ClientStreams: true, ServerStreams: true}, "/inference.GRPCInferenceService/ModelInfer")
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

// recvErr waits (bounded) for the end of a stream that never sent its message.
func recvErr(t *testing.T, cs grpc.ClientStream) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cs.RecvMsg(new(oip.ModelInferResponse)) }()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("stream still open after 10s")
		return nil
	}
}

// TestGRPCStreamsTakeTheLargeShare: ModelInfer streams that send headers and never
// complete their message are admitted as the largest message they could send: 7/8 of the
// slots, --max-body-bytes each, so the host keeps room for small REST requests while they
// stall (before the fix they took every slot and charged no bytes: all inference 429ed).
func TestGRPCStreamsTakeTheLargeShare(t *testing.T) {
	const maxBody = 1 << 20
	h := startHost(t, testRepo(t), func(c *modelhost.Config) { c.MaxInflight, c.MaxBodyBytes = 8, maxBody })
	var streams []grpc.ClientStream
	for range 7 {
		streams = append(streams, stalledStream(t, h))
	}
	waitFor(t, func() bool { n, b := h.srv.Inflight(); return n == 7 && b == 7*maxBody })
	if err := recvErr(t, stalledStream(t, h)); statusCode(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "--max-inflight") {
		t.Errorf("eighth stream with 7 of 8 slots held by gRPC streams: %v, want ResourceExhausted", err)
	}
	// While they stall, a small REST request still runs in the reserved eighth.
	if r := h.do(t, "POST", "/v2/models/ranker/infer", rankerREST, nil, nil); r.StatusCode != 200 {
		t.Errorf("small REST request while gRPC streams stall: %d", r.StatusCode)
	}
	for _, cs := range streams {
		_ = cs.CloseSend() // the end of a stream without a message gives everything back
		if err := recvErr(t, cs); err == nil {
			t.Error("a stream without a message got a response")
		}
	}
	waitFor(t, func() bool { n, b := h.srv.Inflight(); return n == 0 && b == 0 })
}

// TestStalledGRPCStreamsReleaseTheirSlots: a ModelInfer stream that sends its headers and
// never its message is ended by the host once ReadTimeout has passed (like a REST body,
// TestSlowBodyCannotHoldASlot), giving its slot and reserved bytes back, so one connection
// opening --max-inflight such streams cannot hold the host (before the fix they stayed open
// for good and this test timed out waiting for them to end).
func TestStalledGRPCStreamsReleaseTheirSlots(t *testing.T) {
	h := startHost(t, testRepo(t), func(c *modelhost.Config) { c.MaxInflight, c.ReadTimeout = 8, 300*time.Millisecond })
	var streams []grpc.ClientStream
	for range 7 {
		streams = append(streams, stalledStream(t, h))
	}
	for _, cs := range streams {
		if err := recvErr(t, cs); err == nil {
			t.Error("a stalled stream got a response")
		}
	}
	waitFor(t, func() bool { n, b := h.srv.Inflight(); return n == 0 && b == 0 })
	if _, err := h.grpc.ModelInfer(context.Background(), rankerGRPC()); err != nil {
		t.Errorf("gRPC after the stalled streams ended: %v", err)
	}
}

const rankerREST = `{"inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":[0,0,0,0,0,0,0,0]}]}`

// TestGRPCReservesTheLargestMessage: a ModelInfer stream holds --max-body-bytes of the byte
// budget until its message is decoded (grpc-go may buffer that much before any handler
// runs), so a stream past --max-inflight-bytes is refused RESOURCE_EXHAUSTED before it
// can send (before the fix, bytes were charged only after the whole message was in, and 256
// streams of 8 MiB held 2 GiB against a 128 MiB bound). Once decoded, a stream holds its
// message's real size only.
func TestGRPCReservesTheLargestMessage(t *testing.T) {
	h, g := gatedHost(t, func(c *modelhost.Config) { c.MaxBodyBytes = 4096; c.MaxInflightBytes = 8192 })
	cs := stalledStream(t, h)
	cs2 := stalledStream(t, h)
	waitFor(t, func() bool { n, b := h.srv.Inflight(); return n == 2 && b == 8192 })
	if err := recvErr(t, stalledStream(t, h)); statusCode(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "--max-inflight-bytes") {
		t.Errorf("third stream with 8 KiB of 8 KiB reserved: %v, want ResourceExhausted naming --max-inflight-bytes", err)
	}
	if r := h.do(t, "POST", "/v2/models/ranker/infer", rankerREST, nil, nil); r.StatusCode != 429 {
		t.Errorf("REST request with the byte budget reserved: %d, want 429", r.StatusCode)
	}
	if err := cs2.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if err := recvErr(t, cs2); err == nil {
		t.Error("a stream without a message got a response")
	}
	if err := cs.CloseSend(); err != nil { // ends the stream without a message: reservation back
		t.Fatal(err)
	}
	if err := recvErr(t, cs); err == nil {
		t.Error("a stream without a message got a response")
	}
	waitFor(t, func() bool { n, b := h.srv.Inflight(); return n == 0 && b == 0 })
	// A decoded message held in the model holds its 4 bytes, not the 4096 reserved.
	held := make(chan error, 1)
	go func() { _, err := h.grpc.ModelInfer(context.Background(), slowGRPC()); held <- err }()
	<-g.started
	waitFor(t, func() bool { n, b := h.srv.Inflight(); return n == 1 && b == 4 })
	close(g.release)
	if err := <-held; err != nil {
		t.Errorf("held call: %v", err)
	}
	waitFor(t, func() bool { n, b := h.srv.Inflight(); return n == 0 && b == 0 })
}

func rankerGRPC() *oip.ModelInferRequest {
	return &oip.ModelInferRequest{ModelName: "ranker", Inputs: []*oip.ModelInferRequest_InferInputTensor{{Name: "features", Datatype: "FP32", Shape: []int64{1, 8},
		Contents: &oip.InferTensorContents{Fp32Contents: make([]float32, 8)}}}}
}
