package xds

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/patchbay-io/patchbay/api/headers"
	"github.com/patchbay-io/patchbay/xds/rollout"
)

// metadataHost is a real HTTP server answering one version's OIP model metadata
// (GET /v2/models/<m>/versions/<v>) with what the test sets, or 503 while it is nil.
type metadataHost struct {
	addr  string
	md    atomic.Pointer[rollout.Metadata]
	reads atomic.Int64
	delay atomic.Int64 // nanoseconds each answer waits
	srv   *http.Server
}

func startMetadataHost(t *testing.T, addr, model, version string, md *rollout.Metadata) *metadataHost {
	t.Helper()
	var lis net.Listener
	var err error
	for range 50 { // a port just closed by the test may linger briefly
		if lis, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	h := &metadataHost{addr: lis.Addr().String()}
	h.md.Store(md)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v2/models/"+model+"/versions/"+version, func(w http.ResponseWriter, _ *http.Request) {
		h.reads.Add(1)
		time.Sleep(time.Duration(h.delay.Load()))
		md := h.md.Load()
		if md == nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprint(w, `{"error":"not loaded"}`)
			return
		}
		json.NewEncoder(w).Encode(map[string]any{"name": model, "versions": []string{version}, "platform": "test", "inputs": md.Inputs, "outputs": md.Outputs})
	})
	mux.HandleFunc("GET /v2/models/"+model+"/versions/"+version+"/ready", func(http.ResponseWriter, *http.Request) {})
	h.srv = &http.Server{Handler: mux}
	go h.srv.Serve(lis)
	t.Cleanup(func() { h.srv.Close() })
	return h
}

func meta(in ...rollout.Tensor) *rollout.Metadata {
	return &rollout.Metadata{Inputs: in, Outputs: []rollout.Tensor{{Name: "y", Datatype: "FP32", Shape: []int64{-1, 1}}}}
}

var (
	keeps    = meta(rollout.Tensor{Name: "x", Datatype: "FP32", Shape: []int64{-1, 4}})
	breaks   = meta(rollout.Tensor{Name: "x", Datatype: "FP64", Shape: []int64{-1, 4}})
	addsMask = meta(rollout.Tensor{Name: "x", Datatype: "FP32", Shape: []int64{8, 4}}, rollout.Tensor{Name: "mask", Datatype: "BOOL", Shape: []int64{-1}})
)

func contractDoc(restV1, grpcV1, restV2, grpcV2 string) string {
	return fmt.Sprintf(`apiVersion: patchbay.io/v1
kind: Rollout
model: r
versions:
  - {name: v1, endpoints: [%q], grpcEndpoints: [%q]}
  - {name: v2, endpoints: [%q], grpcEndpoints: [%q]}
traffic: {v1: 50, v2: 50}
pinning: true
experiments: [{name: e, layer: l, allocation: 100, arms: [{name: a, version: v2, weight: 1}, {name: b, version: v1, weight: 1}]}]
shadow: [{version: v2, percent: 100}]
contract:
  inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
  outputs: [{name: y, datatype: FP32, shape: [-1, 1]}]
`, restV1, grpcV1, restV2, grpcV2)
}

func contractOf(c *cp, version string) (ContractStatus, string) {
	for _, m := range c.srv.Status().Models {
		if m.Name == "r" {
			return m.Contract[version], m.ContractFallback
		}
	}
	return ContractStatus{}, ""
}

// noCallsReach sends n calls through grpc-go's xDS client (split and a pin on version) and
// checks that version's host answers none and the pin is refused.
func noCallsReach(t *testing.T, c *cp, b *backend, version string) {
	t.Helper()
	client := xdsClient(t, c, "r")
	waitFor(t, 5*time.Second, "a pin on "+version+" refused", func() bool {
		_, err := call(context.Background(), client, headers.Version, version)
		return status.Code(err) == codes.FailedPrecondition
	})
	b.calls.Store(0)
	for range 100 {
		if _, err := call(context.Background(), client); err != nil {
			t.Fatal(err)
		}
	}
	if n := b.calls.Load(); n != 0 {
		t.Fatalf("the held version's host answered %d calls", n)
	}
}

// TestContractHoldsBreakingVersion: a version whose OIP metadata changes a contracted
// input's datatype is held at zero for every kind of traffic (split, arm, shadow, pin, in
// Envoy's config, grpc-go's and the ext_proc policy) with the reason on /status and in
// patchbay_xds_contract_violations, while the other version serves everything; once its
// metadata keeps the contract (adding an input and fixing a variable dimension), it serves again.
func TestContractHoldsBreakingVersion(t *testing.T) {
	b1, b2 := startBackend(t, "v1"), startBackend(t, "v2")
	m1 := startMetadataHost(t, "127.0.0.1:0", "r", "v1", keeps)
	m2 := startMetadataHost(t, "127.0.0.1:0", "r", "v2", breaks)
	dir := t.TempDir()
	writeFile(t, dir, "r.yaml", contractDoc(m1.addr, b1.addr, m2.addr, b2.addr))
	c := startCPWith(t, dir, func(cfg *Config) { cfg.ContractRetry = 50 * time.Millisecond })
	waitFor(t, 5*time.Second, "v2 held by the contract", func() bool {
		cs, _ := contractOf(c, "v2")
		return cs.State == contractHeld
	})
	cs, fallback := contractOf(c, "v2")
	if !strings.Contains(cs.Reason, `input "x": datatype FP64, the contract says FP32`) || fallback != "" {
		t.Fatalf("v2 contract status %+v (fallback %q), want the datatype named", cs, fallback)
	}
	if cs, _ := contractOf(c, "v1"); cs.State != contractOK {
		t.Fatalf("v1 contract status %+v, want ok", cs)
	}
	waitFor(t, 5*time.Second, "v2's doors closed", func() bool { return len(doors(t, c.srv, "r", "v2")) == 0 })
	doorsOpen(t, c.srv, "r", "v1")
	if split := servedSplit(t, c, "r/split"); len(split) > 0 {
		for _, cl := range split {
			if strings.Contains(cl, "v2") {
				t.Fatalf("served split still names v2: %v", split)
			}
		}
	}
	noCallsReach(t, c, b2, "v2")
	_, body := httpDo(t, http.MethodGet, "http://"+c.adminAddr+"/metrics", "", "")
	if !strings.Contains(body, `patchbay_xds_contract_violations{model="r",otel_scope_name`) && !strings.Contains(body, `patchbay_xds_contract_violations{model="r"`) {
		t.Errorf("no patchbay_xds_contract_violations for r on /metrics")
	}
	if !strings.Contains(c.logs.String(), "version held at zero") {
		t.Errorf("no log line for the held version")
	}

	// A compatible v2: an added input, a contracted -1 given a size.
	m2.md.Store(addsMask)
	waitFor(t, 5*time.Second, "v2 accepted", func() bool {
		cs, _ := contractOf(c, "v2")
		return cs.State == contractOK
	})
	waitFor(t, 5*time.Second, "v2's doors open", func() bool { return len(doors(t, c.srv, "r", "v2")) > 0 })
	client := xdsClient(t, c, "r")
	allGoTo(t, client, "v2", headers.Version, "v2")

	// Both versions move to hosts whose metadata breaks it (a version is read again when
	// its endpoints change): every version with a share is held, so the last good state
	// (both versions on their old endpoints) keeps serving.
	before := c.srv.Version()
	m3 := startMetadataHost(t, "127.0.0.1:0", "r", "v1", breaks)
	m4 := startMetadataHost(t, "127.0.0.1:0", "r", "v2", breaks)
	writeFile(t, dir, "r.yaml", contractDoc(m3.addr, b1.addr, m4.addr, b2.addr))
	waitFor(t, 5*time.Second, "both held", func() bool {
		a, _ := contractOf(c, "v1")
		b, _ := contractOf(c, "v2")
		return a.State == contractHeld && b.State == contractHeld
	})
	if _, fb := contractOf(c, "v1"); !strings.Contains(fb, "last state") {
		t.Errorf("contract fallback %q, want the last good state named", fb)
	}
	if got := c.srv.Version(); got != before {
		t.Errorf("config version %s, want %s kept (the last good state)", got, before)
	}
	doorsOpen(t, c.srv, "r", "v1")
	doorsOpen(t, c.srv, "r", "v2")
}

// TestContractUnreadableMetadataHeldUntilItAnswers: a version whose REST endpoint does not
// answer is held at zero ("metadata unreadable") and the other serves; once a server answers
// there with metadata that keeps the contract, it is read again and the version serves.
func TestContractUnreadableMetadataHeldUntilItAnswers(t *testing.T) {
	b1, b2 := startBackend(t, "v1"), startBackend(t, "v2")
	m1 := startMetadataHost(t, "127.0.0.1:0", "r", "v1", keeps)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	silent := l.Addr().String()
	l.Close() // nothing listens there now
	dir := t.TempDir()
	writeFile(t, dir, "r.yaml", contractDoc(m1.addr, b1.addr, silent, b2.addr))
	c := startCPWith(t, dir, func(cfg *Config) { cfg.ContractRetry = 50 * time.Millisecond })
	waitFor(t, 5*time.Second, "v2 held: metadata unreadable", func() bool {
		cs, _ := contractOf(c, "v2")
		return cs.State == contractHeld && strings.Contains(cs.Reason, "metadata unreadable")
	})
	waitFor(t, 5*time.Second, "v2's doors closed", func() bool { return len(doors(t, c.srv, "r", "v2")) == 0 })
	noCallsReach(t, c, b2, "v2")

	m2 := startMetadataHost(t, silent, "r", "v2", keeps)
	waitFor(t, 5*time.Second, "v2 accepted once it answers", func() bool {
		cs, _ := contractOf(c, "v2")
		return cs.State == contractOK
	})
	if m2.reads.Load() == 0 {
		t.Fatal("v2's metadata was never read")
	}
	waitFor(t, 5*time.Second, "v2's doors open", func() bool { return len(doors(t, c.srv, "r", "v2")) > 0 })
	allGoTo(t, xdsClient(t, c, "r"), "v2", headers.Version, "v2")
}

// TestHoldVersions: a held version's share goes to the others in proportion (summing to
// 100), its arms and shadows go (an experiment left without arms is dropped), it is Closed;
// with no version with a share left, nil (the caller keeps the last good state).
func TestHoldVersions(t *testing.T) {
	r := &rollout.Rollout{Model: "m",
		Versions: []rollout.Version{{Name: "v1"}, {Name: "v2"}, {Name: "v3"}},
		Traffic:  map[string]int{"v1": 60, "v2": 30, "v3": 10},
		Shadow:   []rollout.Shadow{{Version: "v2", Percent: 5}, {Version: "v3", Percent: 5}},
		Experiments: []rollout.Experiment{
			{Name: "only-v2", Arms: []rollout.Arm{{Name: "a", Version: "v2", Weight: 1}}},
			{Name: "mixed", Arms: []rollout.Arm{{Name: "a", Version: "v2", Weight: 1}, {Name: "b", Version: "v1", Weight: 1}}},
		}}
	out := holdVersions(r, map[string]string{"v2": "breaks"})
	if out == nil {
		t.Fatal("nil, want v1 and v3 serving")
	}
	if got := out.Traffic; got["v1"] != 86 || got["v3"] != 14 || got["v2"] != 0 {
		t.Errorf("traffic %v, want v1 86, v3 14", got)
	}
	if len(out.Shadow) != 1 || out.Shadow[0].Version != "v3" {
		t.Errorf("shadows %v, want v3's only", out.Shadow)
	}
	if len(out.Experiments) != 1 || out.Experiments[0].Name != "mixed" || len(out.Experiments[0].Arms) != 1 || out.Experiments[0].Arms[0].Version != "v1" {
		t.Errorf("experiments %+v, want mixed with its v1 arm", out.Experiments)
	}
	if !out.Closed["v2"] || out.Closed["v1"] || out.Closed["v3"] {
		t.Errorf("closed %v, want v2", out.Closed)
	}
	if r.Traffic["v2"] != 30 || len(r.Experiments[1].Arms) != 2 || len(r.Shadow) != 2 || r.Closed != nil {
		t.Error("the spec was changed")
	}
	if out := holdVersions(r, map[string]string{"v1": "x", "v2": "x", "v3": "x"}); out != nil {
		t.Errorf("every version held: %+v, want nil", out)
	}
}
