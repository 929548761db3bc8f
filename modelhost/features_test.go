package modelhost_test

import (
	"bufio"
	"context"
	"fmt"
	"math"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/metadata"

	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/modelhost"
)

// redisServer is a real redis-server on a free 127.0.0.1 port, without persistence.
type redisServer struct {
	addr string
	cmd  *exec.Cmd
}

func startRedis(t testing.TB, addr string) *redisServer {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Skip("redis-server not found (make test-deps installs Debian's redis-server): the feature store tests need a real Redis")
	}
	if addr == "" {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr = l.Addr().String()
		l.Close()
	}
	_, port, _ := net.SplitHostPort(addr)
	cmd := exec.Command(bin, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--protected-mode", "yes", "--enable-debug-command", "local")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r := &redisServer{addr: addr, cmd: cmd}
	t.Cleanup(r.stop)
	for i := 0; ; i++ {
		if _, err := r.do("PING"); err == nil {
			return r
		} else if i == 100 {
			t.Fatalf("redis-server on %s did not answer PING: %v", addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (r *redisServer) stop() {
	if r.cmd.Process != nil && r.cmd.ProcessState == nil {
		_ = r.cmd.Process.Kill()
		_ = r.cmd.Wait()
	}
}

// do sends one command in RESP and returns the first reply line.
func (r *redisServer) do(args ...string) (string, error) {
	c, err := net.DialTimeout("tcp", r.addr, time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	var b strings.Builder
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := c.Write([]byte(b.String())); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err == nil && strings.HasPrefix(line, "-") {
		err = fmt.Errorf("redis: %s", strings.TrimSpace(line))
	}
	return strings.TrimSpace(line), err
}

const featureYAML = `runtime: linear
artifact: linear.json
inputs:  [{name: x, datatype: FP32, shape: [-1, 4]}]
outputs: [{name: p, datatype: FP32, shape: [-1]}]
features:
  - {name: country, input: x, column: 0, source: header, header: x-country, map: {de: 1, fr: 2}, default: 0}
  - {name: hour, input: x, column: 1, source: hour}
  - {name: ctr, input: x, column: 2, source: store, entity: x-user-id, default: 0.25}
  - {name: spend, input: x, column: 3, source: store, entity: x-user-id, default: -1%s}
`

var featureWeights = [4]float64{0.5, 0.01, 2, 0.3}

const featureBias = -0.2

func featureRepo(t testing.TB) string {
	repo := t.TempDir()
	// b1 is v1 with dynamic batching: its store lookups share pipelines.
	for _, v := range []struct{ dir, extra, tail string }{{"v1", "", ""}, {"v2", ", required: true", ""},
		{"b1", "", "batching: {max_batch_size: 64, max_delay: 20ms}\n"}} {
		d := filepath.Join(repo, "scorer", v.dir)
		writeFile(t, filepath.Join(d, "model.yaml"), fmt.Sprintf(featureYAML, v.extra)+v.tail)
		writeFile(t, filepath.Join(d, "linear.json"), `{"link": "logistic", "weights": [0.5, 0.01, 2, 0.3], "bias": -0.2}`)
	}
	return repo
}

// reference is logistic(w·x+b) in float32 like the runtime's inputs.
func reference(x [4]float64) float64 {
	z := featureBias
	for i, w := range featureWeights {
		z += w * float64(float32(x[i]))
	}
	return 1 / (1 + math.Exp(-z))
}

var probRE = regexp.MustCompile(`"data":\[([^\]]+)\]`)

// predict sends a REST request without inputs (all features from the host) and returns
// the probability and the hour of day around the request.
func predictREST(t testing.TB, h *host, ver string, hdr map[string]string) (float64, int, string) {
	t.Helper()
	hour := time.Now().UTC().Hour()
	var out map[string]any
	resp := h.do(t, "POST", "/v2/models/scorer/versions/"+ver+"/infer", `{"inputs":[]}`, hdr, &out)
	if resp.StatusCode != http.StatusOK {
		return math.NaN(), hour, fmt.Sprintf("%d %v", resp.StatusCode, out)
	}
	p := out["outputs"].([]any)[0].(map[string]any)["data"].([]any)[0].(float64)
	return p, hour, ""
}

func near(a, b float64) bool { return math.Abs(a-b) < 1e-5 }

func metricCount(t testing.TB, h *host, feature, reason string) float64 {
	t.Helper()
	resp, err := http.Get(h.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	total := 0.0
	for sc.Scan() {
		l := sc.Text()
		if strings.HasPrefix(l, "patchbay_modelhost_feature_defaults_total{") && strings.Contains(l, `feature="`+feature+`"`) && strings.Contains(l, `reason="`+reason+`"`) {
			f := strings.Fields(l)
			x, _ := strconv.ParseFloat(f[len(f)-1], 64)
			total += x
		}
	}
	return total
}

func TestFeaturesFromRedis(t *testing.T) {
	rs := startRedis(t, "")
	if _, err := rs.do("HSET", "patchbay:features:u1", "ctr", "0.8", "spend", "1.5"); err != nil {
		t.Fatal(err)
	}
	h := startHost(t, featureRepo(t), func(c *modelhost.Config) { c.FeatureStore = rs.addr })

	// Stored values and header values reach the model.
	p, hour, e := predictREST(t, h, "v1", map[string]string{"x-country": "de", "x-user-id": "u1"})
	if e != "" {
		t.Fatalf("infer: %s", e)
	}
	if want := reference([4]float64{1, float64(hour), 0.8, 1.5}); !near(p, want) && !near(p, reference([4]float64{1, float64((hour + 1) % 24), 0.8, 1.5})) {
		t.Fatalf("prediction %v, want %v (country=1 hour=%d ctr=0.8 spend=1.5)", p, want, hour)
	}
	// gRPC: the same features from metadata.
	ctx := metadata.AppendToOutgoingContext(context.Background(), "x-country", "fr", "x-user-id", "u1")
	hour = time.Now().UTC().Hour()
	gr, err := h.grpc.ModelInfer(ctx, &oip.ModelInferRequest{ModelName: "scorer", ModelVersion: "v1"})
	if err != nil {
		t.Fatalf("grpc infer: %v", err)
	}
	gp := float64(gr.GetOutputs()[0].GetContents().GetFp32Contents()[0])
	if want := reference([4]float64{2, float64(hour), 0.8, 1.5}); !near(gp, want) && !near(gp, reference([4]float64{2, float64((hour + 1) % 24), 0.8, 1.5})) {
		t.Fatalf("grpc prediction %v, want %v", gp, want)
	}
	// Unknown user and unmapped country: defaults, counted.
	p, hour, e = predictREST(t, h, "v1", map[string]string{"x-country": "xx", "x-user-id": "nobody"})
	if e != "" {
		t.Fatalf("infer: %s", e)
	}
	if want := reference([4]float64{0, float64(hour), 0.25, -1}); !near(p, want) && !near(p, reference([4]float64{0, float64((hour + 1) % 24), 0.25, -1})) {
		t.Fatalf("prediction with defaults %v, want %v", p, want)
	}
	for _, c := range []struct{ f, r string }{{"ctr", "missing"}, {"spend", "missing"}, {"country", "invalid"}} {
		if n := metricCount(t, h, c.f, c.r); n != 1 {
			t.Errorf("feature_defaults_total{feature=%s,reason=%s} = %v, want 1", c.f, c.r, n)
		}
	}
	// The client sends the input itself: its values are used, no feature is assembled.
	var out map[string]any
	resp := h.do(t, "POST", "/v2/models/scorer/versions/v1/infer", `{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[3,4,5,6]}]}`, map[string]string{"x-user-id": "u1"}, &out)
	if resp.StatusCode != 200 {
		t.Fatalf("client-sent input: %d %v", resp.StatusCode, out)
	}
	if got, want := out["outputs"].([]any)[0].(map[string]any)["data"].([]any)[0].(float64), reference([4]float64{3, 4, 5, 6}); !near(got, want) {
		t.Fatalf("client-sent input: %v, want %v", got, want)
	}
	// A required feature without a value is an OIP error, not a default.
	resp = h.do(t, "POST", "/v2/models/scorer/versions/v2/infer", `{"inputs":[]}`, map[string]string{"x-user-id": "nobody"}, &out)
	if resp.StatusCode != 400 || !strings.Contains(fmt.Sprint(out["error"]), `required feature "spend"`) {
		t.Fatalf("required feature missing: %d %v, want 400 naming spend", resp.StatusCode, out)
	}
	if _, _, e := predictREST(t, h, "v2", map[string]string{"x-user-id": "u1"}); e != "" {
		t.Fatalf("v2 with the stored value: %s", e)
	}
}

// TestFeatureStoreOutage kills Redis under load: predictions keep flowing with the
// defaults (counted), then Redis comes back and stored values are used again.
func TestFeatureStoreOutage(t *testing.T) {
	t.Run("per-request", func(t *testing.T) { featureStoreOutage(t, "v1") })
	t.Run("batched", func(t *testing.T) { featureStoreOutage(t, "b1") })
}

func featureStoreOutage(t *testing.T, ver string) {
	rs := startRedis(t, "")
	if _, err := rs.do("HSET", "patchbay:features:u1", "ctr", "0.8", "spend", "1.5"); err != nil {
		t.Fatal(err)
	}
	h := startHost(t, featureRepo(t), func(c *modelhost.Config) { c.FeatureStore = rs.addr; c.FeatureCacheTTL = -1 })
	hdr := map[string]string{"x-country": "de", "x-user-id": "u1"}
	stored := func(p float64, hour int) bool {
		return near(p, reference([4]float64{1, float64(hour), 0.8, 1.5})) || near(p, reference([4]float64{1, float64((hour + 1) % 24), 0.8, 1.5}))
	}
	defaulted := func(p float64, hour int) bool {
		return near(p, reference([4]float64{1, float64(hour), 0.25, -1})) || near(p, reference([4]float64{1, float64((hour + 1) % 24), 0.25, -1}))
	}
	var mu sync.Mutex
	counts := map[string]int{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 20000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				p, hour, e := predictREST(t, h, ver, hdr)
				k := "other"
				switch {
				case e != "":
					k = "error: " + e
				case stored(p, hour):
					k = "stored"
				case defaulted(p, hour):
					k = "default"
				}
				mu.Lock()
				counts[k]++
				mu.Unlock()
			}
		}()
	}
	waitFor := func(what string, cond func() bool) {
		for i := 0; i < 200 && !cond(); i++ {
			time.Sleep(25 * time.Millisecond)
		}
		if !cond() {
			close(stop)
			wg.Wait()
			t.Fatalf("%s never happened: %v", what, counts)
		}
	}
	get := func(k string) func() bool {
		return func() bool { mu.Lock(); defer mu.Unlock(); return counts[k] > 20 }
	}
	waitFor("stored predictions", get("stored"))
	rs.stop()
	waitFor("default predictions after Redis died", get("default"))
	mu.Lock()
	counts["stored"] = 0
	mu.Unlock()
	rs = startRedis(t, rs.addr)
	if _, err := rs.do("HSET", "patchbay:features:u1", "ctr", "0.8", "spend", "1.5"); err != nil {
		t.Fatal(err)
	}
	waitFor("stored predictions after Redis came back", get("stored"))
	close(stop)
	wg.Wait()
	for k, n := range counts {
		if k != "stored" && k != "default" {
			t.Errorf("%d predictions were %s", n, k)
		}
	}
	down := metricCount(t, h, "ctr", "store_error") + metricCount(t, h, "ctr", "timeout")
	if down == 0 {
		t.Errorf("no ctr default counted with reason store_error/timeout while Redis was down")
	}
	t.Logf("predictions: %v; ctr defaults while down: %v", counts, down)
}

// TestFeatureStoreSlow: a Redis that does not answer within the feature timeout gives
// the defaults (reason timeout) instead of holding the request.
// With batching (b1) the waiters of a late pipeline time out alike.
func TestFeatureStoreSlow(t *testing.T) {
	t.Run("per-request", func(t *testing.T) { featureStoreSlow(t, "v1") })
	t.Run("batched", func(t *testing.T) { featureStoreSlow(t, "b1") })
}

func featureStoreSlow(t *testing.T, ver string) {
	rs := startRedis(t, "")
	if _, err := rs.do("HSET", "patchbay:features:u1", "ctr", "0.8", "spend", "1.5"); err != nil {
		t.Fatal(err)
	}
	h := startHost(t, featureRepo(t), func(c *modelhost.Config) {
		c.FeatureStore, c.FeatureCacheTTL, c.FeatureTimeout = rs.addr, -1, 50*time.Millisecond
	})
	hdr := map[string]string{"x-country": "de", "x-user-id": "u1"}
	if _, _, e := predictREST(t, h, ver, hdr); e != "" { // a pooled connection exists
		t.Fatal(e)
	}
	slept := make(chan error, 1)
	go func() { _, err := rs.do("DEBUG", "SLEEP", "1.5"); slept <- err }()
	// Redis sleeps 1.5 s; the requests sent meanwhile (each bounded by the 50 ms timeout)
	// must take the defaults. Bounded: at most 20 tries, the first ones may precede the sleep.
	defaults := 0
	for i := 0; i < 20 && defaults == 0; i++ {
		p, hour, e := predictREST(t, h, ver, hdr)
		if e != "" {
			t.Fatal(e)
		}
		if near(p, reference([4]float64{1, float64(hour), 0.25, -1})) || near(p, reference([4]float64{1, float64((hour + 1) % 24), 0.25, -1})) {
			defaults++
		}
	}
	if err := <-slept; err != nil {
		t.Skipf("DEBUG SLEEP refused by this redis-server: %v", err)
	}
	if defaults == 0 {
		t.Fatal("no prediction took the defaults while Redis slept")
	}
	if n := metricCount(t, h, "ctr", "timeout"); n < 1 {
		t.Errorf("feature_defaults_total{feature=ctr,reason=timeout} = %v, want >= 1", n)
	}
	// Redis awake again: stored values.
	p, hour, e := predictREST(t, h, ver, hdr)
	if e != "" {
		t.Fatal(e)
	}
	if want := reference([4]float64{1, float64(hour), 0.8, 1.5}); !near(p, want) && !near(p, reference([4]float64{1, float64((hour + 1) % 24), 0.8, 1.5})) {
		t.Fatalf("prediction after the sleep %v, want %v", p, want)
	}
}
