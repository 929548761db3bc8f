package xds

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/patchbay-io/patchbay/xds/rollout"
)

// TestContractStartupWindowHoldsBreakingVersion: a version that breaks the contract and is
// in the files when the control plane starts never receives a request, even though its
// metadata takes a while to answer: ADS is served only once the first check has read it
// (within --contract-wait), so the first config a client gets already holds it.
func TestContractStartupWindowHoldsBreakingVersion(t *testing.T) {
	b1, b2 := startBackend(t, "v1"), startBackend(t, "v2")
	m1 := startMetadataHost(t, "127.0.0.1:0", "r", "v1", keeps)
	m2 := startMetadataHost(t, "127.0.0.1:0", "r", "v2", breaks)
	m2.delay.Store(int64(600 * time.Millisecond)) // within the read timeout (1s)
	dir := t.TempDir()
	writeFile(t, dir, "r.yaml", contractDoc(m1.addr, b1.addr, m2.addr, b2.addr))
	c := startCPWith(t, dir, func(cfg *Config) { cfg.ContractRetry = 50 * time.Millisecond })
	// The client connects at once: its first config is the one served after the check.
	client := xdsClient(t, c, "r")
	for i := range 200 {
		if _, err := call(context.Background(), client); err != nil {
			t.Fatalf("RPC %d: %v", i, err)
		}
	}
	if n := b2.calls.Load(); n != 0 {
		t.Fatalf("the breaking version answered %d of 200 calls made from the start", n)
	}
	if b1.calls.Load() != 200 {
		t.Fatalf("v1 answered %d of 200 calls", b1.calls.Load())
	}
	if cs, _ := contractOf(c, "v2"); cs.State != contractHeld {
		t.Fatalf("v2 contract status %+v, want held", cs)
	}
	if m2.reads.Load() == 0 {
		t.Fatal("v2's metadata was never read")
	}
}

// TestContractStartupWindowFailsOpen: when a version's metadata host accepts connections
// but never answers, the control plane does not wait past --contract-wait: it serves the
// model as written (logged, and on /status while it lasts), and once the read fails the
// version is held as unreadable while the other serves.
func TestContractStartupWindowFailsOpen(t *testing.T) {
	b1, b2 := startBackend(t, "v1"), startBackend(t, "v2")
	m1 := startMetadataHost(t, "127.0.0.1:0", "r", "v1", keeps)
	silent, err := net.Listen("tcp", "127.0.0.1:0") // accepts (backlog), never answers
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { silent.Close() })
	dir := t.TempDir()
	writeFile(t, dir, "r.yaml", contractDoc(m1.addr, b1.addr, silent.Addr().String(), b2.addr))
	c := startCPWith(t, dir, func(cfg *Config) {
		cfg.ContractRetry = 50 * time.Millisecond
		cfg.ContractWait = 100 * time.Millisecond // shorter than the 1s read timeout
	})
	client := xdsClient(t, c, "r")
	if _, err := call(context.Background(), client); err != nil {
		t.Fatalf("model not served after the window: %v", err)
	}
	logs := c.logs.String()
	for _, v := range []string{"v1", "v2"} {
		if !strings.Contains(logs, `"version":"`+v+`"`) || !strings.Contains(logs, "not read within the startup window: served as written") {
			t.Fatalf("no fail-open log line for %s:\n%s", v, logs)
		}
	}
	waitFor(t, 5*time.Second, "v2 held: metadata unreadable", func() bool {
		cs, _ := contractOf(c, "v2")
		return cs.State == contractHeld && strings.Contains(cs.Reason, "metadata unreadable")
	})
	if cs, _ := contractOf(c, "v1"); cs.State != contractOK {
		t.Fatalf("v1 contract status %+v, want ok", cs)
	}
	noCallsReach(t, c, b2, "v2")
}

// TestContractStartupWindowStatus: the /status of a version served as written after the
// window says so (ContractStatus pending with the reason).
func TestContractStartupWindowStatus(t *testing.T) {
	s := &Server{}
	r := &rollout.Rollout{Model: "r", Contract: &rollout.Contract{Inputs: []rollout.Tensor{{Name: "x", Datatype: "FP32", Shape: []int64{-1}}}},
		Versions: []rollout.Version{{Name: "v1", Endpoints: []string{"127.0.0.1:1"}}, {Name: "v2", Endpoints: []string{"127.0.0.1:2"}}},
		Traffic:  map[string]int{"v1": 50, "v2": 50}}
	s.state.files = &rollout.Set{Rollouts: []*rollout.Rollout{r}}
	s.state.contract.open = map[mv]bool{{"r", "v2"}: true}
	held := s.heldVersionsLocked(r)
	if _, ok := held["v2"]; ok || held["v1"] == "" {
		t.Fatalf("held %v, want v1 (pending) only", held)
	}
	st, _ := s.contractStatusLocked("r")
	if st["v2"].State != contractPending || !strings.Contains(st["v2"].Reason, "served as written") {
		t.Fatalf("v2 status %+v", st["v2"])
	}
}

// TestReadyzWaitsForTheFirstContractChecks: while ADS waits for the first contract checks,
// /readyz says so with a 503 (a Kubernetes readiness probe keeps the replica out of the
// Service), and it answers ok once ADS is served.
func TestReadyzWaitsForTheFirstContractChecks(t *testing.T) {
	b1 := startBackend(t, "v1")
	m1 := startMetadataHost(t, "127.0.0.1:0", "r", "v1", keeps)
	m2 := startMetadataHost(t, "127.0.0.1:0", "r", "v2", keeps)
	m2.delay.Store(int64(700 * time.Millisecond))
	dir := t.TempDir()
	writeFile(t, dir, "r.yaml", contractDoc(m1.addr, b1.addr, m2.addr, b1.addr))
	c := startCPWith(t, dir, func(cfg *Config) { cfg.ContractWait = 3 * time.Second })
	readyz := func() (int, string) {
		resp, err := http.Get("http://" + c.adminAddr + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	code, body := readyz()
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "contract") {
		t.Fatalf("/readyz during the startup window: %d %q, want 503 naming the contract checks", code, body)
	}
	waitFor(t, 5*time.Second, "/readyz ok after the first checks", func() bool {
		code, _ := readyz()
		return code == http.StatusOK
	})
}
