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
