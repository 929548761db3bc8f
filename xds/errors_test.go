package xds

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
)

// TestRollbackErrorsNameTheNextStep over real HTTP: a 409 (no earlier split) says how to name
// a version, in the API and on the command line, with the model's versions; a 401 names
// --token-file and PATCHBAY_ADMIN_TOKEN; both are OIP-style {"error": ...} bodies.
func TestRollbackErrorsNameTheNextStep(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "r.yaml", rolloutDoc("r", map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002"}, "{v1: 100, v2: 0}", ""))
	c := startCP(t, dir)
	url := "http://" + c.adminAddr + "/v1/models/r/rollback"
	errorOf := func(body string) string {
		var e struct {
			Error string `json:"error"`
		}
		if err := json.Unmarshal([]byte(body), &e); err != nil || e.Error == "" {
			t.Fatalf("not an {\"error\": ...} body: %q", body)
		}
		return e.Error
	}
	code, body := httpDo(t, http.MethodPost, url, testToken, "{}")
	msg := errorOf(body)
	if code != http.StatusConflict {
		t.Fatalf("rollback with no earlier split: %d %s, want 409", code, body)
	}
	for _, want := range []string{`{"version": "v1"}`, "patchbay rollout rollback r --version v1", "v1, v2"} {
		if !strings.Contains(msg, want) {
			t.Errorf("409 message %q does not say %q", msg, want)
		}
	}
	for _, tok := range []string{"", "wrong-token"} {
		code, body = httpDo(t, http.MethodPost, url, tok, "{}")
		msg = errorOf(body)
		if code != http.StatusUnauthorized || !strings.Contains(msg, "--token-file") || !strings.Contains(msg, "PATCHBAY_ADMIN_TOKEN") ||
			!strings.Contains(msg, "--admin-token-file") {
			t.Errorf("token %q: %d %q, want 401 naming --token-file, PATCHBAY_ADMIN_TOKEN and --admin-token-file", tok, code, msg)
		}
	}
}
