package modelhost_test

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"

	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/modelhost"
)

// TestAdminRepositoryNeedsToken: on the admin listener the repository API (REST and gRPC)
// answers only with the bearer token (scheme in any case); health and /metrics need none;
// a rotated token takes over without a restart. On the inference ports the same calls are
// refused whatever the token (TestBadInputREST, TestBadInputGRPC).
func TestAdminRepositoryNeedsToken(t *testing.T) {
	h := startHost(t, testRepo(t), nil)
	auth := func(v string) map[string]string {
		if v == "" {
			return nil
		}
		return map[string]string{"Authorization": v}
	}
	for _, tc := range []struct {
		authz  string
		status int
	}{
		{"", 401},
		{"Bearer wrong-token-wrong-token-wrong-token-wrong", 401},
		{"Basic " + h.token, 401},
		{h.token, 401},
		{"Bearer " + h.token, 200},
		{"bearer " + h.token, 200},
		{"BEARER " + h.token, 200},
	} {
		var body struct{ Error string }
		var out any
		if tc.status != 200 {
			out = &body
		}
		r := h.doURL(t, h.admin, "POST", "/v2/repository/index", "", auth(tc.authz), out)
		if r.StatusCode != tc.status {
			t.Errorf("index with %q: %d %q, want %d", tc.authz, r.StatusCode, body.Error, tc.status)
		}
		if tc.status == 401 && (r.Header.Get("WWW-Authenticate") == "" || body.Error == "") {
			t.Errorf("401 without WWW-Authenticate or OIP error: %v %q", r.Header, body.Error)
		}
	}
	// gRPC on the same port.
	if _, err := h.adminGRPC.RepositoryIndex(context.Background(), &oip.RepositoryIndexRequest{}); statusCode(err) != codes.Unauthenticated {
		t.Errorf("gRPC index without token: %v, want Unauthenticated", err)
	}
	lower := metadata.AppendToOutgoingContext(context.Background(), "authorization", "bearer "+h.token)
	if idx, err := h.adminGRPC.RepositoryIndex(lower, &oip.RepositoryIndexRequest{}); err != nil || len(idx.Models) == 0 {
		t.Errorf("gRPC index with token: %v %v", idx, err)
	}
	if _, err := h.adminGRPC.ModelInfer(h.adminCtx(), &oip.ModelInferRequest{ModelName: "ranker"}); statusCode(err) != codes.Unimplemented {
		t.Errorf("ModelInfer on the admin listener: %v, want Unimplemented", err)
	}
	if r, err := h.adminGRPC.ServerReady(context.Background(), &oip.ServerReadyRequest{}); err != nil || !r.Ready {
		t.Errorf("admin ServerReady: %v %v", r, err)
	}
	for _, p := range []string{"/v2/health/ready", "/v2/health/live", "/metrics"} {
		if r := h.doURL(t, h.admin, "GET", p, "", nil, nil); r.StatusCode != 200 {
			t.Errorf("admin %s: %d", p, r.StatusCode)
		}
	}
	if r := h.doURL(t, h.admin, "POST", "/v2/models/ranker/infer", rankerBody, nil, nil); r.StatusCode != 404 {
		t.Errorf("infer on the admin listener: %d, want 404", r.StatusCode)
	}
	// Rotation: the new token works at once, the old one no longer does.
	newToken := strings.Repeat("r", 40)
	writeFile(t, h.tokenFile, newToken)
	future := time.Now().Add(time.Minute)
	if err := os.Chtimes(h.tokenFile, future, future); err != nil {
		t.Fatal(err)
	}
	if r := h.adminDo(t, "POST", "/v2/repository/index", "", nil); r.StatusCode != 401 {
		t.Errorf("old token after rotation: %d, want 401", r.StatusCode)
	}
	h.token = newToken
	if r := h.adminDo(t, "POST", "/v2/repository/models/ranker/load", "", nil); r.StatusCode != 200 {
		t.Errorf("new token after rotation: %d, want 200", r.StatusCode)
	}
	if _, err := h.adminGRPC.RepositoryModelLoad(h.adminCtx(), &oip.RepositoryModelLoadRequest{ModelName: "ranker"}); err != nil {
		t.Errorf("gRPC load with the new token: %v", err)
	}
	// A token file that becomes unusable refuses everything (fail closed).
	writeFile(t, h.tokenFile, "short")
	later := future.Add(time.Minute)
	if err := os.Chtimes(h.tokenFile, later, later); err != nil {
		t.Fatal(err)
	}
	var body struct{ Error string }
	if r := h.adminDo(t, "POST", "/v2/repository/index", "", &body); r.StatusCode != 503 || !strings.Contains(body.Error, "token file is unusable") {
		t.Errorf("after the token file went bad: %d %q, want 503", r.StatusCode, body.Error)
	}
}

// TestAdminWithoutTokenFile: no --admin-token-file leaves the repository API off, saying so.
func TestAdminWithoutTokenFile(t *testing.T) {
	h := startHost(t, testRepo(t), func(c *modelhost.Config) { c.AdminTokenFile = "" })
	var body struct{ Error string }
	if r := h.adminDo(t, "POST", "/v2/repository/models/ranker/unload", "", &body); r.StatusCode != http.StatusForbidden || !strings.Contains(body.Error, "--admin-token-file") {
		t.Errorf("unload without a token file: %d %q, want 403 naming --admin-token-file", r.StatusCode, body.Error)
	}
	if _, err := h.adminGRPC.RepositoryModelUnload(h.adminCtx(), &oip.RepositoryModelUnloadRequest{ModelName: "ranker"}); statusCode(err) != codes.PermissionDenied {
		t.Errorf("gRPC unload without a token file: %v, want PermissionDenied", err)
	}
	if r := h.do(t, "POST", "/v2/models/ranker/infer", rankerBody, nil, nil); r.StatusCode != 200 {
		t.Errorf("model unloaded anyway: infer %d", r.StatusCode)
	}
}

// TestShortAdminTokenRefusedAtStart: a token under 32 bytes (or a missing file) stops New.
func TestShortAdminTokenRefusedAtStart(t *testing.T) {
	dir := t.TempDir()
	short := filepath.Join(dir, "short")
	writeFile(t, short, strings.Repeat("x", 31)+"\n")
	for _, f := range []string{short, filepath.Join(dir, "missing")} {
		if _, err := modelhost.New(modelhost.Config{Repository: testRepo(t), AdminTokenFile: f}); err == nil {
			t.Errorf("New with admin token file %s: no error", filepath.Base(f))
		}
	}
}
