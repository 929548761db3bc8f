package xds

import (
	"context"
	"math"
	"net/http"
	"regexp"
	"strconv"
	"testing"
)

// TestHistogramBucketsMatchUnits scrapes a started control plane's /metrics and checks every
// xds histogram's bucket bounds against its unit: a _seconds histogram must resolve half a
// millisecond (a small config applies in well under 5 ms) and end within a minute, and the
// observed mean lies inside the bounds, not below all of them (a milliseconds scale fails).
func TestHistogramBucketsMatchUnits(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "r.yaml", rolloutDoc("r", map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002"}, "{v1: 100, v2: 0}", ""))
	c := startCP(t, dir)
	writeFile(t, dir, "r.yaml", rolloutDoc("r", map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002"}, "{v1: 50, v2: 50}", ""))
	c.srv.Reload(context.Background(), "test")
	_, body := httpDo(t, http.MethodGet, "http://"+c.adminAddr+"/metrics", "", "")

	bucketRe := regexp.MustCompile(`(?m)^(patchbay_xds_\w+)_bucket\{[^}]*le="([^"]+)"[^}]*\} \S+$`)
	bounds := map[string][]float64{}
	for _, m := range bucketRe.FindAllStringSubmatch(body, -1) {
		if m[2] == "+Inf" {
			continue
		}
		v, err := strconv.ParseFloat(m[2], 64)
		if err != nil {
			t.Fatalf("le %q: %v", m[2], err)
		}
		bounds[m[1]] = append(bounds[m[1]], v)
	}
	if len(bounds["patchbay_xds_apply_seconds"]) == 0 {
		t.Fatalf("no patchbay_xds_apply_seconds buckets on /metrics:\n%s", body)
	}
	for name, bs := range bounds {
		lo, hi := math.Inf(1), 0.0
		for _, b := range bs {
			if b > 0 {
				lo = math.Min(lo, b)
			}
			hi = math.Max(hi, b)
		}
		if regexp.MustCompile(`_seconds$`).MatchString(name) {
			if lo > 0.001 || hi > 60 || hi < 1 {
				t.Errorf("%s: bounds %v are not in seconds (want the smallest <= 1ms, the largest within 1s..60s)", name, bs)
			}
		}
		sum := scrapeValue(t, body, name+"_sum")
		count := scrapeValue(t, body, name+"_count")
		if count == 0 {
			t.Errorf("%s: nothing observed", name)
			continue
		}
		if mean := sum / count; mean > hi {
			t.Errorf("%s: mean observation %g is above every bound %v", name, mean, bs)
		}
	}
}

func scrapeValue(t *testing.T, body, series string) float64 {
	t.Helper()
	m := regexp.MustCompile(`(?m)^` + series + `(?:\{[^}]*\})? (\S+)$`).FindStringSubmatch(body)
	if m == nil {
		t.Fatalf("%s not on /metrics", series)
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}
