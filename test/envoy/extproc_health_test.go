package envoye2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/patchbay-io/patchbay/envoy"
	"github.com/patchbay-io/patchbay/test/harness"
)

// extprocHealthy reads Envoy's admin /clusters: whether the patchbay_extproc host is
// usable (health_flags "healthy": passing active checks and not ejected).
func extprocHealthy(admin string) (bool, error) {
	resp, err := client.Get("http://" + admin + "/clusters")
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return false, err
	}
	for _, line := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(line, envoy.ClusterExtProc+"::") && strings.Contains(line, "::health_flags::") {
			return strings.HasSuffix(strings.TrimSpace(line), "::health_flags::healthy"), nil
		}
	}
	return false, fmt.Errorf("no %s host in /clusters", envoy.ClusterExtProc)
}

func waitExtprocHealth(t testing.TB, e *harness.Envoy, healthy bool) {
	t.Helper()
	harness.Eventually(t, 20*time.Second, fmt.Sprintf("Envoy to see ext_proc healthy=%v", healthy), func() bool {
		ok, err := extprocHealthy(e.Admin)
		return err == nil && ok == healthy
	})
}

// TestEnvoyValidatesBootstraps: the real Envoy accepts the plaintext bootstraps as
// rendered (`envoy --mode validate`), ext_proc health check and outlier detection included.
func TestEnvoyValidatesBootstraps(t *testing.T) {
	bin := harness.EnvoyBinary(t)
	for _, role := range envoy.Roles {
		t.Run(string(role), func(t *testing.T) {
			b, err := envoy.Render(role, envoy.Params{})
			if err != nil {
				t.Fatal(err)
			}
			if err := envoy.Check(role, b); err != nil { // health check and outlier detection included
				t.Fatal(err)
			}
			js, err := envoy.MarshalJSON(b)
			if err != nil {
				t.Fatal(err)
			}
			config := filepath.Join(t.TempDir(), "envoy.json")
			if err := os.WriteFile(config, js, 0o600); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			if out, err := exec.CommandContext(ctx, bin, "--mode", "validate", "-c", config).CombinedOutput(); err != nil {
				t.Fatalf("envoy --mode validate %s: %v\n%s", role, err, out)
			}
		})
	}
}

// TestEnvoySkipsDeadExtproc: once ext_proc is killed, Envoy marks its host unhealthy or
// ejected, and requests then go on without an ext_proc stream (failure_mode_allow),
// every one succeeding on the baseline split.
func TestEnvoySkipsDeadExtproc(t *testing.T) {
	s := start(t, envoy.Edge, split(100, 0))
	s.ep.Kill()
	harness.Eventually(t, 20*time.Second, "Envoy to take the dead ext_proc out", func() bool {
		if code, _, _ := s.predict("during", nil); code != http.StatusOK {
			t.Fatalf("request failed while ext_proc went away: %d", code)
		}
		ok, err := extprocHealthy(s.proxy.Admin)
		return err == nil && !ok
	})
	for i := range 50 {
		if code, version, _ := s.predict(fmt.Sprintf("user-%d", i), nil); code != http.StatusOK || version != "v7" {
			t.Fatalf("request %d with ext_proc out: %d from %q", i, code, version)
		}
	}
}

// BenchmarkEnvoyExtprocDown: through the real Envoy, the p99 of the same predictions
// with ext_proc healthy and with ext_proc killed (after Envoy took it out), and the
// added p99. Skips without Envoy.
func BenchmarkEnvoyExtprocDown(b *testing.B) {
	for range b.N {
		b.StopTimer()
		s := start(b, envoy.Edge, split(100, 0))
		lat := func(n int) []time.Duration {
			out := make([]time.Duration, 0, n)
			for i := range n {
				t0 := time.Now()
				if code, _, _ := s.predict(fmt.Sprintf("user-%d", i), nil); code != http.StatusOK {
					b.Fatalf("request %d: %d", i, code)
				}
				out = append(out, time.Since(t0))
			}
			slices.Sort(out)
			return out
		}
		lat(50)
		healthy := lat(500)
		s.ep.Kill()
		t0 := time.Now()
		waitExtprocHealth(b, s.proxy, false)
		detect := time.Since(t0)
		down := lat(500)
		p99 := func(d []time.Duration) time.Duration { return d[len(d)*99/100] }
		b.ReportMetric(float64(p99(healthy).Microseconds()), "healthy-p99-µs")
		b.ReportMetric(float64(p99(down).Microseconds()), "down-p99-µs")
		b.ReportMetric(float64((p99(down) - p99(healthy)).Microseconds()), "added-p99-µs")
		b.ReportMetric(float64(p99(down))/float64(p99(healthy)), "down/healthy-p99")
		b.ReportMetric(float64(detect.Milliseconds()), "detect-ms")
	}
}
