package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	xdscreds "google.golang.org/grpc/credentials/xds"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	xdsresolver "google.golang.org/grpc/xds"

	"github.com/patchbay-io/patchbay/api/headers"
	"github.com/patchbay-io/patchbay/api/oip"
	pbenvoy "github.com/patchbay-io/patchbay/envoy"
	"github.com/patchbay-io/patchbay/internal/tlsfiles"
	"github.com/patchbay-io/patchbay/test/harness"
	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/translate"
)

func freeAddr(t *testing.T) string {
	return harness.FreeAddr(t)
}

// buildPatchbay builds this command into a temporary directory: `up` runs the parts
// as child processes of the real binary, not of the test binary.
func buildPatchbay(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "patchbay")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// TestUpStartsAndStopsEverything runs `patchbay up --envoy off` against examples/
// on free ports, checks that the model hosts answer (health and a real inference)
// and that the control plane and ext_proc are ready, then cancels and checks that
// every child process is gone and every port closed.
func TestUpStartsAndStopsEverything(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and starts the patchbay binary")
	}
	bin := buildPatchbay(t)
	for _, part := range []string{"modelhost", "xds", "extproc"} {
		// A part that is a stub is a failure of up, not a reason to skip (a skip reads as a pass).
		out, _ := exec.Command(bin, part, "-h").CombinedOutput()
		if bytes.Contains(out, []byte("not implemented yet")) {
			t.Fatalf("patchbay %s says it is not implemented yet: `up` cannot start it:\n%s", part, out)
		}
	}

	hostHTTP := []string{freeAddr(t), freeAddr(t)}
	hostGRPC := []string{freeAddr(t), freeAddr(t)}
	// The example rollouts with their fixed ports moved to this test's free ones.
	rollouts := t.TempDir()
	examples := filepath.Join("..", "..", "examples")
	files, err := filepath.Glob(filepath.Join(examples, "rollouts", "*.yaml"))
	if err != nil || len(files) < 4 {
		t.Fatalf("example rollouts: %v %v", files, err)
	}
	moved := strings.NewReplacer("127.0.0.1:9001", hostHTTP[0], "127.0.0.1:9002", hostHTTP[1], "127.0.0.1:9011", hostGRPC[0], "127.0.0.1:9012", hostGRPC[1])
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(rollouts, filepath.Base(f)), []byte(moved.Replace(string(b))), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	xdsListen, xdsAdmin := freeAddr(t), freeAddr(t)
	extprocListen, extprocAdmin := freeAddr(t), freeAddr(t)
	args := []string{
		"--examples", examples, "--rollouts", rollouts, "--bin", bin, "--envoy", "off",
		"--modelhost-http", strings.Join(hostHTTP, ","), "--modelhost-grpc", strings.Join(hostGRPC, ","),
		"--modelhost-admin", freeAddr(t) + "," + freeAddr(t),
		"--xds-listen", xdsListen, "--xds-admin", xdsAdmin,
		"--extproc-listen", extprocListen, "--extproc-admin", extprocAdmin,
		"--edge-listener", freeAddr(t), "--sidecar-listener", freeAddr(t),
		"--ready-timeout", "60s", "--stop-grace", "5s", "--log-level", "warn",
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var stdout, stderr harness.Buffer
	done := make(chan error, 1)
	go func() { done <- runUp(ctx, args, &stdout, &stderr) }()
	defer func() {
		if t.Failed() {
			t.Logf("up stdout:\n%s\nup stderr:\n%s", stdout.String(), stderr.String())
		}
	}()

	// Wait for the "up" banner (printed once every part is ready) or an early exit.
	deadline := time.Now().Add(90 * time.Second)
	for !strings.Contains(stdout.String(), "patchbay is up.") {
		select {
		case err := <-done:
			t.Fatalf("up returned before it was up: %v", err)
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("up did not come up within 90s")
		}
	}
	banner := stdout.String()
	for _, want := range []string{"Envoy is off", "curl -s http://" + xdsAdmin + "/status", "/v1/models/ranker/rollback", "GRPC_XDS_BOOTSTRAP="} {
		if !strings.Contains(banner, want) {
			t.Errorf("banner lacks %q", want)
		}
	}

	client := &http.Client{Timeout: 5 * time.Second}
	get := func(url string) (int, string) {
		t.Helper()
		resp, err := client.Get(url)
		if err != nil {
			t.Errorf("GET %s: %v", url, err)
			return 0, ""
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for _, h := range hostHTTP {
		if code, body := get("http://" + h + "/v2/health/ready"); code != http.StatusOK {
			t.Errorf("model host %s ready = %d %s", h, code, body)
		}
	}
	// A real inference on each host, version named in the path: each host serves the
	// versions its rollout endpoints name (ranker v7 on a, v8 on b), and only those.
	body := `{"inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":[0.5,1.2,3.4,0.1,0.0,2.2,1.1,0.7]}]}`
	for i, h := range hostHTTP {
		other := []string{"v8", "v7"}[i]
		if resp, err := client.Post("http://"+h+"/v2/models/ranker/versions/"+other+"/infer", "application/json", strings.NewReader(body)); err != nil {
			t.Errorf("infer on %s: %v", h, err)
		} else {
			resp.Body.Close()
			if resp.StatusCode != http.StatusNotFound {
				t.Errorf("host %s answers ranker %s (%s), which its rollout endpoints do not name", h, other, resp.Status)
			}
		}
		resp, err := client.Post("http://"+h+"/v2/models/ranker/versions/"+[]string{"v7", "v8"}[i]+"/infer", "application/json", strings.NewReader(body))
		if err != nil {
			t.Errorf("infer on %s: %v", h, err)
			continue
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), `"outputs"`) {
			t.Errorf("infer on %s = %d %s", h, resp.StatusCode, b)
		}
	}
	if code, body := get("http://" + xdsAdmin + "/readyz"); code != http.StatusOK {
		t.Errorf("control plane readyz = %d %s", code, body)
	}
	// The hosts send prediction records to the control plane (--shadow-records, sample 1):
	// an inference with an x-request-id on each host shows up in /status "shadow".
	for i, h := range hostHTTP {
		req, _ := http.NewRequest(http.MethodPost, "http://"+h+"/v2/models/ranker/versions/"+[]string{"v7", "v8"}[i]+"/infer", strings.NewReader(body))
		req.Header.Set("x-request-id", fmt.Sprintf("up-test-%d", i))
		if resp, err := client.Do(req); err != nil {
			t.Errorf("infer on %s: %v", h, err)
		} else {
			resp.Body.Close()
		}
	}
	var received uint64
	for range 200 { // the records stream reconnects with backoff up to 5 s: bounded wait (~20 s)
		_, st := get("http://" + xdsAdmin + "/status")
		var status struct {
			Shadow *struct {
				Records struct {
					Received uint64 `json:"received"`
				} `json:"records"`
			} `json:"shadow"`
		}
		if err := json.Unmarshal([]byte(st), &status); err != nil {
			t.Fatalf("/status: %v: %s", err, st)
		}
		if status.Shadow != nil {
			received = status.Shadow.Records.Received
		}
		if received >= 2 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if received < 2 {
		t.Errorf("control plane received %d prediction records from up's model hosts, want 2 (one per host)", received)
	}
	if code, body := get("http://" + extprocAdmin + "/readyz"); code != http.StatusOK {
		t.Errorf("ext_proc readyz = %d %s", code, body)
	}

	// The proxyless gRPC path runs without Envoy: a grpc-go client with the xDS
	// bootstrap up wrote dials xds:///churn and reaches the model hosts.
	m := regexp.MustCompile(`GRPC_XDS_BOOTSTRAP=(\S+)`).FindStringSubmatch(banner)
	if m == nil {
		t.Fatal("banner has no GRPC_XDS_BOOTSTRAP")
	}
	bootstrap, err := os.ReadFile(m[1])
	if err != nil {
		t.Fatal(err)
	}
	resolver, err := xdsresolver.NewXDSResolverWithConfigForTesting(bootstrap)
	if err != nil {
		t.Fatalf("grpc-go rejects up's xDS bootstrap: %v\n%s", err, bootstrap)
	}
	conn, err := grpc.NewClient("xds:///churn", grpc.WithResolvers(resolver), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	versions := map[string]int{}
	for range 20 {
		rctx, rcancel := context.WithTimeout(ctx, 10*time.Second)
		r, err := oip.NewGRPCInferenceServiceClient(conn).ModelInfer(rctx, &oip.ModelInferRequest{
			ModelName: "churn",
			Inputs: []*oip.ModelInferRequest_InferInputTensor{{
				Name: "features", Datatype: "FP32", Shape: []int64{1, 4},
				Contents: &oip.InferTensorContents{Fp32Contents: []float32{0.3, 12, 1, 0}},
			}},
		}, grpc.WaitForReady(true))
		rcancel()
		if err != nil {
			t.Fatalf("proxyless ModelInfer churn: %v", err)
		}
		versions[r.GetModelVersion()]++
	}
	t.Logf("proxyless churn answers by version: %v", versions)
	// churn is 50/50 and each host serves one churn version, so both answer (a one-sided
	// result over 20 RPCs has probability 2e-6).
	if versions["v1"] == 0 || versions["v2"] == 0 {
		t.Errorf("proxyless churn split %v: want both v1 and v2", versions)
	}
	conn.Close()

	pids := startedPIDs(stderr.String())
	// And the feature store, first, when a redis-server is on PATH.
	_, noRedis := exec.LookPath("redis-server")
	if want := map[bool]int{true: 4, false: 5}[noRedis != nil]; len(pids) != want {
		t.Fatalf("up started %d parts (%v), want %d: two model hosts, xds, extproc (and redis when redis-server is on PATH)", len(pids), pids, want)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("up after cancel: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("up did not return within 30s of cancel")
	}
	for name, pid := range pids {
		// Reaped children no longer exist: signal 0 reports ESRCH.
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("%s (pid %d) still exists after up returned: kill 0 = %v", name, pid, err)
		}
	}
	for _, addr := range append(append([]string{xdsListen, xdsAdmin, extprocListen, extprocAdmin}, hostHTTP...), hostGRPC...) {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			t.Errorf("%s still accepts connections after up returned", addr)
		}
	}
	// Stopped in reverse order of start.
	order := regexp.MustCompile(`stopping (\S+)`).FindAllStringSubmatch(stderr.String(), -1)
	var got []string
	for _, m := range order {
		got = append(got, m[1])
	}
	want := "extproc xds modelhost-b modelhost-a"
	if noRedis == nil {
		want += " redis"
	}
	if strings.Join(got, " ") != want {
		t.Errorf("stop order = %q, want %q", strings.Join(got, " "), want)
	}
}

func startedPIDs(log string) map[string]int {
	out := map[string]int{}
	for _, m := range regexp.MustCompile(`started (\S+) \(pid (\d+)\)`).FindAllStringSubmatch(log, -1) {
		pid, _ := strconv.Atoi(m[2])
		out[m[1]] = pid
	}
	return out
}

func TestUpFlags(t *testing.T) {
	t.Parallel()
	examples := filepath.Join("..", "..", "examples")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--examples", "/nonexistent"}, "is not a directory"},
		{[]string{"--examples", examples, "--modelhost-http", "127.0.0.1:1", "--modelhost-grpc", "127.0.0.1:2,127.0.0.1:3"}, "the same number"},
		{[]string{"--examples", examples, "--stop-grace", "0s"}, "must be positive"},
		{[]string{"--examples", examples, "--modelhost-admin", "127.0.0.1:1"}, "--modelhost-admin 1"},
		{[]string{"--examples", examples, "extra"}, "unexpected arguments"},
	} {
		_, err := parseUp(tc.args, io.Discard, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !errors.Is(err, errUsage) {
			t.Errorf("parseUp(%q) = %v, want a usage error containing %q", tc.args, err, tc.want)
		}
	}
	c, err := parseUp([]string{"--examples", examples}, io.Discard, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.rollouts != filepath.Join(examples, "rollouts") || c.repository != filepath.Join(examples, "models") || len(c.hostHTTP) != 2 {
		t.Errorf("defaults: %+v", c)
	}
}

func TestLineWriterPrefixesWholeLines(t *testing.T) {
	t.Parallel()
	var out bytes.Buffer
	l := &prefixLog{w: &out}
	w := l.writer("xds")
	for _, chunk := range []string{"first li", "ne\nsecond\r\nthi", "rd"} {
		if _, err := io.WriteString(w, chunk); err != nil {
			t.Fatal(err)
		}
	}
	w.flush()
	want := fmt.Sprintf("%-12s| first line\n%-12s| second\n%-12s| third\n", "xds", "xds", "xds")
	if out.String() != want {
		t.Errorf("got\n%q\nwant\n%q", out.String(), want)
	}
}

// TestUpWithoutEnvoySaysHowToGetIt: with no ENVOY_BIN, no envoy on PATH and no
// download, `up` keeps going and says which Envoy to get and how, and what still runs;
// the bootstrap it would have used is already written and valid.
func TestUpWithoutEnvoySaysHowToGetIt(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	newRun := func(bin string) *upRun {
		return &upRun{
			cfg: upConfig{
				envoy: bin, download: false, xdsListen: "127.0.0.1:18000", extprocListen: "127.0.0.1:18080",
				envoyAdmin: "127.0.0.1:9901", envoyStat: "127.0.0.1:9902",
				readyTimeout: time.Second, envoyTimeout: time.Second, stopGrace: time.Second,
			},
			stdout: io.Discard, log: &prefixLog{w: io.Discard}, dir: t.TempDir(),
		}
	}
	u := newRun("auto")
	ok, note := u.startEnvoy(context.Background())
	if ok {
		t.Fatal("startEnvoy reported Envoy up without any Envoy")
	}
	for _, want := range []string{"ENVOY_BIN", "PATH", "func-e use " + pbenvoy.Version(), "envoyproxy/envoy:v" + pbenvoy.Version(), "model hosts", "proxyless"} {
		if !strings.Contains(note, want) {
			t.Errorf("note lacks %q:\n%s", want, note)
		}
	}
	js, err := os.ReadFile(filepath.Join(u.dir, "envoy-edge.json"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := pbenvoy.Parse(js)
	if err != nil {
		t.Fatal(err)
	}
	if err := pbenvoy.Check(pbenvoy.Edge, b); err != nil {
		t.Errorf("the bootstrap up writes fails the checks: %v", err)
	}

	u = newRun(filepath.Join(t.TempDir(), "no-such-envoy"))
	if ok, note := u.startEnvoy(context.Background()); ok || !strings.Contains(note, "did not start") {
		t.Errorf("--envoy pointing nowhere: ok=%v note %q", ok, note)
	}
	u.stopAll()
}

// TestExampleRollouts pins what examples/README.md promises about the example rollouts,
// loaded with the control plane's strict loader.
func TestExampleRollouts(t *testing.T) {
	t.Parallel()
	set, err := rollout.LoadDir(filepath.Join("..", "..", "examples", "rollouts"))
	if err != nil {
		t.Fatal(err)
	}
	ranker, churn, recs, propensity := set.Model("ranker"), set.Model("churn"), set.Model("recs"), set.Model(featureModel)
	if ranker == nil || churn == nil || recs == nil || propensity == nil {
		t.Fatalf("want ranker, churn, recs and %s among the %d rollouts", featureModel, len(set.Rollouts))
	}
	if ranker.Traffic["v7"] != 90 || ranker.Traffic["v8"] != 10 {
		t.Errorf("ranker traffic %v, want 90/10", ranker.Traffic)
	}
	if len(ranker.Shadow) != 1 || ranker.Shadow[0].Version != "v8" || ranker.Shadow[0].Percent != 5 {
		t.Errorf("ranker shadow %+v, want 5%% to v8", ranker.Shadow)
	}
	if len(ranker.Experiments) != 1 || ranker.Experiments[0].Name != "ranker-ltv" || ranker.Experiments[0].Layer != "ranking" {
		t.Errorf("ranker experiments %+v, want ranker-ltv in layer ranking", ranker.Experiments)
	}
	if churn.Traffic["v1"] != 50 || churn.Traffic["v2"] != 50 {
		t.Errorf("churn: traffic %v, want 50/50", churn.Traffic)
	}
	// Every example model is served over both OIP protocols (examples/README.md).
	for _, r := range set.Rollouts {
		if !r.Serves(rollout.REST) || !r.Serves(rollout.GRPC) {
			t.Errorf("%s: serves REST %v, gRPC %v; want both", r.Model, r.Serves(rollout.REST), r.Serves(rollout.GRPC))
		}
	}
	if ws := rollout.Warnings(set); len(ws) != 0 {
		t.Errorf("example rollouts warn: %v", ws)
	}
	if recs.Traffic["v1"] != 100 {
		t.Errorf("recs traffic %v, want 100%% v1", recs.Traffic)
	}
	if propensity.Traffic["v1"] != 100 {
		t.Errorf("%s traffic %v, want 100%% v1", featureModel, propensity.Traffic)
	}
	// Their endpoints are the hosts `up` starts by default.
	c, err := parseUp([]string{"--examples", filepath.Join("..", "..", "examples")}, io.Discard, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	// REST endpoints are the hosts' REST ports, gRPC endpoints the same hosts' gRPC ports.
	for _, r := range set.Rollouts {
		for _, v := range r.Versions {
			var rest, grpc []int
			for _, ep := range v.RESTEndpoints() {
				if i := slices.Index(c.hostHTTP, ep); i >= 0 {
					rest = append(rest, i)
				} else {
					t.Errorf("%s %s REST endpoint %s is not a model host's REST address `up` starts (%v)", r.Model, v.Name, ep, c.hostHTTP)
				}
			}
			for _, ep := range v.GRPCAddrs() {
				if i := slices.Index(c.hostGRPC, ep); i >= 0 {
					grpc = append(grpc, i)
				} else {
					t.Errorf("%s %s gRPC endpoint %s is not a model host's gRPC address `up` starts (%v)", r.Model, v.Name, ep, c.hostGRPC)
				}
			}
			if !slices.Equal(rest, grpc) {
				t.Errorf("%s %s: REST on hosts %v but gRPC on hosts %v", r.Model, v.Name, rest, grpc)
			}
		}
	}
}

func TestUpRefusesTakenPorts(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	err = portsFree([]string{l.Addr().String()})
	if err == nil || !strings.Contains(err.Error(), "is in use") {
		t.Fatalf("a taken port: %v", err)
	}
	free := freeAddrForTest(t)
	if err := portsFree([]string{free}); err != nil {
		t.Fatalf("a free port: %v", err)
	}
}

func freeAddrForTest(t *testing.T) string {
	return harness.FreeAddr(t)
}

// upForTest runs `patchbay up --envoy off` with extra flags on free ports, with copies of
// the example rollouts moved to those ports, and waits for its banner.
type upForTest struct {
	hostHTTP, hostGRPC, hostAdmin       []string
	xdsListen, xdsAdmin                 string
	extprocListen, extprocAdmin, banner string
	cancel                              context.CancelFunc
	done                                chan error
	stdout, stderr                      *harness.Buffer
}

func startUpForTest(t *testing.T, extra ...string) *upForTest {
	t.Helper()
	bin := buildPatchbay(t)
	u := &upForTest{
		hostHTTP: []string{freeAddr(t), freeAddr(t)}, hostGRPC: []string{freeAddr(t), freeAddr(t)},
		hostAdmin: []string{freeAddr(t), freeAddr(t)},
		xdsListen: freeAddr(t), xdsAdmin: freeAddr(t), extprocListen: freeAddr(t), extprocAdmin: freeAddr(t),
		done: make(chan error, 1), stdout: new(harness.Buffer), stderr: new(harness.Buffer),
	}
	rollouts := t.TempDir()
	examples := filepath.Join("..", "..", "examples")
	files, err := filepath.Glob(filepath.Join(examples, "rollouts", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("example rollouts: %v %v", files, err)
	}
	moved := strings.NewReplacer("127.0.0.1:9001", u.hostHTTP[0], "127.0.0.1:9002", u.hostHTTP[1], "127.0.0.1:9011", u.hostGRPC[0], "127.0.0.1:9012", u.hostGRPC[1])
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(rollouts, filepath.Base(f)), []byte(moved.Replace(string(b))), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	args := append([]string{
		"--examples", examples, "--rollouts", rollouts, "--bin", bin, "--envoy", "off",
		"--modelhost-http", strings.Join(u.hostHTTP, ","), "--modelhost-grpc", strings.Join(u.hostGRPC, ","),
		"--modelhost-admin", strings.Join(u.hostAdmin, ","),
		"--xds-listen", u.xdsListen, "--xds-admin", u.xdsAdmin,
		"--extproc-listen", u.extprocListen, "--extproc-admin", u.extprocAdmin,
		"--edge-listener", freeAddr(t), "--sidecar-listener", freeAddr(t),
		"--ready-timeout", "60s", "--stop-grace", "5s", "--log-level", "warn",
	}, extra...)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	u.cancel = cancel
	go func() { u.done <- runUp(ctx, args, u.stdout, u.stderr) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-u.done:
		case <-time.After(30 * time.Second):
			t.Error("up did not return within 30s of cancel")
		}
		if t.Failed() {
			t.Logf("up stdout:\n%s\nup stderr:\n%s", u.stdout.String(), u.stderr.String())
		}
	})
	deadline := time.Now().Add(90 * time.Second)
	for !strings.Contains(u.stdout.String(), "patchbay is up.") {
		select {
		case err := <-u.done:
			u.done <- err
			t.Fatalf("up returned before it was up: %v", err)
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("up did not come up within 90s")
		}
	}
	u.banner = u.stdout.String()
	return u
}

// TestUpTLS runs `patchbay up --tls`: every part serves mutual TLS with the throwaway
// CA's certificates; the proxyless gRPC path works over mTLS with the xDS bootstrap up
// wrote (grpc-go's own xDS client, "tls" channel credentials); and plain-text clients,
// or TLS clients without a certificate, are refused by the control plane, ext_proc and
// the model hosts.
func TestUpTLS(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and starts the patchbay binary")
	}
	u := startUpForTest(t, "--tls")
	m := regexp.MustCompile(`certificates in (\S+)`).FindStringSubmatch(u.banner)
	if m == nil {
		t.Fatalf("banner does not say where the certificates are:\n%s", u.banner)
	}
	dir := m[1]
	pem := func(role string) tlsfiles.Files {
		return tlsfiles.Files{Cert: filepath.Join(dir, role+".crt"), Key: filepath.Join(dir, role+".key"), CA: filepath.Join(dir, "ca.crt")}
	}
	for _, want := range []string{
		"curl --cacert " + pem("operator").CA + " --cert " + pem("operator").Cert + " --key " + pem("operator").Key + " -s https://" + u.xdsAdmin + "/status",
		"grpcurl -cacert " + pem("operator").CA, "https://" + u.hostHTTP[0] + "/v2/models/ranker/versions/v7/infer",
	} {
		if !strings.Contains(u.banner, want) {
			t.Errorf("banner lacks %q", want)
		}
	}
	// Each certificate carries its role's identity.
	for _, role := range upRoles {
		cert, err := tls.LoadX509KeyPair(pem(role).Cert, pem(role).Key)
		if err != nil {
			t.Fatal(err)
		}
		leaf, err := x509.ParseCertificate(cert.Certificate[0])
		if err != nil {
			t.Fatal(err)
		}
		if len(leaf.URIs) != 1 || leaf.URIs[0].String() != pbenvoy.Identity(role) {
			t.Errorf("%s certificate URIs %v, want %s", role, leaf.URIs, pbenvoy.Identity(role))
		}
	}

	operator, err := tlsfiles.Load(pem("operator"), tlsfiles.Options{})
	if err != nil {
		t.Fatal(err)
	}
	mtls := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: operator.ClientConfig("127.0.0.1")}}
	caOnly, err := tlsfiles.Load(tlsfiles.Files{CA: pem("operator").CA}, tlsfiles.Options{})
	if err != nil {
		t.Fatal(err)
	}
	noCert := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: caOnly.ClientConfig("127.0.0.1")}}
	plain := &http.Client{Timeout: 5 * time.Second}
	for _, addr := range []string{u.xdsAdmin + "/readyz", u.extprocAdmin + "/readyz", u.hostHTTP[0] + "/v2/health/ready", u.hostHTTP[1] + "/v2/health/ready"} {
		resp, err := mtls.Get("https://" + addr)
		if err != nil {
			t.Errorf("mTLS GET %s: %v", addr, err)
		} else {
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Errorf("mTLS GET %s = %s", addr, resp.Status)
			}
		}
		if resp, err := plain.Get("http://" + addr); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				t.Errorf("plain-text GET %s answered 200", addr)
			}
		}
		if resp, err := noCert.Get("https://" + addr); err == nil {
			resp.Body.Close()
			t.Errorf("TLS GET %s without a client certificate answered %s", addr, resp.Status)
		}
	}
	body := `{"inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":[0.5,1.2,3.4,0.1,0.0,2.2,1.1,0.7]}]}`
	if resp, err := mtls.Post("https://"+u.hostHTTP[0]+"/v2/models/ranker/versions/v7/infer", "application/json", strings.NewReader(body)); err != nil {
		t.Errorf("mTLS infer: %v", err)
	} else {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), `"outputs"`) {
			t.Errorf("mTLS infer = %s %s", resp.Status, b)
		}
	}
	// The hosts' prediction records reach the control plane over mTLS (the host's
	// certificate, role modelhost, which the Records service requires).
	req, _ := http.NewRequest(http.MethodPost, "https://"+u.hostHTTP[1]+"/v2/models/ranker/versions/v8/infer", strings.NewReader(body))
	req.Header.Set("x-request-id", "up-tls-test")
	if resp, err := mtls.Do(req); err != nil {
		t.Errorf("mTLS infer: %v", err)
	} else {
		resp.Body.Close()
	}
	var received uint64
	for range 200 { // the records stream reconnects with backoff up to 5 s: bounded wait (~20 s)
		var st struct {
			Shadow *struct {
				Records struct {
					Received uint64 `json:"received"`
				} `json:"records"`
			} `json:"shadow"`
		}
		if resp, err := mtls.Get("https://" + u.xdsAdmin + "/status"); err == nil {
			err = json.NewDecoder(resp.Body).Decode(&st)
			resp.Body.Close()
			if err != nil {
				t.Fatalf("/status: %v", err)
			}
		}
		if st.Shadow != nil {
			received = st.Shadow.Records.Received
		}
		if received >= 1 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if received < 1 {
		t.Errorf("control plane received %d prediction records over mTLS, want 1 (the request with an x-request-id)", received)
	}

	// Plain-text gRPC clients are refused: the control plane (an ADS stream), ext_proc and
	// a model host (gRPC).
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, addr := range []string{u.xdsListen, u.extprocListen, u.hostGRPC[0]} {
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
		_, err = healthpb.NewHealthClient(conn).Check(rctx, &healthpb.HealthCheckRequest{})
		if addr == u.hostGRPC[0] {
			_, err = oip.NewGRPCInferenceServiceClient(conn).ServerLive(rctx, &oip.ServerLiveRequest{})
		}
		if addr == u.xdsListen {
			var stream discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesClient
			if stream, err = discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(rctx); err == nil {
				if err = stream.Send(&discoveryv3.DiscoveryRequest{TypeUrl: "type.googleapis.com/envoy.config.listener.v3.Listener"}); err == nil {
					_, err = stream.Recv()
				}
			}
		}
		rcancel()
		conn.Close()
		if code := status.Code(err); code != codes.Unavailable {
			t.Errorf("plain-text gRPC to %s: %v (code %v), want Unavailable (no TLS handshake, no service)", addr, err, code)
		}
	}

	// Proxyless gRPC over mTLS: grpc-go's xDS client with the bootstrap up wrote (mTLS to
	// the control plane from its "tls" channel credentials), TLS with the grpc certificate
	// to the model hosts.
	bm := regexp.MustCompile(`GRPC_XDS_BOOTSTRAP=(\S+)`).FindStringSubmatch(u.banner)
	if bm == nil {
		t.Fatal("banner has no GRPC_XDS_BOOTSTRAP")
	}
	bootstrap, err := os.ReadFile(bm[1])
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(bootstrap), `"type": "tls"`) || strings.Contains(string(bootstrap), "insecure") {
		t.Errorf("the xDS bootstrap does not use tls channel credentials:\n%s", bootstrap)
	}
	resolver, err := xdsresolver.NewXDSResolverWithConfigForTesting(bootstrap)
	if err != nil {
		t.Fatalf("grpc-go rejects up's xDS bootstrap: %v\n%s", err, bootstrap)
	}
	if grpcCertProvider != translate.CertProviderInstance {
		t.Fatalf("up's bootstrap names certificate provider %q, the control plane's clusters %q", grpcCertProvider, translate.CertProviderInstance)
	}
	// xDS credentials: TLS to the model hosts from the bootstrap's certificate provider, as
	// the control plane's clusters say; plain text (the fallback) only where they say none.
	// The hosts require client certificates, so an answer proves the data path was mTLS.
	creds, err := xdscreds.NewClientCredentials(xdscreds.ClientOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("xds:///churn", grpc.WithResolvers(resolver), grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	versions := map[string]int{}
	for range 20 {
		rctx, rcancel := context.WithTimeout(ctx, 10*time.Second)
		r, err := oip.NewGRPCInferenceServiceClient(conn).ModelInfer(rctx, &oip.ModelInferRequest{
			ModelName: "churn",
			Inputs: []*oip.ModelInferRequest_InferInputTensor{{
				Name: "features", Datatype: "FP32", Shape: []int64{1, 4},
				Contents: &oip.InferTensorContents{Fp32Contents: []float32{0.3, 12, 1, 0}},
			}},
		}, grpc.WaitForReady(true))
		rcancel()
		if err != nil {
			t.Fatalf("proxyless ModelInfer churn over mTLS: %v", err)
		}
		versions[r.GetModelVersion()]++
	}
	if versions["v1"] == 0 || versions["v2"] == 0 {
		t.Errorf("proxyless churn split over mTLS %v: want both v1 and v2", versions)
	}
}

// TestUpTLSThroughEnvoy runs `patchbay up --tls` with a real Envoy (skipped without
// ENVOY_BIN or envoy on PATH; .github/workflows/envoy-e2e.yml runs it): Envoy on the mTLS
// bootstrap (SDS files naming up's certificates) gets its config from the control plane and
// ext_proc's decisions over mTLS, reaches the model hosts over mTLS, and serves the edge
// listener over TLS requiring client certificates: REST and gRPC through it answer with a
// client certificate, and a client without one is refused.
func TestUpTLSThroughEnvoy(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and starts the patchbay binary and Envoy")
	}
	bin := harness.EnvoyBinary(t)
	edge, stats := freeAddr(t), freeAddr(t)
	u := startUpForTest(t, "--tls", "--envoy", bin, "--edge-listener", edge,
		"--envoy-admin", freeAddr(t), "--envoy-stats", stats, "--envoy-timeout", "60s")
	if !strings.Contains(u.banner, "Envoy edge") {
		t.Fatalf("Envoy did not come up:\n%s", u.banner)
	}
	dir := regexp.MustCompile(`certificates in (\S+)`).FindStringSubmatch(u.banner)[1]
	op := tlsfiles.Files{Cert: filepath.Join(dir, "operator.crt"), Key: filepath.Join(dir, "operator.key"), CA: filepath.Join(dir, "ca.crt")}
	operator, err := tlsfiles.Load(op, tlsfiles.Options{})
	if err != nil {
		t.Fatal(err)
	}
	caOnly, err := tlsfiles.Load(tlsfiles.Files{CA: op.CA}, tlsfiles.Options{})
	if err != nil {
		t.Fatal(err)
	}
	mtls := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: operator.ClientConfig("127.0.0.1")}}
	noCert := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: caOnly.ClientConfig("127.0.0.1")}}
	body := `{"inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":[0.5,1.2,3.4,0.1,0.0,2.2,1.1,0.7]}]}`
	infer := func(c *http.Client) (*http.Response, error) {
		req, err := http.NewRequest(http.MethodPost, "https://"+edge+"/v2/models/ranker/infer", strings.NewReader(body))
		if err != nil {
			return nil, err
		}
		req.Header.Set(headers.UserID, "alice")
		req.Header.Set("content-type", "application/json")
		return c.Do(req)
	}
	// The listener comes over ADS after Envoy is ready: retry, bounded.
	var last string
	ok := false
	for range 100 {
		resp, err := infer(mtls)
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			last = resp.Status + " " + string(b) + " served-by=" + resp.Header.Get(headers.ServedBy)
			if resp.StatusCode == http.StatusOK && strings.HasPrefix(resp.Header.Get(headers.ServedBy), "ranker/") {
				ok = true
				break
			}
		} else {
			last = err.Error()
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !ok {
		t.Fatalf("REST through Envoy over mTLS never answered: %s", last)
	}
	if resp, err := infer(noCert); err == nil {
		resp.Body.Close()
		t.Errorf("the edge listener answered %s to a client without a certificate", resp.Status)
	}
	conn, err := grpc.NewClient(edge, grpc.WithTransportCredentials(credentials.NewTLS(operator.ClientConfig("127.0.0.1"))))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, headers.Model, "churn", headers.UserID, "carol")
	r, err := oip.NewGRPCInferenceServiceClient(conn).ModelInfer(ctx, &oip.ModelInferRequest{
		ModelName: "churn",
		Inputs: []*oip.ModelInferRequest_InferInputTensor{{
			Name: "features", Datatype: "FP32", Shape: []int64{1, 4},
			Contents: &oip.InferTensorContents{Fp32Contents: []float32{0.3, 12, 1, 0}},
		}},
	})
	if err != nil {
		t.Fatalf("gRPC through Envoy over mTLS: %v", err)
	}
	if v := r.GetModelVersion(); v != "v1" && v != "v2" {
		t.Errorf("churn answered by version %q", v)
	}
}
