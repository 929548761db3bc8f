package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/test/harness"
)

// adminHost is a model host with its admin listener and repository token.
type adminHost struct {
	*host
	admin, token string
}

func startAdminHost(t testing.TB, name string, models ...string) *adminHost {
	t.Helper()
	h := &adminHost{host: &host{http: freeAddr(t), grpc: freeAddr(t)}, admin: freeAddr(t), token: adminToken}
	tokenFile := filepath.Join(t.TempDir(), "host-token")
	if err := os.WriteFile(tokenFile, []byte(h.token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	h.proc = startProc(t, name, "http://"+h.http+"/v2/health/ready",
		"modelhost", "--repository", repoWith(t, models...), "--http", h.http, "--grpc", h.grpc,
		"--admin", h.admin, "--admin-token-file", tokenFile, "--log-level", "warn")
	return h
}

// repository calls the host's repository API (load or unload) with the token.
func (h *adminHost) repository(t testing.TB, model, verb string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, "http://"+h.admin+"/v2/repository/models/"+model+"/"+verb, nil)
	req.Header.Set("Authorization", "Bearer "+h.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("%s %s: %d %s", verb, model, resp.StatusCode, b)
	}
}

// bothRollout serves ranker v7 on a and v8 on b, each over REST and gRPC.
func bothRollout(a, b *adminHost, traffic, extra string) string {
	return fmt.Sprintf(`apiVersion: patchbay.io/v1
kind: Rollout
model: ranker
versions:
  - {name: v7, endpoints: [%q], grpcEndpoints: [%q]}
  - {name: v8, endpoints: [%q], grpcEndpoints: [%q]}
traffic: %s
retries: 2
%s`, a.http, a.grpc, b.http, b.grpc, traffic, extra)
}

// bothChain is the chain with hosts serving both protocols, the edge model serving REST and
// gRPC (h2c) on one listener.
type bothChain struct {
	*chain
	a, b *adminHost
	grpc oip.GRPCInferenceServiceClient
}

func startBothChain(t *testing.T, traffic, extra string) *bothChain {
	t.Helper()
	c := &bothChain{chain: &chain{t: t, dir: t.TempDir()}}
	c.a = startAdminHost(t, "host-a", "ranker/v7")
	c.b = startAdminHost(t, "host-b", "ranker/v8")
	writeRollout(t, c.dir, "ranker.yaml", bothRollout(c.a, c.b, traffic, extra))
	lis := c.startRouting(t)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c.grpc = oip.NewGRPCInferenceServiceClient(conn)
	return c
}

type grpcResult struct {
	version  string
	servedBy []string
	err      error
}

// grpcUser calls ModelInfer through the edge as user id (extra: metadata pairs).
func (c *bothChain) grpcUser(id string, extra ...string) grpcResult {
	md := append([]string{"x-patchbay-model", "ranker", "x-user-id", id}, extra...)
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), md...), 10*time.Second)
	defer cancel()
	var hdr metadata.MD
	r, err := c.grpc.ModelInfer(ctx, &oip.ModelInferRequest{ModelName: "ranker", Inputs: []*oip.ModelInferRequest_InferInputTensor{{
		Name: "features", Datatype: "FP32", Shape: []int64{1, 8},
		Contents: &oip.InferTensorContents{Fp32Contents: []float32{0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8}}}}}, grpc.Header(&hdr))
	return grpcResult{version: r.GetModelVersion(), servedBy: hdr.Get("x-patchbay-served-by"), err: err}
}

func (c *bothChain) mustGRPC(t *testing.T, id string, extra ...string) string {
	t.Helper()
	r := c.grpcUser(id, extra...)
	if r.err != nil {
		t.Fatalf("gRPC user %s: %v", id, r.err)
	}
	for _, s := range r.servedBy {
		if s != "ranker/"+r.version {
			t.Fatalf("gRPC user %s: served-by %q but the host ran %q", id, r.servedBy, r.version)
		}
	}
	return r.version
}

// TestChainBothProtocols: one model served over REST and gRPC through the same split, with
// per-version clusters per protocol: every request reaches a server of its protocol, a user
// gets the same version over both (the bucket and the slot map are shared), experiment arms,
// pins (REST), shadows (per protocol) and a rollback apply to both.
func TestChainBothProtocols(t *testing.T) {
	c := startBothChain(t, "{v7: 50, v8: 50}", experiment+"shadow: [{version: v8, percent: 50}]\npinning: true\n")

	t.Run("split: same version over REST and gRPC", func(t *testing.T) {
		counts := map[string]int{}
		for i := 0; i < 200; i++ {
			id := "both-" + strconv.Itoa(i)
			rest := c.mustUser(t, id, "x-country", "FR")
			g := c.mustGRPC(t, id, "x-country", "FR")
			if rest.version != g {
				t.Fatalf("user %s: REST %s, gRPC %s", id, rest.version, g)
			}
			counts[g]++
		}
		if counts["v7"] < 60 || counts["v8"] < 60 {
			t.Fatalf("50/50 split over 200 users gave %v", counts)
		}
	})

	t.Run("experiment arms over both protocols", func(t *testing.T) {
		exposed := 0
		for i := 0; i < 300; i++ {
			id := "arm-" + strconv.Itoa(i)
			rest := c.mustUser(t, id, "x-country", "US")
			if rest.experiments == "" {
				continue
			}
			exposed++
			want := map[string]string{"ranker-ltv=control": "v7", "ranker-ltv=treatment": "v8"}[rest.experiments]
			if rest.version != want {
				t.Fatalf("REST arm %q ran %s", rest.experiments, rest.version)
			}
			if g := c.mustGRPC(t, id, "x-country", "US"); g != want {
				t.Fatalf("gRPC arm %q ran %s", rest.experiments, g)
			}
		}
		if exposed == 0 {
			t.Fatal("nobody exposed")
		}
	})

	t.Run("pinned REST path", func(t *testing.T) {
		for _, v := range []string{"v7", "v8"} {
			r, err := c.infer("/v2/models/ranker/versions/"+v+"/infer", map[string]string{"x-user-id": "pin"}, features)
			if err != nil || r.status != 200 || r.version != v || r.servedBy != "ranker/"+v {
				t.Fatalf("pin %s: %+v %v", v, r, err)
			}
		}
	})

	t.Run("shadows per protocol", func(t *testing.T) {
		metrics := "http://" + c.b.http + "/metrics"
		for _, proto := range []string{"rest", "grpc"} {
			before := harness.MetricSum(t, metrics, "patchbay_modelhost_requests_total", `version="v8"`, `protocol="`+proto+`"`)
			served := 0
			for i := 0; i < 100; i++ {
				id := "shadow-" + proto + strconv.Itoa(i)
				var v string
				if proto == "rest" {
					v = c.mustUser(t, id, "x-country", "FR").version
				} else {
					v = c.mustGRPC(t, id, "x-country", "FR")
				}
				if v == "v8" {
					served++
				}
			}
			// v7 answers about half; about half of all requests are mirrored to v8.
			waitFor(t, 5*time.Second, proto+" shadow copies on v8", func() bool {
				got := harness.MetricSum(t, metrics, "patchbay_modelhost_requests_total", `version="v8"`, `protocol="`+proto+`"`) - before
				return got-float64(served) >= 20
			})
		}
	})

	t.Run("experiment arms are shadowed over both protocols", func(t *testing.T) {
		// Every US user in the experiment: each request takes a version route (the arm's
		// version in x-patchbay-version). The hosts are patchbay model hosts (the default
		// host kind), so those routes keep the unversioned path and their mirrors: the
		// control arm's (v7) requests are mirrored to v8.
		writeRollout(t, c.dir, "ranker.yaml", bothRollout(c.a, c.b, "{v7: 50, v8: 50}",
			strings.Replace(experiment, "allocation: 30", "allocation: 100", 1)+"shadow: [{version: v8, percent: 50}]\npinning: true\n"))
		waitFor(t, 10*time.Second, "every US user in an arm", func() bool {
			for i := 0; i < 20; i++ {
				if r, err := c.user("all-"+strconv.Itoa(i), "x-country", "US"); err != nil || r.experiments == "" {
					return false
				}
			}
			return true
		})
		metrics := "http://" + c.b.http + "/metrics"
		for _, proto := range []string{"rest", "grpc"} {
			before := harness.MetricSum(t, metrics, "patchbay_modelhost_requests_total", `version="v8"`, `protocol="`+proto+`"`)
			served := 0
			for i := 0; i < 200; i++ {
				id := "armshadow-" + proto + strconv.Itoa(i)
				var v string
				if proto == "rest" {
					r := c.mustUser(t, id, "x-country", "US")
					if r.experiments == "" {
						t.Fatalf("user %s not in an arm", id)
					}
					v = r.version
				} else {
					v = c.mustGRPC(t, id, "x-country", "US")
				}
				if v == "v8" {
					served++
				}
			}
			// The control arm (about half) is mirrored to v8 half the time: about 50 copies.
			waitFor(t, 5*time.Second, proto+" shadow copies of arm requests on v8", func() bool {
				got := harness.MetricSum(t, metrics, "patchbay_modelhost_requests_total", `version="v8"`, `protocol="`+proto+`"`) - before
				return got-float64(served) >= 20
			})
		}
	})

	t.Run("rollback moves both protocols", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodPost, "http://"+c.xdsAdmin+"/v1/models/ranker/rollback", strings.NewReader(`{"version":"v7"}`))
		req.Header.Set("Authorization", "Bearer "+adminToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("rollback: %v %v", resp, err)
		}
		resp.Body.Close()
		waitFor(t, 10*time.Second, "every user on v7 over both protocols", func() bool {
			for i := 0; i < 40; i++ {
				id := "rb-" + strconv.Itoa(i)
				if c.mustUser(t, id, "x-country", "US").version != "v7" || c.mustGRPC(t, id, "x-country", "US") != "v7" {
					return false
				}
			}
			return true
		})
	})
}

// TestChainUnloadedVersionFailsHealthChecks: a version unloaded from its host through the admin
// repository API (with the token) fails its clusters' health checks within a bounded wait —
// the gRPC cluster's check names the version (oip.HealthService, answered NOT_SERVING by the
// host), the REST cluster's checks the version's readiness path — while the other version's
// stay healthy; and it leaves the split: Envoy picks a weighted cluster by weight alone
// (source/common/router/config_impl.cc, pickWeightedCluster), so the control plane's own
// version prober (--version-health-interval, default 2s) lends v8's slots to v7 in the next
// snapshot. REST and gRPC requests stop reaching v8 within a bounded wait and keep being
// answered by v7; once v8 is loaded again, the same users are back on v8 (the persisted
// slot map never changed). See xds/README.md, "Version health".
func TestChainUnloadedVersionFailsHealthChecks(t *testing.T) {
	c := startBothChain(t, "{v7: 50, v8: 50}", "")
	before := map[string]string{} // user -> version, the same over both protocols
	for i := 0; i < 40; i++ {     // both versions answer over both protocols, and the clusters carry traffic
		id := "user-" + strconv.Itoa(i)
		before[id] = c.mustUser(t, id).version
		if g := c.mustGRPC(t, id); g != before[id] {
			t.Fatalf("user %s: REST %s, gRPC %s", id, before[id], g)
		}
	}
	onV8 := 0
	for _, v := range before {
		if v == "v8" {
			onV8++
		}
	}
	if onV8 == 0 || onV8 == len(before) {
		t.Fatalf("a 50/50 split put %d of %d users on v8", onV8, len(before))
	}
	healthy := func(cluster, addr string) bool { return c.edge.HostHealthy(cluster, addr) }
	waitFor(t, 10*time.Second, "every host healthy", func() bool {
		return healthy("ranker_v7_grpc", c.a.grpc) && healthy("ranker_v8_grpc", c.b.grpc) && healthy("ranker_v7", c.a.http) && healthy("ranker_v8", c.b.http)
	})
	c.b.repository(t, "ranker", "unload")
	// Bounded: an answered failure marks the host unhealthy at the next check; the
	// rollout's checks run every 2 s on clusters that carry traffic.
	waitFor(t, 15*time.Second, "v8's gRPC and REST hosts to fail their health checks", func() bool {
		c.grpcUser("tick")
		c.user("tick")
		return !healthy("ranker_v8_grpc", c.b.grpc) && !healthy("ranker_v8", c.b.http)
	})
	if !healthy("ranker_v7_grpc", c.a.grpc) || !healthy("ranker_v7", c.a.http) {
		t.Fatal("v7's hosts failed their health checks too: the check is not per version")
	}
	// Bounded: two failed probes 2 s apart, then a push.
	waitFor(t, 20*time.Second, "every user answered by v7 over REST and gRPC", func() bool {
		for id := range before {
			if r, err := c.user(id); err != nil || r.status != 200 || r.version != "v7" {
				return false
			}
			if g := c.grpcUser(id); g.err != nil || g.version != "v7" {
				return false
			}
		}
		return true
	})
	for id := range before { // and it holds: nobody reaches v8, every request succeeds
		if v := c.mustUser(t, id).version; v != "v7" {
			t.Fatalf("user %s on %s with v8 unloaded", id, v)
		}
		if v := c.mustGRPC(t, id); v != "v7" {
			t.Fatalf("gRPC user %s on %s with v8 unloaded", id, v)
		}
	}
	c.b.repository(t, "ranker", "load")
	waitFor(t, 20*time.Second, "every user back on their version over REST and gRPC", func() bool {
		for id, want := range before {
			if r, err := c.user(id); err != nil || r.status != 200 || r.version != want {
				return false
			}
			if g := c.grpcUser(id); g.err != nil || g.version != want {
				return false
			}
		}
		return true
	})
}
