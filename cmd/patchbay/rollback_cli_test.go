package main

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
)

// TestRollbackCLIChecksAndEscapesModelNames: a name that is not a model name never becomes
// part of a URL (it could otherwise name another path, "a/../../x"); a good one is sent
// escaped, to the model's rollback path.
func TestRollbackCLIChecksAndEscapesModelNames(t *testing.T) {
	var (
		mu    sync.Mutex
		paths []string
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		paths = append(paths, r.URL.EscapedPath())
		mu.Unlock()
		w.Write([]byte("{}"))
	}))
	defer srv.Close()
	t.Setenv("PATCHBAY_ADMIN_TOKEN", "x")
	for _, bad := range []string{"a/../../x", "A", "m?x=1", "m%2F"} {
		err := rollback(context.Background(), []string{bad, "--admin", srv.URL}, &bytes.Buffer{}, &bytes.Buffer{})
		if !errors.Is(err, errUsage) {
			t.Errorf("model %q: %v, want a usage error", bad, err)
		}
	}
	if err := rollback(context.Background(), []string{"ranker-2", "--admin", srv.URL}, &bytes.Buffer{}, &bytes.Buffer{}); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(paths) != 1 || paths[0] != "/v1/models/ranker-2/rollback" {
		t.Fatalf("requests %v, want only /v1/models/ranker-2/rollback", paths)
	}
}
