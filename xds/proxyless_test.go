package xds

import (
	"encoding/json"
	"math"
	"net/http"
	"strings"
	"testing"
)

// TestProxylessGRPC runs grpc-go's own xDS client against the real server and walks the
// control plane's promises: split, header pin, rollback by file edit and by the admin
// API, a bad file changing nothing, and a control-plane restart. Every move of the split
// must be followed without a failed RPC (allGoToWithoutErrors): an RPC routed to a cluster
// a snapshot dropped fails or hangs (see TestClustersOutliveTheRoutesThatNamedThem).
func TestProxylessGRPC(t *testing.T) {
	v1, v2 := startBackend(t, "v1"), startBackend(t, "v2")
	eps := map[string]string{"v1": v1.addr, "v2": v2.addr}
	dir := t.TempDir()
	writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", eps, "{v1: 80, v2: 20}", ""))
	// A second model: grpc-go asks for one listener only; it must not wait on the others.
	writeFile(t, dir, "thumbs.yaml", rolloutDoc("thumbs", map[string]string{"v1": v1.addr}, "{v1: 100}", ""))
	c := startCP(t, dir)
	client := xdsClient(t, c, "ranker")

	t.Run("80/20 split over 2000 RPCs", func(t *testing.T) {
		const n = 2000
		got := countCalls(t, client, n)
		share := float64(got["v2"]) / n
		t.Logf("counts %v", got)
		// Binomial sd at p=0.2, n=2000 is 0.0089: allow 4.5 sd.
		if math.Abs(share-0.2) > 0.04 || got["v1"]+got["v2"] != n {
			t.Fatalf("v2 share %.3f (counts %v), want 0.20 +- 0.04", share, got)
		}
	})
	t.Run("header-pinned version", func(t *testing.T) {
		if got := countCalls(t, client, 100, "x-patchbay-version", "v2"); got["v2"] != 100 {
			t.Fatalf("pinned to v2 got %v", got)
		}
	})
	t.Run("rollback by file edit", func(t *testing.T) {
		writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", eps, "{v1: 100, v2: 0}", ""))
		allGoToWithoutErrors(t, client, "v1")
	})
	t.Run("bad file changes nothing", func(t *testing.T) {
		before := c.srv.Version()
		writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", eps, "{v1: 50, v2: 10}", ""))
		waitFor(t, 5e9, "error on /status", func() bool {
			return c.srv.Status().CurrentError != nil
		})
		st := c.srv.Status()
		if st.ConfigVersion != before || !strings.Contains(st.CurrentError.Message, "ranker.yaml:") ||
			!strings.Contains(st.CurrentError.Message, "traffic: weights sum to 60, want 100") {
			t.Fatalf("status after bad file: version %s (was %s), error %+v", st.ConfigVersion, before, st.CurrentError)
		}
		if got := countCalls(t, client, 50); got["v1"] != 50 {
			t.Fatalf("routing changed after a bad file: %v", got)
		}
		code, body := httpDo(t, http.MethodGet, "http://"+c.adminAddr+"/metrics", "", "")
		if code != 200 || !strings.Contains(body, "patchbay_xds_rejected_configs_total 1") {
			t.Fatalf("metrics lack the rejected config: %d\n%s", code, body)
		}
	})
	t.Run("rollback by admin API", func(t *testing.T) {
		writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", eps, "{v1: 0, v2: 100}", ""))
		allGoToWithoutErrors(t, client, "v2")
		url := "http://" + c.adminAddr + "/v1/models/ranker/rollback"
		if code, _ := httpDo(t, http.MethodPost, url, "", ""); code != http.StatusUnauthorized {
			t.Fatalf("rollback without token: %d, want 401", code)
		}
		if code, _ := httpDo(t, http.MethodPost, url, "wrong", ""); code != http.StatusUnauthorized {
			t.Fatalf("rollback with a wrong token: %d, want 401", code)
		}
		code, body := httpDo(t, http.MethodPost, url, testToken, "")
		if code != http.StatusOK {
			t.Fatalf("rollback: %d %s", code, body)
		}
		var res RollbackResult
		if err := json.Unmarshal([]byte(body), &res); err != nil || res.Traffic["v1"] != 100 {
			t.Fatalf("rollback answer %s (%v): want the last known-good split v1=100", body, err)
		}
		allGoToWithoutErrors(t, client, "v1")
		if st := c.srv.Status(); st.Models[0].Rollback == nil {
			t.Fatalf("status does not show the rollback: %+v", st.Models[0])
		}
		// Explicit version; then a file edit releases the hold.
		if code, body := httpDo(t, http.MethodPost, url, testToken, `{"version":"v2"}`); code != 200 {
			t.Fatalf("rollback to v2: %d %s", code, body)
		}
		allGoToWithoutErrors(t, client, "v2")
		writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", eps, "{v1: 100, v2: 0}", "timeout: 3s\n"))
		allGoToWithoutErrors(t, client, "v1")
		if st := c.srv.Status(); st.Models[0].Rollback != nil {
			t.Fatalf("a file change did not release the rollback: %+v", st.Models[0])
		}
		if code, _ := httpDo(t, http.MethodPost, "http://"+c.adminAddr+"/v1/models/nope/rollback", testToken, ""); code != 404 {
			t.Fatalf("unknown model rollback: %d, want 404", code)
		}
	})
	t.Run("control plane restart", func(t *testing.T) {
		c.stop()
		// The data plane keeps its last config while the control plane is away.
		if got := countCalls(t, client, 50); got["v1"] != 50 {
			t.Fatalf("while the control plane is down: %v", got)
		}
		writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", eps, "{v1: 0, v2: 100}", ""))
		c.start()
		allGoToWithoutErrors(t, client, "v2") // resynced to what the files say now
	})
}
