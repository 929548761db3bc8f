// Package envoye2e runs HTTP through a real Envoy, configured only by patchbay's
// bootstrap and control plane, to real model hosts: split, stickiness, experiment
// arms, shadow, rollback by file edit under load, and ext_proc killed. Every test
// skips with a message when no Envoy can be found (ENVOY_BIN, or envoy on PATH);
// .github/workflows/envoy-e2e.yml runs them with the pinned Envoy.
package envoye2e

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/patchbay-io/patchbay/api/headers"
	"github.com/patchbay-io/patchbay/envoy"
	"github.com/patchbay-io/patchbay/test/harness"
)

func TestMain(m *testing.M) { os.Exit(harness.Main(m)) }

const rankerBody = `{"inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":[0.5,1.2,3.4,0.1,0.0,2.2,1.1,0.7]}]}`

// system is one model's worth of patchbay behind a real Envoy: a v7-only host and a
// v8-only host (so an answer proves which version ran), the control plane watching a
// rollout directory, ext_proc and Envoy.
type system struct {
	v7, v8  *harness.ModelHost
	cp      *harness.ControlPlane
	ep      *harness.ExtProc
	proxy   *harness.Envoy
	dir     string
	v8Count atomic.Int64 // requests that reached v8's host (through the counting proxy)
	v8Addr  string       // the counting proxy in front of the v8 host
}

// start brings the system up with the rollout produced by rollout(v7, v8 endpoints).
func start(t testing.TB, role envoy.Role, rollout func(v7, v8 string) string) *system {
	t.Helper()
	harness.EnvoyBinary(t) // skip before starting anything
	s := &system{dir: t.TempDir()}
	s.v7 = harness.StartModelHost(t, "modelhost-v7", harness.RepoWith(t, "ranker/v7"))
	s.v8 = harness.StartModelHost(t, "modelhost-v8", harness.RepoWith(t, "ranker/v8"))
	// Count what reaches v8 (shadow copies included) with a pass-through proxy.
	target, _ := url.Parse("http://" + s.v8.HTTP)
	rp := httputil.NewSingleHostReverseProxy(target)
	counter := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/infer") {
			s.v8Count.Add(1)
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(counter.Close)
	s.v8Addr = strings.TrimPrefix(counter.URL, "http://")
	harness.WriteRollout(t, s.dir, "ranker.yaml", rollout(s.v7.HTTP, s.v8Addr))
	s.cp = harness.StartControlPlane(t, s.dir)
	s.ep = harness.StartExtProc(t, s.cp.ADS)
	s.proxy = harness.StartEnvoy(t, role, s.cp, s.ep)
	// The ext_proc cluster is health-checked: until a check passes Envoy skips ext_proc.
	waitExtprocHealth(t, s.proxy, true)
	harness.Eventually(t, 20*time.Second, "a first prediction through Envoy", func() bool {
		code, _, _ := s.predict("warmup", nil)
		return code == http.StatusOK
	})
	return s
}

var client = &http.Client{Timeout: 5 * time.Second}

// predict sends one ranker prediction through Envoy as user and returns the status,
// the version that answered (from x-patchbay-served-by) and the experiments header.
func (s *system) predict(user string, extra map[string]string) (int, string, string) {
	req, err := http.NewRequest(http.MethodPost, "http://"+s.proxy.Listener+"/v2/models/ranker/infer", strings.NewReader(rankerBody))
	if err != nil {
		return 0, "", err.Error()
	}
	req.Header.Set("content-type", "application/json")
	if user != "" {
		req.Header.Set(headers.UserID, user)
	}
	for k, v := range extra {
		req.Header.Set(k, v)
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", err.Error()
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, strings.TrimPrefix(resp.Header.Get(headers.ServedBy), "ranker/"), resp.Header.Get(headers.Experiments)
}

func split(v7, v8 int) func(string, string) string {
	return func(e7, e8 string) string {
		return fmt.Sprintf(`apiVersion: patchbay.io/v1
kind: Rollout
model: ranker
versions:
  - {name: v7, endpoints: [%q]}
  - {name: v8, endpoints: [%q]}
traffic: {v7: %d, v8: %d}
`, e7, e8, v7, v8)
	}
}

// TestEnvoySplitAndStickiness: a 90/10 split over 600 users lands near 10% on v8, and
// each user keeps their version on every request.
func TestEnvoySplitAndStickiness(t *testing.T) {
	s := start(t, envoy.Edge, split(90, 10))
	const users = 600
	first := map[string]string{}
	v8 := 0
	for i := range users {
		user := fmt.Sprintf("user-%d", i)
		code, version, _ := s.predict(user, nil)
		if code != http.StatusOK || (version != "v7" && version != "v8") {
			t.Fatalf("%s: status %d, served by %q", user, code, version)
		}
		first[user] = version
		if version == "v8" {
			v8++
		}
	}
	// Binomial(600, 0.1): mean 60, sd 7.3; ±4.5 sd.
	if v8 < 27 || v8 > 93 {
		t.Errorf("v8 served %d of %d users, want about 60 (10%%)", v8, users)
	}
	for i := range 100 {
		user := fmt.Sprintf("user-%d", i)
		for range 3 {
			if _, version, _ := s.predict(user, nil); version != first[user] {
				t.Fatalf("%s moved from %s to %s: not sticky", user, first[user], version)
			}
		}
	}
}

// TestEnvoyExperimentArm: users in the experiment get their arm's version, and the
// response names the experiment and arm.
func TestEnvoyExperimentArm(t *testing.T) {
	s := start(t, envoy.Edge, func(e7, e8 string) string {
		return split(100, 0)(e7, e8) + `experiments:
  - name: ranker-ltv
    layer: ranking
    allocation: 100
    arms:
      - {name: control, version: v7, weight: 50}
      - {name: treatment, version: v8, weight: 50}
`
	})
	arms := map[string]int{}
	for i := range 200 {
		code, version, exp := s.predict(fmt.Sprintf("user-%d", i), nil)
		if code != http.StatusOK {
			t.Fatalf("status %d", code)
		}
		want := map[string]string{"ranker-ltv=control": "v7", "ranker-ltv=treatment": "v8"}[exp]
		if want == "" {
			t.Fatalf("%s = %q, want ranker-ltv=control or ranker-ltv=treatment", headers.Experiments, exp)
		}
		if version != want {
			t.Fatalf("arm %s served by %s, want %s", exp, version, want)
		}
		arms[exp]++
	}
	if arms["ranker-ltv=treatment"] < 60 || arms["ranker-ltv=control"] < 60 {
		t.Errorf("arms %v: want about 100 each", arms)
	}
	// A client cannot pick its arm's version by sending the routing header itself.
	for i := range 50 {
		_, version, exp := s.predict(fmt.Sprintf("user-%d", i), map[string]string{headers.Version: "v8"})
		if exp == "ranker-ltv=control" && version != "v7" {
			t.Fatalf("a forged %s moved a control user to %s", headers.Version, version)
		}
	}
}

// TestEnvoyShadow: with all traffic on v7 and a 100% shadow to v8, every answer comes
// from v7 and the v8 host receives the copies.
func TestEnvoyShadow(t *testing.T) {
	s := start(t, envoy.Edge, func(e7, e8 string) string {
		return split(100, 0)(e7, e8) + "shadow:\n  - {version: v8, percent: 100}\n"
	})
	before := s.v8Count.Load()
	for i := range 50 {
		if code, version, _ := s.predict(fmt.Sprintf("user-%d", i), nil); code != http.StatusOK || version != "v7" {
			t.Fatalf("status %d served by %s, want 200 from v7", code, version)
		}
	}
	harness.Eventually(t, 5*time.Second, "shadow copies at v8", func() bool { return s.v8Count.Load()-before >= 45 })
}

// TestEnvoyRollbackByFileEditUnderLoad: while clients keep sending, the rollout file
// moves all traffic from v8 back to v7; not one request fails, and v7 serves all
// traffic soon after.
func TestEnvoyRollbackByFileEditUnderLoad(t *testing.T) {
	s := start(t, envoy.Edge, split(0, 100))
	var (
		failed, sent atomic.Int64
		afterV8      atomic.Int64 // v8 answers after the edit was seen
		edited       atomic.Bool
		wg           sync.WaitGroup
		stop         = make(chan struct{})
	)
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 100_000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				code, version, _ := s.predict(fmt.Sprintf("load-%d-%d", w, i%50), nil)
				sent.Add(1)
				if code != http.StatusOK {
					failed.Add(1)
				} else if version == "v8" && edited.Load() {
					afterV8.Add(1)
				}
			}
		}()
	}
	time.Sleep(time.Second)
	edit := time.Now()
	harness.WriteRollout(t, s.dir, "ranker.yaml", split(100, 0)(s.v7.HTTP, s.v8Addr))
	harness.Eventually(t, 10*time.Second, "v7 to serve after the rollback", func() bool {
		_, version, _ := s.predict("probe", nil)
		return version == "v7"
	})
	t.Logf("rollback live %v after the file edit", time.Since(edit).Round(time.Millisecond))
	edited.Store(true)
	time.Sleep(time.Second)
	close(stop)
	wg.Wait()
	if failed.Load() != 0 {
		t.Errorf("%d of %d requests failed during the rollback", failed.Load(), sent.Load())
	}
	if afterV8.Load() > 4 { // in-flight requests at the moment of the switch
		t.Errorf("%d requests still served by v8 after the rollback was live", afterV8.Load())
	}
	if sent.Load() < 100 {
		t.Errorf("only %d requests sent: the load did not run", sent.Load())
	}
}

// TestEnvoyExtprocKilledFailsOpen: with ext_proc gone, Envoy keeps serving the baseline
// split (failure_mode_allow): every request succeeds, experiments stop applying.
func TestEnvoyExtprocKilledFailsOpen(t *testing.T) {
	s := start(t, envoy.Edge, func(e7, e8 string) string {
		return split(100, 0)(e7, e8) + `experiments:
  - name: all-in
    layer: ranking
    allocation: 100
    arms:
      - {name: treatment, version: v8, weight: 1}
`
	})
	if _, version, _ := s.predict("alice", nil); version != "v8" {
		t.Fatalf("with ext_proc up, the experiment should send alice to v8, got %s", version)
	}
	s.ep.Kill()
	for i := range 100 {
		code, version, exp := s.predict(fmt.Sprintf("user-%d", i), nil)
		if code != http.StatusOK {
			t.Fatalf("request %d failed with ext_proc down: %d", i, code)
		}
		if version != "v7" || exp != "" {
			t.Fatalf("ext_proc down: served by %s with experiments %q, want the baseline v7 and none", version, exp)
		}
	}
}

// TestEnvoySidecar: the sidecar bootstrap gets the outbound listener on localhost and
// routes like the edge.
func TestEnvoySidecar(t *testing.T) {
	s := start(t, envoy.Sidecar, split(100, 0))
	if !strings.HasPrefix(s.proxy.Listener, "127.0.0.1:") {
		t.Fatalf("sidecar listener %s is not on localhost", s.proxy.Listener)
	}
	if code, version, _ := s.predict("bob", nil); code != http.StatusOK || version != "v7" {
		t.Fatalf("through the sidecar: %d from %q", code, version)
	}
}

// TestEnvoyScopedRoutes: with Scoped RDS, ranker's calls reach ranker's route table
// (server-level GET /v2 by x-patchbay-model included), a forged x-patchbay-route-key is
// replaced by Envoy's own, and a model no scope names gets Envoy's 404 NR rewritten by the
// HCM's local_reply_config into an OIP error (application/json).
func TestEnvoyScopedRoutes(t *testing.T) {
	s := start(t, envoy.Edge, split(100, 0))
	if code, version, _ := s.predict("u1", map[string]string{headers.RouteKey: "/v2/models/nosuch/infer//"}); code != http.StatusOK || version != "v7" {
		t.Fatalf("forged route key: %d %q, want 200 from v7", code, version)
	}
	for _, tc := range []struct {
		method, path, model string
		want                int
		json                bool
	}{
		{http.MethodGet, "/v2", "ranker", http.StatusOK, false},
		{http.MethodGet, "/v2/models/ranker", "", http.StatusOK, false},
		{http.MethodPost, "/v2/models/nosuch/infer", "", http.StatusNotFound, true},
		{http.MethodGet, "/v2", "nosuch", http.StatusNotFound, true},
	} {
		req, _ := http.NewRequest(tc.method, "http://"+s.proxy.Listener+tc.path, nil)
		if tc.model != "" {
			req.Header.Set(headers.Model, tc.model)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.want || tc.json && (resp.Header.Get("content-type") != "application/json" || !strings.HasPrefix(string(body), `{"error":"not found: `)) {
			t.Errorf("%s %s (%s): %d %q %s", tc.method, tc.path, tc.model, resp.StatusCode, resp.Header.Get("content-type"), body)
		}
	}
}
