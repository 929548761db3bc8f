package xds

import (
	"strings"
	"testing"
	"time"
)

// allDocuments is the last report's problem of no one document ("" when none).
func (r *reportingSource) allDocuments() string {
	rep, _ := r.last()
	var msgs []string
	for _, p := range rep.problems[AllDocuments] {
		msgs = append(msgs, p.Msg)
	}
	return strings.Join(msgs, "; ")
}

// TestReloadFailureReportedToAllDocuments: a config refused as a whole (a version with a
// share whose name does not resolve) reaches the ProblemReporter under AllDocuments, and
// is cleared by the next report once the name resolves and the config applies (from the
// DNS refresh, which reports too). Before, only a loader's rollout.Error was reported, so
// a Source showed every document as applied while none of the edit was served.
func TestReloadFailureReportedToAllDocuments(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "r.yaml", rolloutDoc("r", map[string]string{"v1": "127.0.0.1:9001"}, "{v1: 100}", ""))
	src := &reportingSource{dirSource: &dirSource{dir: dir, debounce: 5 * time.Millisecond, resync: time.Hour, settle: 10 * time.Millisecond}}
	c := startCPWith(t, dir, func(cfg *Config) { cfg.Source, cfg.DNSRefresh = src, time.Hour })
	waitFor(t, 5*time.Second, "first config", func() bool { return c.srv.Version() != "" })
	good := c.srv.Version()
	if got := src.allDocuments(); got != "" {
		t.Fatalf("a good config reported %q", got)
	}
	t.Cleanup(func() { fakeDNS.unset("report.invalid") })
	writeFile(t, dir, "r.yaml", rolloutDoc("r", map[string]string{"v1": "127.0.0.1:9001", "v2": "report.invalid:9002"}, "{v1: 50, v2: 50}", ""))
	waitFor(t, 5*time.Second, "the refusal reported to every document", func() bool {
		return strings.Contains(src.allDocuments(), `model "r" version "v2" has 50% of baseline traffic but none of its endpoints resolves`)
	})
	if c.srv.Version() != good {
		t.Fatal("a refused config was served")
	}
	fakeDNS.set("report.invalid", "10.8.0.1")
	c.srv.ResolveNow()
	waitFor(t, 5*time.Second, "applied, and the problem cleared in a report", func() bool {
		return c.srv.Version() != good && src.allDocuments() == ""
	})
}
