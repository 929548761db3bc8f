package e2e

import (
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/patchbay-io/patchbay/test/harness"
)

// TestRollbackClosesEveryDoor: with every door to v8 open — its baseline share, an
// experiment arm (ext_proc sets x-patchbay-version), a 100% shadow, pinned version paths —
// a rollback through the admin API to the last known-good split (v7 only) leaves no way to
// v8: split users, experiment users, clients forging x-patchbay-version and clients calling
// v8's pinned path all reach v7 or are refused, and v8's host, counting inference requests
// itself, sees none (shadow copies included).
func TestRollbackClosesEveryDoor(t *testing.T) {
	c := startChain(t, "{v7: 100, v8: 0}", "pinning: true\n")
	doors := experiment + "shadow: [{version: v8, percent: 100}]\npinning: true\n"
	before := c.edge.Version()
	writeRollout(t, c.dir, "ranker.yaml", rankerRollout(c.a.http, c.b.http, "{v7: 50, v8: 50}", doors))
	waitFor(t, 10*time.Second, "50/50 with doors to v8", func() bool { return c.edge.Version() != before })

	v8Served := func() float64 {
		return harness.MetricSum(t, "http://"+c.b.http+"/metrics", "patchbay_modelhost_requests_total", `version="v8"`)
	}
	// Every kind of request, as the rollback's test sends it after.
	barrage := func(t *testing.T, tag string) (statuses map[int]int) {
		statuses = map[int]int{}
		for i := range 60 {
			id := tag + "-" + strconv.Itoa(i)
			for _, hdr := range []map[string]string{
				{"x-user-id": id},                             // the split
				{"x-user-id": id, "x-country": "US"},          // experiment users
				{"x-user-id": id, "x-patchbay-version": "v8"}, // a forged version header
			} {
				r, err := c.infer("/v2/models/ranker/infer", hdr, features)
				if err != nil {
					t.Fatal(err)
				}
				statuses[r.status]++
			}
			r, err := c.infer("/v2/models/ranker/versions/v8/infer", map[string]string{"x-user-id": id}, features)
			if err != nil {
				t.Fatal(err)
			}
			statuses[r.status]++
		}
		return statuses
	}
	// The doors are open: v8 answers pinned calls, its share, its arm and shadows.
	start := v8Served()
	if r, err := c.infer("/v2/models/ranker/versions/v8/infer", map[string]string{"x-user-id": "pin"}, features); err != nil || r.status != 200 || r.version != "v8" {
		t.Fatalf("pinned call to v8 before the rollback: %+v %v", r, err)
	}
	barrage(t, "before")
	waitFor(t, 10*time.Second, "v8 serving before the rollback", func() bool { return v8Served()-start > 60 })

	req, _ := http.NewRequest(http.MethodPost, "http://"+c.xdsAdmin+"/v1/models/ranker/rollback", nil)
	req.Header.Set("Authorization", "Bearer "+adminToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var res struct {
		Traffic map[string]int `json:"traffic"`
		Version string         `json:"config_version"`
	}
	if err := json.Unmarshal(body, &res); err != nil || resp.StatusCode != 200 || res.Traffic["v7"] != 100 {
		t.Fatalf("rollback: %d %s", resp.StatusCode, body)
	}
	waitFor(t, 10*time.Second, "the edge on the rollback's config", func() bool { return c.edge.Version() == res.Version })
	// Shadow copies sent before the rollback may still be on their way: wait (bounded) until
	// v8's count holds still before taking the baseline.
	quiet := func() float64 {
		last := v8Served()
		for range 20 {
			time.Sleep(100 * time.Millisecond)
			n := v8Served()
			if n == last {
				return n
			}
			last = n
		}
		return last
	}
	base := quiet()
	statuses := barrage(t, "after")
	after := quiet()
	if after != base {
		t.Fatalf("v8's host served %v inference requests after the rollback closed every door (statuses %v)", after-base, statuses)
	}
	if statuses[200] != 180 || statuses[404] != 60 {
		t.Fatalf("after the rollback: statuses %v, want 180 answered by v7 and the 60 pinned calls to v8 refused", statuses)
	}
	for _, hdr := range []map[string]string{{"x-user-id": "u", "x-country": "US"}, {"x-user-id": "u", "x-patchbay-version": "v8"}} {
		if r := c.mustUser(t, "check", flatten(hdr)...); r.version != "v7" || strings.Contains(r.experiments, "ranker-ltv") {
			t.Fatalf("after the rollback %v was served by %s (experiments %q)", hdr, r.version, r.experiments)
		}
	}
}

func flatten(m map[string]string) []string {
	var out []string
	for k, v := range m {
		if k != "x-user-id" {
			out = append(out, k, v)
		}
	}
	return out
}
