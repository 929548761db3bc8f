package e2e

import (
	"fmt"
	"net/http"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// loadRound sends requests from workers for d and returns the latencies of the successes
// and the count of failures.
func loadRound(workers int, d time.Duration, do func(i int) error) (lat []time.Duration, failed int) {
	var (
		mu  sync.Mutex
		wg  sync.WaitGroup
		end = time.Now().Add(d)
	)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			var mine []time.Duration
			bad := 0
			for i := 0; time.Now().Before(end) && i < 1_000_000; i++ {
				t0 := time.Now()
				if err := do(w*1_000_000 + i); err != nil {
					bad++
					continue
				}
				mine = append(mine, time.Since(t0))
			}
			mu.Lock()
			lat, failed = append(lat, mine...), failed+bad
			mu.Unlock()
		}(w)
	}
	wg.Wait()
	return lat, failed
}

func pct(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[int(q*float64(len(s)-1))]
}

func postInfer(url string, hdr map[string]string) error {
	req, _ := http.NewRequest(http.MethodPost, url, strings.NewReader(features))
	req.Header.Set("Content-Type", "application/json")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var buf [512]byte
	for {
		if _, err := resp.Body.Read(buf[:]); err != nil {
			break
		}
	}
	if resp.StatusCode != 200 {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	return nil
}

// BenchmarkChainVsDirect: the same REST inference sent straight to a model host (the
// baseline) and through the chain (test model of Envoy + real ext_proc + the same host),
// in alternating rounds of the same length and concurrency. It prints the latency the
// chain adds (p50/p99) and the throughput it keeps. The proxy here is the test model of
// Envoy, not Envoy: the figure is patchbay's own cost (an ext_proc round trip per request,
// header work) plus a Go reverse proxy's; a real Envoy forwards faster than the model.
func BenchmarkChainVsDirect(b *testing.B) {
	c := startChain(b, "{v7: 100, v8: 0}", "")
	const workers, rounds, round = 8, 6, 750 * time.Millisecond
	direct := "http://" + c.a.http + "/v2/models/ranker/infer"
	chain := c.edgeURL + "/v2/models/ranker/infer"
	var dl, cl []time.Duration
	var dn, cn float64
	b.ResetTimer()
	for n := 0; n < b.N; n++ {
		for r := 0; r < rounds; r++ {
			order := []bool{r%2 == 0, r%2 != 0}
			for _, viaChain := range order {
				url := direct
				if viaChain {
					url = chain
				}
				lat, failed := loadRound(workers, round, func(i int) error {
					return postInfer(url, map[string]string{"x-user-id": fmt.Sprintf("u%d", i%1000)})
				})
				if failed > 0 {
					b.Fatalf("%d requests failed (chain=%v)", failed, viaChain)
				}
				if viaChain {
					cl, cn = append(cl, lat...), cn+float64(len(lat))
				} else {
					dl, dn = append(dl, lat...), dn+float64(len(lat))
				}
			}
		}
	}
	b.StopTimer()
	secs := float64(b.N*rounds) * round.Seconds()
	b.Logf("direct: %.0f req/s p50 %v p99 %v | chain: %.0f req/s p50 %v p99 %v", dn/secs, pct(dl, .5), pct(dl, .99), cn/secs, pct(cl, .5), pct(cl, .99))
	b.ReportMetric(dn/secs, "direct-req/s")
	b.ReportMetric(cn/secs, "chain-req/s")
	b.ReportMetric((cn/secs)/(dn/secs), "throughput-kept-ratio")
	b.ReportMetric(float64(pct(cl, .5)-pct(dl, .5))/1e3, "added-p50-us")
	b.ReportMetric(float64(pct(cl, .99)-pct(dl, .99))/1e3, "added-p99-us")
}

// BenchmarkEditToTrafficMoved: time from a rollout file edit to the first request through
// the chain served by the new version, over 50 edits, next to one request's p50 (the
// probe's resolution) measured in the same run.
func BenchmarkEditToTrafficMoved(b *testing.B) {
	c := startChain(b, "{v7: 100, v8: 0}", "")
	var lat, req []time.Duration
	b.ResetTimer()
	for n := 0; n < b.N; n++ {
		for i := 0; i < 50; i++ {
			want, traffic := "v8", "{v7: 0, v8: 100}"
			if i%2 == 1 {
				want, traffic = "v7", "{v7: 100, v8: 0}"
			}
			start := time.Now()
			writeRollout(b, c.dir, "ranker.yaml", rankerRollout(c.a.http, c.b.http, traffic, ""))
			for {
				t0 := time.Now()
				r, err := c.user("edit")
				req = append(req, time.Since(t0))
				if err == nil && r.version == want {
					break
				}
				if time.Since(start) > 10*time.Second {
					b.Fatalf("edit %d: traffic did not move within 10s", i)
				}
			}
			lat = append(lat, time.Since(start))
		}
	}
	b.StopTimer()
	b.Logf("edit -> traffic moved: p50 %v p99 %v (one request p50 %v)", pct(lat, .5), pct(lat, .99), pct(req, .5))
	b.ReportMetric(float64(pct(lat, .5).Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(pct(lat, .99).Microseconds())/1000, "p99-ms")
	b.ReportMetric(float64(pct(req, .5).Microseconds())/1000, "request-p50-ms")
}
