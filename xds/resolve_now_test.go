package xds

import (
	"slices"
	"testing"
	"time"
)

// TestResolveNowAppliesAtOnce: with the DNS refresh an hour away, ResolveNow re-resolves
// the endpoint names and serves their new addresses (what an EndpointSlice change triggers
// in Kubernetes mode; failed before: there was no way to re-resolve before the refresh).
func TestResolveNowAppliesAtOnce(t *testing.T) {
	fakeDNS.set("now.invalid", "10.7.0.1", "10.7.0.2")
	t.Cleanup(func() { fakeDNS.unset("now.invalid") })
	dir := t.TempDir()
	writeFile(t, dir, "r.yaml", rolloutDoc("r", map[string]string{"v1": "now.invalid:9001"}, "{v1: 100}", ""))
	c := startCPWith(t, dir, func(cfg *Config) { cfg.DNSRefresh = time.Hour })
	addrs := func() []string {
		st := c.srv.Status()
		if len(st.Models) == 0 || len(st.Models[0].Endpoints["v1"]) == 0 {
			return nil
		}
		return st.Models[0].Endpoints["v1"][0].Addresses
	}
	waitFor(t, 5*time.Second, "both addresses served", func() bool {
		return slices.Equal(addrs(), []string{"10.7.0.1:9001", "10.7.0.2:9001"})
	})
	before := c.srv.Version()
	fakeDNS.set("now.invalid", "10.7.0.1")
	c.srv.ResolveNow()
	waitFor(t, 5*time.Second, "the address left the served endpoints", func() bool {
		return slices.Equal(addrs(), []string{"10.7.0.1:9001"}) && c.srv.Version() != before
	})
}
