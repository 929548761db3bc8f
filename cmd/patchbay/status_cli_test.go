package main

import (
	"context"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rs/zerolog"

	"github.com/patchbay-io/patchbay/xds"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// startAdmin runs a real control plane on a rollout directory holding doc and returns its
// admin URL once it is ready.
func startAdmin(t *testing.T, doc, token string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "ranker.yaml"), []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	srv, err := xds.New(xds.Config{RolloutsDir: dir, AdminToken: token, Logger: zerolog.Nop(),
		Translate:  translate.Options{EdgeAddress: "127.0.0.1:10000", SidecarAddress: "127.0.0.1:15001"},
		LookupHost: func(context.Context, string) ([]string, error) { return nil, nil }})
	if err != nil {
		t.Fatal(err)
	}
	gl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	al, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx, gl, al) }()
	t.Cleanup(func() { cancel(); <-done })
	admin := "http://" + al.Addr().String()
	for i := 0; ; i++ {
		resp, err := http.Get(admin + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return admin
			}
		}
		if i == 500 {
			t.Fatalf("control plane not ready after 5s: %+v", srv.Status())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestRolloutStatusFromAdmin: `rollout status` reads a real control plane's /status: the
// split and state of one model or all, the rollback once one is in force, and an unknown
// model is an error.
func TestRolloutStatusFromAdmin(t *testing.T) {
	const token = "a-token-of-at-least-thirty-two-bytes-for-the-cli-test"
	admin := startAdmin(t, "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: ranker\nversions:\n"+
		"  - name: v7\n    endpoints: [\"127.0.0.1:9001\"]\n  - name: v8\n    endpoints: [\"127.0.0.1:9002\"]\n"+
		"traffic: {v7: 90, v8: 10}\n", token)
	for _, args := range [][]string{{"rollout", "status", "ranker", "--admin", admin}, {"rollout", "status", "--admin", admin}} {
		out, errOut, code := runCLI(args...)
		if code != 0 || !strings.Contains(out, "model ranker") || !strings.Contains(out, "split:     v7=90,v8=10") ||
			!strings.Contains(out, "state:     Serving") || !strings.Contains(out, "rollback:  none") {
			t.Fatalf("%q: exit %d, stderr %q, stdout:\n%s", args, code, errOut, out)
		}
	}
	t.Setenv("PATCHBAY_ADMIN_TOKEN", token)
	if _, errOut, code := runCLI("rollout", "rollback", "ranker", "--admin", admin, "--version", "v7"); code != 0 {
		t.Fatalf("rollback: exit %d: %s", code, errOut)
	}
	out, errOut, code := runCLI("rollout", "status", "ranker", "--admin", admin)
	if code != 0 || !strings.Contains(out, "split:     v7=100\n") || !strings.Contains(out, "state:     RolledBack") ||
		!strings.Contains(out, "rollback:  all traffic to v7") {
		t.Fatalf("after the rollback: exit %d, stderr %q, stdout:\n%s", code, errOut, out)
	}
	if _, errOut, code := runCLI("rollout", "status", "nope", "--admin", admin); code != 1 || !strings.Contains(errOut, `serves no model "nope"`) {
		t.Errorf("unknown model: exit %d, stderr %q", code, errOut)
	}
}

// TestRolloutKubeFlagsExcludeAdminFlags: the Kubernetes API and the admin API are two
// ways to the same control plane; naming both is a usage error, as is --wait alone.
func TestRolloutKubeFlagsExcludeAdminFlags(t *testing.T) {
	for _, args := range [][]string{
		{"rollout", "rollback", "ranker", "--namespace", "ml", "--admin", "http://127.0.0.1:1"},
		{"rollout", "rollback", "ranker", "--kubeconfig", "/nonexistent", "--token-file", "/x"},
		{"rollout", "rollback", "ranker", "--wait", "1s"},
		{"rollout", "rollback", "ranker", "--namespace", "ml", "--version", "v7", "--release"},
		{"rollout", "status", "--namespace", "ml", "--admin", "http://127.0.0.1:1"},
		{"rollout", "status", "a", "b"},
		{"rollout", "status", "Bad_Name", "--namespace", "ml"},
	} {
		if _, errOut, code := runCLI(args...); code != 2 {
			t.Errorf("%q: exit %d, want 2 (usage): %s", args, code, errOut)
		}
	}
}

// TestRolloutStatusShowsTheAnalysis: `rollout status MODEL` prints a running analysis —
// phase, canary, baseline, step and share, the reason it waits and each gate's value,
// threshold and verdict — from a real control plane scraping a real /metrics.
func TestRolloutStatusShowsTheAnalysis(t *testing.T) {
	reg := prometheus.NewRegistry()
	reqs := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "patchbay_modelhost_requests_total"}, []string{"model", "version", "protocol"})
	reg.MustRegister(reqs)
	reqs.WithLabelValues("ranker", "v7", "http").Add(3)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ms := &http.Server{Handler: promhttp.HandlerFor(reg, promhttp.HandlerOpts{})}
	go ms.Serve(lis)
	t.Cleanup(func() { ms.Close() })
	m := lis.Addr().String()
	admin := startAdmin(t, "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: ranker\nversions:\n"+
		"  - {name: v7, endpoints: [\"127.0.0.1:9001\"], metricsEndpoints: [\""+m+"\"]}\n"+
		"  - {name: v8, endpoints: [\"127.0.0.1:9002\"], metricsEndpoints: [\""+m+"\"]}\n"+
		"traffic: {v7: 100}\nanalysis:\n  baseline: v7\n  canary: v8\n  steps: [5, 100]\n  interval: 200ms\n  minRequests: 10\n"+
		"  gates:\n    - {metric: error-rate, max: 0.01}\n    - {metric: latency, percentile: 99, max: 250ms}\n", "")
	var out string
	for i := 0; ; i++ {
		var code int
		out, _, code = runCLI("rollout", "status", "ranker", "--admin", admin)
		if code == 0 && strings.Contains(out, "gate error-rate") {
			break
		}
		if i == 500 {
			t.Fatalf("no analysis with gates in rollout status after 5s:\n%s", out)
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, want := range []string{
		"split:     v7=95,v8=5",
		"analysis:  waiting, canary v8 vs baseline v7, step 1 of 2 (5%)",
		"reason:   minRequests: canary 0, baseline 0 of 10",
		"decision: wait minRequests",
		"gate error-rate             0          threshold 0.01     pass",
		"gate latency-p99            0          threshold 0.25     no data: no observations in the window",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("rollout status lacks %q:\n%s", want, out)
		}
	}
}
