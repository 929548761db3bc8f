package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestRollbackCLIErrorsNameTheNextStep runs the rollback command against a real control
// plane: with no token it says to pass --token-file or set PATCHBAY_ADMIN_TOKEN; with a wrong
// one, which one was refused; with no earlier split, the --version command line to use.
func TestRollbackCLIErrorsNameTheNextStep(t *testing.T) {
	doc := "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: ranker\nversions:\n" +
		"  - name: v7\n    endpoints: [\"127.0.0.1:9001\"]\n  - name: v8\n    endpoints: [\"127.0.0.1:9002\"]\n" +
		"traffic: {v7: 100, v8: 0}\n"
	const token = "a-token-of-at-least-thirty-two-bytes-for-the-cli-test"
	admin := startAdmin(t, doc, token)
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
