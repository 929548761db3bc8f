package extproc

import (
	"context"
	"flag"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"

	"github.com/patchbay-io/patchbay/api/headers"
	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
	"github.com/patchbay-io/patchbay/internal/telemetry"
)

var updateGolden = flag.Bool("update", false, "rewrite testdata/metrics_*.txt from the current code")

// TestMetricsScrape serves the process's real /metrics (telemetry.NewMetrics, the admin
// listener over HTTP) and scrapes it before and after a fixed set of requests over real
// ext_proc streams, including a policy swap and a refused policy. Both scrapes must equal
// the golden files, which were written by the code that recorded every decision with
// synchronous OpenTelemetry counters (go test -run TestMetricsScrape -update): every
// metric name, HELP text, type, label set and value stays as it was when the counters
// moved off the decision path. Histogram bucket counts and sums depend on timing and
// are masked; the sample count is kept.
func TestMetricsScrape(t *testing.T) {
	m, err := telemetry.NewMetrics(telemetry.Service("patchbay-extproc"))
	if err != nil {
		t.Fatal(err)
	}
	h := startServer(t, Config{Meter: m.Meter("patchbay/extproc")}, testPolicy("c1"))
	lis := newLocalListener(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = h.srv.ServeAdmin(ctx, lis, m.Handler) }()
	t.Cleanup(func() { cancel(); <-done })
	scrape := func() string {
		t.Helper()
		resp, err := http.Get("http://" + lis.Addr().String() + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return normalizeScrape(string(b))
	}
	golden(t, "metrics_before.txt", scrape())

	treated := userIn(t, func(id string) bool {
		return slot("L1", id) < 2000 && policyv1.Hash("ltv", id)%100 >= 30 && slot("L2", id) >= 5000
	})
	colored := userIn(t, func(id string) bool { return slot("L1", id) >= 2000 && slot("L2", id) < 5000 })
	nobody := userIn(t, func(id string) bool { return slot("L1", id) >= 2000 && slot("L2", id) >= 5000 })
	send := func(n int, msgs ...*extprocv3.ProcessingRequest) {
		t.Helper()
		for range n {
			if _, err := h.exchange(t, msgs...); err != nil {
				t.Fatal(err)
			}
		}
	}
	ranker := func(kv ...string) *extprocv3.ProcessingRequest {
		return reqHeaders(false, append([]string{":path", "/v2/models/ranker/infer"}, kv...)...)
	}
	thumbs := func(mode filterv3.ProcessingMode_BodySendMode, kv ...string) *extprocv3.ProcessingRequest {
		r := reqHeaders(false, append([]string{":path", "/v2/models/thumbs/infer"}, kv...)...)
		r.ProtocolConfig = &extprocv3.ProtocolConfiguration{RequestBodyMode: mode}
		return r
	}
	round := func() {
		send(3, ranker(headers.UserID, treated))
		send(2, ranker(headers.UserID, colored))
		send(2, ranker(headers.UserID, nobody))
		send(4, ranker())
		send(1, reqHeaders(true, ":path", "/v2/models/nope/infer"))
		send(1, reqHeaders(true, ":path", "/v2/models/ranker/versions/v8/infer", headers.UserID, "u"))
		send(2, reqHeaders(true, ":path", "/v2/models/thumbs/versions/v2/infer", headers.UserID, "u"))
		send(1, reqHeaders(true, ":path", "/v2/models/thumbs/versions/v9/infer", headers.UserID, "u"))
		send(1, reqHeaders(true, ":path", "/v2/models/thumbs/infer", headers.Model, "ranker"))
		send(1, reqHeaders(true, ":path", "/other", headers.Bucket, "1"))
		send(2, thumbs(filterv3.ProcessingMode_NONE), bodyMsg(`{"parameters":{"x-user-id":"u5"}}`, true))
		send(1, thumbs(filterv3.ProcessingMode_BUFFERED), bodyMsg(`{"parameters":{}}`, true))
		unusable := thumbs(filterv3.ProcessingMode_STREAMED)
		unusable.ProtocolConfig.SendBodyWithoutWaitingForHeaderResponse = true
		send(1, unusable)
	}
	round()
	// A new policy keeps the counts of the series it shares with the old one.
	if err := h.srv.SetPolicy(testPolicy("c2")); err != nil {
		t.Fatal(err)
	}
	if err := h.srv.SetPolicy(&policyv1.Policy{ConfigVersion: "bad", Models: []*policyv1.Model{{Name: ""}}}); err == nil {
		t.Fatal("an invalid policy was accepted")
	}
	round()
	golden(t, "metrics_after.txt", scrape())
}

var (
	histValue = regexp.MustCompile(`^(patchbay_extproc_decision_duration_seconds_(?:bucket\{[^}]*\}|sum)) .*$`)
	// The OpenTelemetry SDK's version, in target_info.
	sdkVersion = regexp.MustCompile(`telemetry_sdk_version="[^"]*"`)
)

// normalizeScrape masks what depends on timing or on the SDK's version.
func normalizeScrape(text string) string {
	var out []string
	for _, line := range strings.Split(strings.TrimSpace(text), "\n") {
		// The Go runtime's and the process's gauges (internal/telemetry registers them for
		// every binary) change from run to run: they are not this server's metrics.
		name := strings.TrimPrefix(strings.TrimPrefix(line, "# HELP "), "# TYPE ")
		if strings.HasPrefix(name, "go_") || strings.HasPrefix(name, "process_") {
			continue
		}
		line = histValue.ReplaceAllString(line, "$1 (masked)")
		line = sdkVersion.ReplaceAllString(line, `telemetry_sdk_version="(masked)"`)
		out = append(out, line)
	}
	return strings.Join(out, "\n") + "\n"
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *updateGolden {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if got != string(want) {
		t.Errorf("/metrics differs from %s:\n--- got\n%s\n--- want\n%s", path, got, want)
	}
}
