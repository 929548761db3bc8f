package xds

import (
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestAdminTokenRules: "Bearer" in any case; the token file is re-read when it changes (the
// old token stops working, the new one works, a file rotated to a too-short token fails
// closed); a token shorter than 32 bytes is refused at start; model names are checked.
func TestAdminTokenRules(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "m.yaml", rolloutDoc("m", map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002"}, "{v1: 50, v2: 50}", ""))
	tokenFile := filepath.Join(t.TempDir(), "token")
	tokA := strings.Repeat("a", 40)
	tokB := strings.Repeat("b", 32)
	if err := os.WriteFile(tokenFile, []byte(tokA+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c := startCPWith(t, dir, func(cfg *Config) { cfg.AdminToken, cfg.AdminTokenFile = "", tokenFile })
	url := "http://" + c.adminAddr + "/v1/models/m/rollback"
	post := func(auth string) int {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, url, strings.NewReader(`{"version":"v1"}`))
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for _, auth := range []string{"Bearer " + tokA, "bearer " + tokA, "BEARER " + tokA} {
		if code := post(auth); code != http.StatusOK {
			t.Fatalf("%q: %d, want 200", auth[:7], code)
		}
	}
	for _, auth := range []string{"", "Bearer " + tokA[:39], "Basic " + tokA, tokA} {
		if code := post(auth); code != http.StatusUnauthorized {
			t.Fatalf("auth %q: %d, want 401", auth, code)
		}
	}
	// Rotation: rename into place, as a Secret update does.
	tmp := tokenFile + ".new"
	if err := os.WriteFile(tmp, []byte(tokB), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, tokenFile); err != nil {
		t.Fatal(err)
	}
	if code := post("Bearer " + tokA); code != http.StatusUnauthorized {
		t.Fatalf("old token after rotation: %d, want 401", code)
	}
	if code := post("Bearer " + tokB); code != http.StatusOK {
		t.Fatalf("new token after rotation: %d, want 200", code)
	}
	if err := os.WriteFile(tokenFile, []byte("short"), 0o600); err != nil {
		t.Fatal(err)
	}
	if code := post("Bearer short"); code != http.StatusServiceUnavailable {
		t.Fatalf("a too-short rotated token: %d, want 503 (fail closed)", code)
	}
	if code := post("Bearer " + tokB); code != http.StatusServiceUnavailable {
		t.Fatalf("the previous token with an unusable file: %d, want 503", code)
	}
	if err := os.WriteFile(tokenFile, []byte(tokB), 0o600); err != nil {
		t.Fatal(err)
	}
	// Names that are not model names never reach the rollback logic.
	for _, m := range []string{"Bad_Name", "a%2Fb", "x%20y", "-m"} {
		code, body := httpDo(t, http.MethodPost, "http://"+c.adminAddr+"/v1/models/"+m+"/rollback", tokB, "")
		if code != http.StatusBadRequest || !strings.Contains(body, "not a model name") {
			t.Errorf("model %q: %d %s, want 400", m, code, body)
		}
	}

	// Too short at start.
	for _, cfg := range []Config{{AdminToken: "short-token"}, {AdminTokenFile: writeTemp(t, "0123456789012345678901234567890")}} {
		cfg.RolloutsDir = dir
		if _, err := New(cfg); err == nil || !strings.Contains(err.Error(), "want at least 32") {
			t.Errorf("New with a short token: %v", err)
		}
	}
}

func writeTemp(t *testing.T, content string) string {
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
