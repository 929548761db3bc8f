package e2e

import (
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/patchbay-io/patchbay/test/oiphost"
)

// oipRollout is rankerRollout with both versions on host kind oip (unmodified OIP servers).
func oipRollout(a, b, traffic, extra string) string {
	return strings.ReplaceAll(rankerRollout(a, b, traffic, extra), "endpoints:", "host: oip, endpoints:")
}

// TestChainUnmodifiedOIPHost: the chain (real control plane and ext_proc, the test model of
// Envoy) in front of stand-ins for an unmodified OIP server (test/oiphost): they honour only
// the versioned path and ignore x-patchbay-version. Every answer must come from the version
// the router chose (Envoy's x-patchbay-served-by). The versions say host: oip, so requests
// routed to them by name reach the versioned path. Baseline-split requests to one server
// holding several versions are not covered: Envoy has no per-weighted-cluster path rewrite,
// so they keep the unversioned path and such a server answers them with its default
// version (xds/rollout/README.md: one version per endpoint for host: oip).
func TestChainUnmodifiedOIPHost(t *testing.T) {
	// One stand-in holds both versions; its default (first) is v8, so an unversioned request
	// routed to v7 would be answered by the wrong version and show.
	shared := oiphost.Start(t, "ranker", "v8", "v7")
	c := startChain(t, "{v7: 50, v8: 50}", "")
	const extra = experiment + "pinning: true\n"
	writeRollout(t, c.dir, "ranker.yaml", oipRollout(shared.HTTP, shared.HTTP, "{v7: 50, v8: 50}", extra))
	waitFor(t, 10*time.Second, "the edge to route to the stand-in", func() bool {
		before := shared.Served("v7")
		r, err := c.infer("/v2/models/ranker/versions/v7/infer", map[string]string{"x-user-id": "probe"}, features)
		return err == nil && r.status == 200 && shared.Served("v7") > before
	})
	check := func(t *testing.T, what string, r inferResult, err error) {
		t.Helper()
		if err != nil || r.status != http.StatusOK {
			t.Fatalf("%s: %+v %v", what, r, err)
		}
		if r.servedBy != "ranker/"+r.version {
			t.Fatalf("%s: routed to %q, answered by %q", what, r.servedBy, r.version)
		}
	}
	t.Run("experiment arms reach the versioned path", func(t *testing.T) {
		seen := map[string]int{}
		for i := 0; i < 300; i++ {
			r, err := c.user("arm-"+strconv.Itoa(i), "x-country", "US")
			if err == nil && r.experiments == "" {
				continue
			}
			check(t, "arm "+r.experiments, r, err)
			seen[r.version]++
		}
		if seen["v7"] == 0 || seen["v8"] == 0 {
			t.Fatalf("arms served %v", seen)
		}
	})
	t.Run("pinned paths", func(t *testing.T) {
		for _, v := range []string{"v7", "v8"} {
			r, err := c.infer("/v2/models/ranker/versions/"+v+"/infer", map[string]string{"x-user-id": "pin"}, features)
			check(t, "pin "+v, r, err)
		}
	})
	t.Run("baseline split, one stand-in per version", func(t *testing.T) {
		h7, h8 := oiphost.Start(t, "ranker", "v7"), oiphost.Start(t, "ranker", "v8")
		writeRollout(t, c.dir, "ranker.yaml", oipRollout(h7.HTTP, h8.HTTP, "{v7: 50, v8: 50}", extra))
		waitFor(t, 10*time.Second, "the edge to route to one stand-in per version", func() bool {
			r, err := c.infer("/v2/models/ranker/versions/v8/infer", map[string]string{"x-user-id": "probe"}, features)
			return err == nil && r.status == 200 && h8.Served("v8") > 0
		})
		seen := map[string]int{}
		for i := 0; i < 200; i++ {
			r, err := c.user("split-"+strconv.Itoa(i), "x-country", "FR")
			check(t, "split user "+strconv.Itoa(i), r, err)
			seen[r.version]++
		}
		if seen["v7"] < 60 || seen["v8"] < 60 {
			t.Fatalf("50/50 split over 200 users gave %v", seen)
		}
	})
	t.Logf("shared stand-in: v7 %d, v8 %d, unversioned %d, carrying x-patchbay-version %d",
		shared.Served("v7"), shared.Served("v8"), shared.Unversioned(), shared.VersionHeaders())
}
