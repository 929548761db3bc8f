package xds

import (
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

// TestReloadThatRemovesEveryModelIsRefused: an empty directory (a half-synced ConfigMap,
// a wrong mount) keeps the last good config, with the error on /status, in the log and in
// a metric; --allow-empty lets it through.
func TestReloadThatRemovesEveryModelIsRefused(t *testing.T) {
	eps := map[string]string{"v1": "127.0.0.1:9001"}
	t.Run("refused", func(t *testing.T) {
		dir := t.TempDir()
		writeFile(t, dir, "a.yaml", rolloutDoc("a", eps, "{v1: 100}", ""))
		c := startCP(t, dir)
		before := c.srv.Version()
		if err := os.Remove(filepath.Join(dir, "a.yaml")); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 5*time.Second, "the empty reload refused", func() bool { return c.srv.Status().CurrentError != nil })
		st := c.srv.Status()
		if st.ConfigVersion != before || len(st.Models) != 1 || !strings.Contains(st.CurrentError.Message, "refusing to remove every model") {
			t.Fatalf("after emptying the directory: version %s (was %s), models %d, error %+v", st.ConfigVersion, before, len(st.Models), st.CurrentError)
		}
		_, body := httpDo(t, http.MethodGet, "http://"+c.adminAddr+"/metrics", "", "")
		if !strings.Contains(body, "patchbay_xds_empty_reloads_refused_total 1") {
			t.Fatalf("no metric for the refused empty reload:\n%s", body)
		}
		if !strings.Contains(c.logs.String(), "refusing to remove every model") {
			t.Fatal("the refusal is not logged")
		}
	})
	t.Run("allowed with AllowEmpty", func(t *testing.T) {
		dir := t.TempDir()
		writeFile(t, dir, "a.yaml", rolloutDoc("a", eps, "{v1: 100}", ""))
		c := startCPWith(t, dir, func(cfg *Config) { cfg.AllowEmpty = true })
		before := c.srv.Version()
		if err := os.Remove(filepath.Join(dir, "a.yaml")); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 5*time.Second, "the empty config applied", func() bool { return c.srv.Version() != before })
		if st := c.srv.Status(); len(st.Models) != 0 || st.CurrentError != nil {
			t.Fatalf("with AllowEmpty: %+v", st)
		}
	})
}

// TestHalfWrittenFileIsNeverServed rewrites a file in place in three non-atomic writes with
// pauses (each half is a state the watcher sees through real fsnotify events; the first is
// even a valid config that drops model b). No half-written state is ever served on the ADS
// stream, no parse error of the still-changing file is reported, and the finished file is
// applied.
func TestHalfWrittenFileIsNeverServed(t *testing.T) {
	dir := t.TempDir()
	eps := map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002"}
	docA := func(traffic string) string { return rolloutDoc("a", eps, traffic, "") }
	docB := rolloutDoc("b", eps, "{v1: 100, v2: 0}", "")
	path := filepath.Join(dir, "models.yaml")
	if err := os.WriteFile(path, []byte(docA("{v1: 100, v2: 0}")+"---\n"+docB), 0o644); err != nil {
		t.Fatal(err)
	}
	// The pauses between writes (100ms) are far below the settle interval (1s).
	c := startCPWith(t, dir, func(cfg *Config) { cfg.Settle = time.Second })
	s := adsStream(t, c)
	n := envoyNode("edge")
	var (
		mu   sync.Mutex
		seen [][]string // cluster names of every CDS response
	)
	if err := s.Send(&discoveryv3.DiscoveryRequest{Node: n, TypeUrl: resource.ClusterType}); err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			r, err := s.Recv()
			if err != nil {
				return
			}
			var names []string
			for _, a := range r.GetResources() {
				cl := &clusterv3.Cluster{}
				if a.UnmarshalTo(cl) == nil {
					names = append(names, cl.GetName())
				}
			}
			mu.Lock()
			seen = append(seen, names)
			mu.Unlock()
			_ = s.Send(&discoveryv3.DiscoveryRequest{Node: n, TypeUrl: resource.ClusterType, VersionInfo: r.GetVersionInfo(), ResponseNonce: r.GetNonce()})
		}
	}()
	waitFor(t, 5*time.Second, "first CDS response", func() bool { mu.Lock(); defer mu.Unlock(); return len(seen) > 0 })

	full := docA("{v1: 50, v2: 50}") + "---\n" + docB
	cut1 := len(docA("{v1: 50, v2: 50}") + "---\n") // a valid file holding model a only
	cut2 := cut1 + len(docB)/2                      // model b cut mid-document
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	for _, part := range []string{full[:cut1], full[cut1:cut2], full[cut2:]} {
		if _, err := f.WriteString(part); err != nil {
			t.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the finished file applied", func() bool {
		st := c.srv.Status()
		return len(st.Models) == 2 && st.Models[0].Traffic["v2"] == 50
	})
	mu.Lock()
	defer mu.Unlock()
	for i, names := range seen {
		if !strings.Contains(strings.Join(names, ","), "b_v1") {
			t.Fatalf("CDS response %d served a half-written file: clusters %v", i, names)
		}
	}
	if st := c.srv.Status(); st.CurrentError != nil || st.RejectedConfigs != 0 {
		t.Fatalf("a file still being written was reported as a failure: %+v (%d rejected)", st.CurrentError, st.RejectedConfigs)
	}
}
