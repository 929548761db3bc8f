package main

import (
	"bytes"
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

// TestRollbackCLIErrorsNameTheNextStep runs the rollback command against a real control
// plane: with no token it says to pass --token-file or set PATCHBAY_ADMIN_TOKEN; with a wrong
// one, which one was refused; with no earlier split, the --version command line to use.
func TestRollbackCLIErrorsNameTheNextStep(t *testing.T) {
	dir := t.TempDir()
	doc := "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: ranker\nversions:\n" +
		"  - name: v7\n    endpoints: [\"127.0.0.1:9001\"]\n  - name: v8\n    endpoints: [\"127.0.0.1:9002\"]\n" +
		"traffic: {v7: 100, v8: 0}\n"
	if err := os.WriteFile(filepath.Join(dir, "ranker.yaml"), []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	const token = "a-token-of-at-least-thirty-two-bytes-for-the-cli-test"
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
				break
			}
		}
		if i == 500 {
			t.Fatalf("control plane not ready after 5s: %+v", srv.Status())
		}
		time.Sleep(10 * time.Millisecond)
	}
	run := func(args ...string) string {
		t.Helper()
		err := rollback(context.Background(), append([]string{"ranker", "--admin", admin}, args...), &bytes.Buffer{}, &bytes.Buffer{})
		if err == nil {
			t.Fatalf("rollback %v succeeded, want an error", args)
		}
		return err.Error()
	}
	t.Setenv("PATCHBAY_ADMIN_TOKEN", "")
	if msg := run(); !strings.Contains(msg, "401") || !strings.Contains(msg, "no token was sent: pass --token-file FILE") ||
		!strings.Contains(msg, "PATCHBAY_ADMIN_TOKEN") {
		t.Errorf("no token: %q", msg)
	}
	t.Setenv("PATCHBAY_ADMIN_TOKEN", "wrong")
	if msg := run(); !strings.Contains(msg, "401") || !strings.Contains(msg, "the token from PATCHBAY_ADMIN_TOKEN was refused") {
		t.Errorf("wrong token from the environment: %q", msg)
	}
	bad := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(bad, []byte("wrong\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if msg := run("--token-file", bad); !strings.Contains(msg, "the token from --token-file "+bad+" was refused") {
		t.Errorf("wrong token from a file: %q", msg)
	}
	t.Setenv("PATCHBAY_ADMIN_TOKEN", token)
	msg := run()
	if !strings.Contains(msg, "409") || !strings.Contains(msg, "patchbay rollout rollback ranker --version v7") || strings.Contains(msg, `{"error"`) {
		t.Errorf("no earlier split: %q, want 409 with the --version command line and no raw JSON", msg)
	}
}
