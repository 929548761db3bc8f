package shadow_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/patchbay-io/patchbay/api/oip"
	shadowv1 "github.com/patchbay-io/patchbay/api/shadow/v1"
	"github.com/patchbay-io/patchbay/internal/telemetry"
	"github.com/patchbay-io/patchbay/modelhost"
	rt "github.com/patchbay-io/patchbay/modelhost/runtime"
	"github.com/patchbay-io/patchbay/modelhost/runtime/builtin"
	"github.com/patchbay-io/patchbay/modelhost/tensor"
	"github.com/patchbay-io/patchbay/xds/shadow"
)

// serve runs c's Records service on 127.0.0.1:0 and returns its address.
func serve(t *testing.T, c *shadow.Comparator) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	c.Register(g)
	go func() { _ = g.Serve(l) }()
	t.Cleanup(g.Stop)
	return l.Addr().String()
}

// classes is a test runtime with known answers: for a row x (an integer), class
// int(x) % 3, moved to the next class when flip_every > 0 and int(x) % flip_every ==
// flip_every-1; outputs probs (0.8 on the class, 0.1 elsewhere, FP32 [-1, 3]) and score
// x/100 + offset (FP32 [-1]).
type classes struct {
	FlipEvery int     `json:"flip_every"`
	Offset    float32 `json:"offset"`
}

func loadClasses(spec rt.Spec) (rt.Model, error) {
	b, err := os.ReadFile(spec.Artifact)
	if err != nil {
		return nil, err
	}
	var c classes
	return &c, json.Unmarshal(b, &c)
}

func (c *classes) Predict(_ context.Context, in []*tensor.Tensor) ([]*tensor.Tensor, error) {
	rows := len(in[0].F32)
	probs := &tensor.Tensor{Shape: []int64{int64(rows), 3}, F32: make([]float32, 3*rows)}
	score := &tensor.Tensor{Shape: []int64{int64(rows)}, F32: make([]float32, rows)}
	for i, x := range in[0].F32 {
		n := int(x)
		cl := n % 3
		if c.FlipEvery > 0 && n%c.FlipEvery == c.FlipEvery-1 {
			cl = (cl + 1) % 3
		}
		for j := range 3 {
			probs.F32[3*i+j] = 0.1
		}
		probs.F32[3*i+cl] = 0.8
		score.F32[i] = x/100 + c.Offset
	}
	return []*tensor.Tensor{probs, score}, nil
}

// clfRepo: model clf, v1 (no flips, offset 0) and v2 (every 4th request another class,
// scores +0.25): v2 agrees with v1 on 3 classes in 4 and differs by 0.25 on scores.
func clfRepo(t *testing.T) string {
	repo := t.TempDir()
	for v, art := range map[string]string{"v1": `{"flip_every":0,"offset":0}`, "v2": `{"flip_every":4,"offset":0.25}`} {
		dir := filepath.Join(repo, "clf", v)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "model.json"), []byte(art), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "model.yaml"), []byte("runtime: classes\ninputs: [{name: x, datatype: FP32, shape: [-1, 1]}]\n"+
			"outputs: [{name: probs, datatype: FP32, shape: [-1, 3]}, {name: score, datatype: FP32, shape: [-1]}]\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return repo
}

type hostRun struct {
	http, grpc string
	stop       func() // cancels and waits for ServeAll (records flushed, stream closed)
}

func startHost(t *testing.T, repo, records string, sample float64) *hostRun {
	t.Helper()
	rts := builtin.Loaders()
	rts["classes"] = loadClasses
	srv, err := modelhost.New(modelhost.Config{Repository: repo, Logger: zerolog.Nop(), Runtimes: rts, ShadowRecords: records, ShadowSample: sample})
	if err != nil {
		t.Fatal(err)
	}
	hl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, hl, gl) }()
	var stopped atomic.Bool
	h := &hostRun{http: "http://" + hl.Addr().String(), grpc: gl.Addr().String(), stop: func() {
		if stopped.Swap(true) {
			return
		}
		http.DefaultClient.CloseIdleConnections()
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	}}
	t.Cleanup(h.stop)
	return h
}

func restInfer(t *testing.T, h *hostRun, host, version, id string, x float32) {
	t.Helper()
	req, err := http.NewRequest("POST", h.http+"/v2/models/clf/versions/"+version+"/infer",
		strings.NewReader(fmt.Sprintf(`{"inputs":[{"name":"x","datatype":"FP32","shape":[1,1],"data":[%v]}]}`, x)))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-Request-Id", id)
	if host != "" {
		req.Host = host
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("infer %s %s: %d", version, id, resp.StatusCode)
	}
}

func grpcInfer(t *testing.T, c oip.GRPCInferenceServiceClient, version, id string, x float32) {
	t.Helper()
	ctx := metadata.AppendToOutgoingContext(context.Background(), "x-request-id", id)
	if _, err := c.ModelInfer(ctx, &oip.ModelInferRequest{ModelName: "clf", ModelVersion: version, Inputs: []*oip.ModelInferRequest_InferInputTensor{{
		Name: "x", Datatype: "FP32", Shape: []int64{1, 1}, Contents: &oip.InferTensorContents{Fp32Contents: []float32{x}}}}}); err != nil {
		t.Fatalf("gRPC infer %s %s: %v", version, id, err)
	}
}

func dial(t *testing.T, addr string, opts ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func result(t *testing.T, st shadow.Status, output string) shadow.Result {
	t.Helper()
	for _, r := range st.Outputs {
		if r.Model == "clf" && r.Version == "v2" && r.Output == output {
			return r
		}
	}
	t.Fatalf("no result for clf/v2 %s in %+v", output, st)
	return shadow.Result{}
}

// TestHostRecordsCompared: a real model host streams the records of 40 requests served
// by v1 (live) and mirrored to v2 (Host / :authority with -shadow; REST and gRPC) to a
// real Comparator; it pairs them by x-request-id and reports v2's known disagreement:
// 30 of 40 classes agree, scores differ by 0.25.
func TestHostRecordsCompared(t *testing.T) {
	metrics, err := telemetry.NewMetrics()
	if err != nil {
		t.Fatal(err)
	}
	defer metrics.Shutdown(context.Background())
	c, err := shadow.New(shadow.Config{Meter: metrics.Meter("patchbay/xds")})
	if err != nil {
		t.Fatal(err)
	}
	h := startHost(t, clfRepo(t), serve(t, c), 1)
	live := oip.NewGRPCInferenceServiceClient(dial(t, h.grpc))
	mirrored := oip.NewGRPCInferenceServiceClient(dial(t, h.grpc, grpc.WithAuthority("clf-shadow:8001")))
	for i := range 40 {
		id := fmt.Sprintf("req-%d", i)
		if i%2 == 0 {
			restInfer(t, h, "", "v1", id, float32(i))
			restInfer(t, h, "clf-shadow:8000", "v2", id, float32(i))
		} else {
			grpcInfer(t, mirrored, "v2", id, float32(i)) // the shadow may answer first
			grpcInfer(t, live, "v1", id, float32(i))
		}
	}
	h.stop() // flushes the queue and closes the stream: the comparator has seen everything
	st := c.Results()
	if st.Records.Received != 80 || st.Records.Pairs != 40 || st.Records.Unpaired != 0 || st.Records.Rejected != 0 {
		t.Errorf("records: %+v, want 80 received, 40 pairs, none unpaired or rejected", st.Records)
	}
	probs := result(t, st, "probs")
	if probs.Pairs != 40 || probs.ClassPairs != 40 || probs.ClassAgreements != 30 || probs.Agreement == nil || *probs.Agreement != 0.75 {
		t.Errorf("probs: %+v, want 30 of 40 classes agreeing", probs)
	}
	score := result(t, st, "score")
	if score.Pairs != 40 || score.ClassPairs != 0 || score.ValuesCompared != 40 ||
		math.Abs(score.MeanAbsDiff-0.25) > 1e-6 || math.Abs(score.MaxAbsDiff-0.25) > 1e-6 {
		t.Errorf("score: %+v, want 40 values differing by 0.25", score)
	}
	if probs.ValuesCompared != 120 || math.Abs(probs.MaxAbsDiff-0.7) > 1e-6 {
		t.Errorf("probs values: %+v, want 120 compared, largest difference 0.7", probs)
	}
	ms := httptest.NewServer(metrics.Handler)
	defer ms.Close()
	resp, err := http.Get(ms.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`patchbay_xds_shadow_agreement{model="clf",output="probs",version="v2"} 0.75`,
		`patchbay_xds_shadow_class_agreements_total{model="clf",output="probs",version="v2"} 30`,
		`patchbay_xds_shadow_pairs_total{model="clf",output="score",version="v2"} 40`,
		`patchbay_xds_shadow_records_total{result="received"} 80`,
		`patchbay_xds_shadow_pending{state="unpaired"} 0`,
	} {
		if !strings.Contains(string(body), "\n"+want+"\n") {
			t.Errorf("metrics lack %s", want)
		}
	}
	if t.Failed() {
		t.Logf("%s", body)
	}
}

// TestAuthorizeRefusesStream: Config.Authorize decides who may send records.
func TestAuthorizeRefusesStream(t *testing.T) {
	c, err := shadow.New(shadow.Config{Authorize: func(context.Context) error { return errors.New("not a model host") }})
	if err != nil {
		t.Fatal(err)
	}
	st, err := shadowv1.NewRecordsClient(dial(t, serve(t, c))).Send(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	_ = st.Send(rec("1", "v1", shadowv1.Traffic_TRAFFIC_LIVE, 1, 1))
	if _, err := st.CloseAndRecv(); status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "not a model host") {
		t.Errorf("stream: %v, want PermissionDenied", err)
	}
	if n := c.Results().Records.Received; n != 0 {
		t.Errorf("%d records taken from a refused stream", n)
	}
}

// TestSamplingPicksBothSides: with --shadow-sample 0.3 the host samples by a hash of the
// request id, so the live and the shadow record of a request are sampled together: every
// sampled record pairs.
func TestSamplingPicksBothSides(t *testing.T) {
	c, err := shadow.New(shadow.Config{})
	if err != nil {
		t.Fatal(err)
	}
	h := startHost(t, clfRepo(t), serve(t, c), 0.3)
	const n = 200
	for i := range n {
		id := fmt.Sprintf("%08x-req", i*7919)
		restInfer(t, h, "", "v1", id, float32(i))
		restInfer(t, h, "clf-shadow", "v2", id, float32(i))
	}
	h.stop()
	st := c.Results()
	if st.Records.Unpaired != 0 || st.Records.Received != 2*st.Records.Pairs {
		t.Errorf("records %+v: every sampled record should pair", st.Records)
	}
	if st.Records.Pairs < n*0.3/2 || st.Records.Pairs > n*0.3*2 {
		t.Errorf("%d of %d requests sampled at 0.3", st.Records.Pairs, n)
	}
}

// clock is a test clock the comparator reads.
type clock struct{ ns atomic.Int64 }

func (c *clock) now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *clock) advance(d time.Duration) { c.ns.Add(int64(d)) }

func rec(id, version string, tr shadowv1.Traffic, class int64, v float64) *shadowv1.Record {
	return &shadowv1.Record{RequestId: id, Model: "clf", Version: version, Traffic: tr, LatencySeconds: 0.001,
		Outputs: []*shadowv1.Output{{Name: "label", Values: []float64{v}, HasClass: true, ClassIndex: class}}}
}

// send streams records to a comparator's server and returns its summary.
func send(t *testing.T, addr string, recs ...*shadowv1.Record) *shadowv1.Summary {
	t.Helper()
	st, err := shadowv1.NewRecordsClient(dial(t, addr)).Send(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		if err := st.Send(r); err != nil {
			t.Fatal(err)
		}
	}
	sum, err := st.CloseAndRecv()
	if err != nil {
		t.Fatal(err)
	}
	return sum
}

// TestPendingBounded: more unpaired records than MaxPending: the oldest give way (counted
// as evicted) and the newest still pair; a live record kept after pairing is not a loss.
func TestPendingBounded(t *testing.T) {
	var clk clock
	c, err := shadow.New(shadow.Config{MaxPending: 4, Now: clk.now})
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, c)
	var lives []*shadowv1.Record
	for i := range 10 {
		lives = append(lives, rec(fmt.Sprint(i), "v1", shadowv1.Traffic_TRAFFIC_LIVE, 1, 1))
	}
	send(t, addr, lives...)
	if st := c.Results().Records; st.Pending != 4 || st.Evicted != 6 || st.Unpaired != 4 {
		t.Fatalf("after 10 live records with MaxPending 4: %+v", st)
	}
	send(t, addr, rec("9", "v2", shadowv1.Traffic_TRAFFIC_SHADOW, 1, 1), rec("8", "v2", shadowv1.Traffic_TRAFFIC_SHADOW, 2, 1.5),
		rec("0", "v2", shadowv1.Traffic_TRAFFIC_SHADOW, 1, 1)) // 0 was evicted: waits, evicting 6 (unpaired)
	st := c.Results()
	if st.Records.Pairs != 2 || st.Records.Evicted != 7 || st.Records.Pending != 4 || st.Records.Unpaired != 2 {
		t.Errorf("records %+v: want 2 pairs, 7 evicted, 4 pending of which 2 unpaired", st.Records)
	}
	if len(st.Outputs) != 1 || st.Outputs[0].ClassPairs != 2 || st.Outputs[0].ClassAgreements != 1 || st.Outputs[0].MaxAbsDiff != 0.5 || st.Outputs[0].MeanAbsDiff != 0.25 {
		t.Errorf("outputs %+v", st.Outputs)
	}
	// Four more shadows of unknown requests evict the paired live records 8 and 9 and
	// the waiting 7 and 0: only the unpaired two count.
	send(t, addr, rec("a", "v2", shadowv1.Traffic_TRAFFIC_SHADOW, 1, 1), rec("b", "v2", shadowv1.Traffic_TRAFFIC_SHADOW, 1, 1),
		rec("c", "v2", shadowv1.Traffic_TRAFFIC_SHADOW, 1, 1), rec("d", "v2", shadowv1.Traffic_TRAFFIC_SHADOW, 1, 1))
	if st := c.Results().Records; st.Evicted != 9 || st.Pending != 4 {
		t.Errorf("records %+v: want 9 evicted", st)
	}
}

// TestRecordsExpire: a record waits Expiry for its partner, then is dropped and counted;
// a partner arriving in time pairs.
func TestRecordsExpire(t *testing.T) {
	var clk clock
	c, err := shadow.New(shadow.Config{Expiry: 30 * time.Second, Now: clk.now})
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, c)
	send(t, addr, rec("late", "v1", shadowv1.Traffic_TRAFFIC_LIVE, 1, 1), rec("ontime", "v1", shadowv1.Traffic_TRAFFIC_LIVE, 1, 1))
	clk.advance(29 * time.Second)
	send(t, addr, rec("ontime", "v2", shadowv1.Traffic_TRAFFIC_SHADOW, 1, 1))
	clk.advance(2 * time.Second)
	send(t, addr, rec("late", "v2", shadowv1.Traffic_TRAFFIC_SHADOW, 1, 1))
	st := c.Results().Records
	if st.Pairs != 1 || st.Expired != 1 || st.Unpaired != 1 {
		t.Errorf("records %+v: want 1 pair, the late live record expired, its shadow waiting", st)
	}
	clk.advance(31 * time.Second)
	if st := c.Results().Records; st.Expired != 2 || st.Pending != 0 {
		t.Errorf("records %+v: want everything expired", st)
	}
}

// TestMalformedRecordsRejected: records outside the protocol's bounds are counted and
// reported in the stream's summary, and change nothing.
func TestMalformedRecordsRejected(t *testing.T) {
	c, err := shadow.New(shadow.Config{})
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, c)
	bad := []*shadowv1.Record{
		{Model: "clf", Version: "v1", Traffic: shadowv1.Traffic_TRAFFIC_LIVE},
		{RequestId: "x", Model: "clf", Version: "v1"},
		{RequestId: "x", Model: "clf", Version: "v1", Traffic: shadowv1.Traffic_TRAFFIC_LIVE, LatencySeconds: math.NaN()},
		{RequestId: "x", Model: "clf", Version: "v1", Traffic: shadowv1.Traffic_TRAFFIC_LIVE, Outputs: []*shadowv1.Output{{Name: "y", Values: make([]float64, 17)}}},
		{RequestId: "x", Model: "clf", Version: "v1", Traffic: shadowv1.Traffic_TRAFFIC_LIVE, Outputs: []*shadowv1.Output{{Name: "y"}, {Name: "y"}}},
	}
	sum := send(t, addr, bad...)
	if sum.GetReceived() != 5 || sum.GetRejected() != 5 {
		t.Errorf("summary %+v, want 5 received, 5 rejected", sum)
	}
	if st := c.Results(); st.Records.Rejected != 5 || st.Records.Pending != 0 {
		t.Errorf("status %+v", st)
	}
}
