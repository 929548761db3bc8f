package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/patchbay-io/patchbay/test/harness"
	"github.com/patchbay-io/patchbay/xds/rollout"
)

// canaryExample is examples/canary (the walk-through of examples/canary/README.md).
var canaryExample = filepath.Join("..", "..", "examples", "canary")

// TestCanaryExampleRollouts pins what examples/canary/README.md promises about its
// rollout, loaded with the control plane's strict loader: churn v1 → v2 with an analysis
// whose metricsEndpoints are the admin listeners of the hosts `up` starts, v3 to swap in.
func TestCanaryExampleRollouts(t *testing.T) {
	t.Parallel()
	var stdout, stderr bytes.Buffer
	if err := run(context.Background(), []string{"rollout", "validate", filepath.Join(canaryExample, "rollouts")}, &stdout, &stderr); err != nil {
		t.Fatalf("patchbay rollout validate examples/canary/rollouts: %v\n%s", err, stderr.String())
	}
	if !strings.Contains(stdout.String(), "model churn: 3 versions, 0 experiments\n") {
		t.Errorf("rollout validate: %s", stdout.String())
	}
	set, err := rollout.LoadDir(filepath.Join(canaryExample, "rollouts"))
	if err != nil {
		t.Fatal(err)
	}
	churn := set.Model("churn")
	if churn == nil || len(set.Rollouts) != 1 {
		t.Fatalf("want exactly churn; got %d rollouts", len(set.Rollouts))
	}
	if ws := rollout.Warnings(set); len(ws) != 0 {
		t.Errorf("canary example warns: %v", ws)
	}
	a := churn.Analysis
	if a == nil || a.Baseline != "v1" || a.Canary != "v2" || !slices.Equal(a.Steps, []int{10, 25, 50, 100}) {
		t.Fatalf("analysis %+v, want v1 → v2 through 10, 25, 50, 100", a)
	}
	if len(churn.Shadow) != 1 || churn.Shadow[0].Version != "v2" {
		t.Errorf("shadow %+v, want the canary v2", churn.Shadow)
	}
	c, err := parseUp([]string{"--examples", canaryExample}, io.Discard, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range churn.Versions {
		for _, ep := range v.RESTEndpoints() {
			i := slices.Index(c.hostHTTP, ep)
			if i < 0 {
				t.Errorf("%s endpoint %s is not a model host `up` starts (%v)", v.Name, ep, c.hostHTTP)
				continue
			}
			if !slices.Equal(v.MetricsEndpoints, []string{c.hostAdmin[i]}) {
				t.Errorf("%s metricsEndpoints %v, want its host's admin listener %s", v.Name, v.MetricsEndpoints, c.hostAdmin[i])
			}
		}
	}
	// The README's failure step (sed on the lines marked "# canary") gives a valid v3 canary.
	b, err := os.ReadFile(filepath.Join(canaryExample, "rollouts", "churn.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "churn.yaml"), []byte(swapCanary(t, string(b))), 0o600); err != nil {
		t.Fatal(err)
	}
	set, err = rollout.LoadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if r := set.Model("churn"); r.Analysis.Canary != "v3" || r.Shadow[0].Version != "v3" {
		t.Errorf("after the swap: canary %s, shadow %+v; want v3 both", r.Analysis.Canary, r.Shadow)
	}
}

// swapCanary is the README's `sed -i '/# canary$/s/v2/v3/'`.
func swapCanary(t *testing.T, file string) string {
	t.Helper()
	lines := strings.Split(file, "\n")
	n := 0
	for i, l := range lines {
		if strings.HasSuffix(l, "# canary") {
			lines[i] = strings.Replace(l, "v2", "v3", 1)
			n++
		}
	}
	if n != 2 {
		t.Fatalf("%d lines end with \"# canary\", want 2 (the shadow and the analysis's canary)", n)
	}
	return strings.Join(lines, "\n")
}

// TestCanaryExampleRuns runs the walk-through without Envoy: `patchbay up --examples
// examples/canary` on free ports (the step interval cut to 2s), with this test playing
// Envoy's part: each request goes to the version the served step share gives it (v1 on
// host a, the canary on host b), with an x-request-id, and one in five of v1's is mirrored
// to the canary with Envoy's "-shadow" host (a version route has no mirror to its own
// version). The healthy canary v2 is promoted through every step to 100 %; swapping in v3
// (a drifting model, no errors) fails a model-aware gate and rolls back to 100 % v1.
func TestCanaryExampleRuns(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and starts the patchbay binary")
	}
	bin := buildPatchbay(t)
	hostHTTP := []string{freeAddr(t), freeAddr(t)}
	hostAdmin := []string{freeAddr(t), freeAddr(t)}
	xdsAdmin := freeAddr(t)
	src, err := os.ReadFile(filepath.Join(canaryExample, "rollouts", "churn.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	moved := strings.NewReplacer("127.0.0.1:9001", hostHTTP[0], "127.0.0.1:9002", hostHTTP[1],
		"127.0.0.1:9021", hostAdmin[0], "127.0.0.1:9022", hostAdmin[1], "interval: 20s", "interval: 2s").Replace(string(src))
	if !strings.Contains(moved, "interval: 2s") {
		t.Fatal("churn.yaml has no 20s interval to shorten")
	}
	rollouts := t.TempDir()
	file := filepath.Join(rollouts, "churn.yaml")
	if err := os.WriteFile(file, []byte(moved), 0o600); err != nil {
		t.Fatal(err)
	}
	args := []string{
		"--examples", canaryExample, "--rollouts", rollouts, "--bin", bin, "--envoy", "off",
		"--modelhost-http", strings.Join(hostHTTP, ","), "--modelhost-grpc", freeAddr(t) + "," + freeAddr(t),
		"--modelhost-admin", strings.Join(hostAdmin, ","),
		"--xds-listen", freeAddr(t), "--xds-admin", xdsAdmin,
		"--extproc-listen", freeAddr(t), "--extproc-admin", freeAddr(t),
		"--edge-listener", freeAddr(t), "--sidecar-listener", freeAddr(t),
		"--ready-timeout", "60s", "--stop-grace", "5s", "--log-level", "warn",
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	var stdout, stderr harness.Buffer
	done := make(chan error, 1)
	go func() { done <- runUp(ctx, args, &stdout, &stderr) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("up did not return within 30s of cancel")
		}
		if t.Failed() {
			t.Logf("up stdout:\n%s\nup stderr:\n%s", stdout.String(), stderr.String())
		}
	})
	for deadline := time.Now().Add(90 * time.Second); !strings.Contains(stdout.String(), "patchbay is up."); {
		select {
		case err := <-done:
			t.Fatalf("up returned before it was up: %v", err)
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("up did not come up within 90s")
		}
	}

	client := &http.Client{Timeout: 5 * time.Second}
	type gate struct {
		Gate   string  `json:"gate"`
		Value  float64 `json:"value"`
		Pass   bool    `json:"pass"`
		NoData string  `json:"no_data"`
	}
	type churnStatus struct {
		Traffic  map[string]int `json:"traffic"`
		Rollback *struct {
			Reason string `json:"reason"`
		} `json:"rollback"`
		Analysis *struct {
			Phase  string `json:"phase"`
			Canary string `json:"canary"`
			Step   int    `json:"step"`
			Share  int    `json:"share"`
			Reason string `json:"reason"`
			Why    string `json:"decision_reason"`
			Gates  []gate `json:"gates"`
		} `json:"analysis"`
	}
	status := func() churnStatus {
		t.Helper()
		resp, err := client.Get("http://" + xdsAdmin + "/status")
		if err != nil {
			t.Fatalf("/status: %v", err)
		}
		defer resp.Body.Close()
		var st struct {
			Models []struct {
				Name string `json:"name"`
				churnStatus
			} `json:"models"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
			t.Fatalf("/status: %v", err)
		}
		for _, m := range st.Models {
			if m.Name == "churn" {
				return m.churnStatus
			}
		}
		t.Fatal("/status has no churn")
		return churnStatus{}
	}
	infer := func(host, version, hostHeader, id string, x [4]int) {
		t.Helper()
		body := fmt.Sprintf(`{"inputs":[{"name":"features","datatype":"FP32","shape":[1,4],"data":[%d,%d,%d,%d]}]}`, x[0], x[1], x[2], x[3])
		req, _ := http.NewRequest(http.MethodPost, "http://"+host+"/v2/models/churn/versions/"+version+"/infer", strings.NewReader(body))
		req.Header.Set("x-request-id", id)
		if hostHeader != "" {
			req.Host = hostHeader
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("infer churn %s: %v", version, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("infer churn %s: %s", version, resp.Status)
		}
	}
	rng := rand.New(rand.NewPCG(14, 14))
	// drive sends requests as Envoy would route them until the analysis's phase is want
	// (bounded: at most 150000 requests), and returns the last status.
	sent := 0
	drive := func(canary, want string) churnStatus {
		t.Helper()
		var st churnStatus
		for n := 0; n < 150000; n++ {
			if n%100 == 0 {
				st = status()
				if st.Analysis != nil && st.Analysis.Canary == canary && st.Analysis.Phase == want {
					return st
				}
			}
			share := 0
			if st.Analysis != nil && st.Analysis.Canary == canary && st.Rollback == nil {
				share = st.Analysis.Share
			}
			x := [4]int{rng.IntN(41) - 20, rng.IntN(41) - 20, rng.IntN(41) - 20, rng.IntN(41) - 20} // the README's load
			id := fmt.Sprintf("canary-test-%d", sent)
			sent++
			if rng.IntN(100) < share {
				infer(hostHTTP[1], canary, "", id, x)
				continue // a version route has no mirror to its own version (xds/translate mirrors)
			}
			infer(hostHTTP[0], "v1", "", id, x)
			if rng.IntN(5) == 0 { // Envoy's mirror: Host gets "-shadow"
				infer(hostHTTP[1], canary, "churn-shadow", id, x)
			}
		}
		t.Fatalf("churn analysis of %s did not reach %q within 150000 requests: %+v", canary, want, st.Analysis)
		return st
	}

	st := drive("v2", "succeeded")
	t.Logf("v2: %+v", *st.Analysis)
	if st.Analysis.Step != 4 || st.Analysis.Share != 100 || st.Rollback != nil {
		t.Errorf("v2 succeeded at step %d share %d (rollback %v), want step 4 at 100 %% and no rollback", st.Analysis.Step, st.Analysis.Share, st.Rollback)
	}
	for _, g := range st.Analysis.Gates {
		if !g.Pass || g.NoData != "" {
			t.Errorf("v2 gate %+v: want passing with data", g)
		}
	}

	// The walk-through's failure: swap in the drifting v3.
	if err := os.WriteFile(file, []byte(swapCanary(t, moved)), 0o600); err != nil {
		t.Fatal(err)
	}
	st = drive("v3", "failed")
	t.Logf("v3: %+v", *st.Analysis)
	if st.Rollback == nil || !strings.Contains(st.Rollback.Reason, "analysis:") {
		t.Errorf("v3 failed without the analysis's rollback in force: %+v", st.Rollback)
	}
	failed := ""
	for _, g := range st.Analysis.Gates {
		if !g.Pass && g.NoData == "" {
			failed += g.Gate + " "
			if !strings.HasPrefix(g.Gate, "drift-") && !strings.HasPrefix(g.Gate, "shadow-") {
				t.Errorf("v3 failed gate %+v: want only the model-aware gates (drift, shadow) to fail", g)
			}
		}
	}
	if failed == "" || !strings.Contains(st.Analysis.Reason, "analysis: ") {
		t.Errorf("v3 failed with no failed gate shown (%q), reason %q", failed, st.Analysis.Reason)
	}
}
