package xds

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

func (d *dnsTable) unset(host string) {
	d.mu.Lock()
	delete(d.m, host)
	d.mu.Unlock()
}

// TestUnresolvedNamesAreShownAndNeverGivenAShare: a version with a share whose endpoint
// names do not resolve is refused like any bad config (last good kept, error on /status);
// a name without a share is served but shown unresolved on /status and in the metric; a
// refused config is applied once its name resolves; a name that stops resolving keeps its
// last addresses and is flagged stale.
func TestUnresolvedNamesAreShownAndNeverGivenAShare(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "n.yaml", rolloutDoc("n", map[string]string{"v1": "127.0.0.1:9001"}, "{v1: 100}", ""))
	c := startCP(t, dir)
	good := c.srv.Version()
	metrics := func() string {
		_, body := httpDo(t, http.MethodGet, "http://"+c.adminAddr+"/metrics", "", "")
		return body
	}
	status := func() Status {
		_, body := httpDo(t, http.MethodGet, "http://"+c.adminAddr+"/status", "", "")
		var st Status
		if err := json.Unmarshal([]byte(body), &st); err != nil {
			t.Fatalf("/status: %v\n%s", err, body)
		}
		return st
	}

	// 1. v2 gets half the traffic but its only name does not resolve: refused.
	eps := map[string]string{"v1": "127.0.0.1:9001", "v2": "late.invalid:9002"}
	writeFile(t, dir, "n.yaml", rolloutDoc("n", eps, "{v1: 50, v2: 50}", ""))
	waitFor(t, 5*time.Second, "the refusal", func() bool { return c.srv.Status().CurrentError != nil })
	st := status()
	want := `model "n" version "v2" has 50% of baseline traffic but none of its endpoints resolves: late.invalid:9002 (no such host late.invalid)`
	if st.ConfigVersion != good || !strings.Contains(st.CurrentError.Message, want) {
		t.Fatalf("version %s (good %s), error %+v; want %q", st.ConfigVersion, good, st.CurrentError, want)
	}
	if st.Names["late.invalid"].State != "unresolved" {
		t.Fatalf("/status names: %+v", st.Names)
	}
	if m := metrics(); !strings.Contains(m, `patchbay_xds_unresolved_endpoint_names{host="late.invalid",model="n",state="unresolved",version="v2"} 1`) {
		t.Fatalf("metric lacks the unresolved name:\n%s", m)
	}

	// 2. The name resolves: the refused config is applied without a file edit.
	fakeDNS.set("late.invalid", "10.6.0.2")
	waitFor(t, 5*time.Second, "the config applied once its name resolves", func() bool {
		st := c.srv.Status()
		return st.ConfigVersion != good && len(st.Models) == 1 && st.Models[0].Traffic["v2"] == 50
	})
	if eps := status().Models[0].Endpoints["v2"]; len(eps) != 1 || eps[0].State != "ok" || eps[0].Addresses[0] != "10.6.0.2:9002" {
		t.Fatalf("v2 endpoints on /status: %+v", eps)
	}

	// 3. It stops resolving: last addresses kept, flagged stale.
	fakeDNS.unset("late.invalid")
	waitFor(t, 5*time.Second, "the name flagged stale", func() bool { return c.srv.Status().Names["late.invalid"].State == "stale" })
	snap, _ := c.srv.Served(FlavourGRPC)
	cla := snap.GetResources(resource.EndpointType)["n_v2_grpc"].(*endpointv3.ClusterLoadAssignment)
	if got := cla.GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress().GetAddress(); got != "10.6.0.2" {
		t.Fatalf("stale name served %q, want its last address 10.6.0.2", got)
	}
	if e := status().Models[0].Endpoints["v2"][0]; e.State != "stale" || e.Error == "" {
		t.Fatalf("v2 endpoint on /status: %+v", e)
	}
	if m := metrics(); !strings.Contains(m, `patchbay_xds_unresolved_endpoint_names{host="late.invalid",model="n",state="stale",version="v2"} 1`) {
		t.Fatalf("metric lacks the stale name:\n%s", m)
	}

	// 4. A version with no share may name an unresolvable host: served, and shown.
	eps = map[string]string{"v1": "127.0.0.1:9001", "v2": "never.invalid:9002"}
	before := c.srv.Version()
	writeFile(t, dir, "n.yaml", rolloutDoc("n", eps, "{v1: 100, v2: 0}", ""))
	waitFor(t, 5*time.Second, "the share-less config applied", func() bool { return c.srv.Version() != before })
	if e := status().Models[0].Endpoints["v2"]; len(e) != 1 || e[0].State != "unresolved" || len(e[0].Addresses) != 0 {
		t.Fatalf("v2 endpoints on /status: %+v", e)
	}
	// An arm is a share too.
	before = c.srv.Version()
	writeFile(t, dir, "n.yaml", rolloutDoc("n", eps, "{v1: 100, v2: 0}",
		"experiments: [{name: nx, layer: nl, allocation: 10, arms: [{name: a, version: v2, weight: 1}]}]\n"))
	waitFor(t, 5*time.Second, "the arm refused", func() bool {
		e := c.srv.Status().CurrentError
		return e != nil && strings.Contains(e.Message, `version "v2" has arm nx=a`)
	})
	if c.srv.Version() != before {
		t.Fatal("an arm on an unresolved version was served")
	}
}
