package modelhost_test

import (
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/patchbay-io/patchbay/modelhost"
)

// BenchmarkFeatureAssembly compares, in the same run, a REST request whose client sends
// the input itself with the same request whose input the host assembles from features
// via a real redis-server (cache off) and from the local cache, at 1 and 64 concurrent
// clients, for a version without batching ("request": one HMGET per request) and one with
// dynamic batching ("batch": max_delay 500us; a lookup goes out at once when none is in
// flight, those arriving meanwhile share the next pipelined round trip). Each side is measured twice in ABBA order. Metrics:
// client-us/req, redis-us/req, cached-us/req (wall time per request over all clients);
// ratio-redis = client/redis and ratio-cached = client/cached (1 = assembly is free,
// 0.5 = half the throughput); redis-trips/req = Redis round trips per request.
//
//	go test -run '^$' -bench FeatureAssembly -benchtime 500x ./modelhost/
func BenchmarkFeatureAssembly(b *testing.B) {
	rs := startRedis(b, "")
	if _, err := rs.do("HSET", "patchbay:features:u1", "ctr", "0.8", "spend", "1.5"); err != nil {
		b.Fatal(err)
	}
	repo := featureRepo(b)
	d := filepath.Join(repo, "scorer", "b2")
	writeFile(b, filepath.Join(d, "model.yaml"), fmt.Sprintf(featureYAML, "")+"batching: {max_batch_size: 64, max_delay: 500us}\n")
	writeFile(b, filepath.Join(d, "linear.json"), `{"link": "logistic", "weights": [0.5, 0.01, 2, 0.3], "bias": -0.2}`)
	nocache := startHost(b, repo, func(c *modelhost.Config) { c.FeatureStore = rs.addr; c.FeatureCacheTTL = -1 })
	cached := startHost(b, repo, func(c *modelhost.Config) { c.FeatureStore = rs.addr; c.FeatureCacheTTL = time.Minute })
	tr := &http.Transport{MaxIdleConnsPerHost: 64}
	b.Cleanup(tr.CloseIdleConnections)
	client := &http.Client{Transport: tr}
	const sent = `{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,12,0.8,1.5]}]}`
	const empty = `{"inputs":[]}`
	send := func(h *host, ver, body string) error {
		req, _ := http.NewRequest("POST", h.url+"/v2/models/scorer/versions/"+ver+"/infer", strings.NewReader(body))
		req.Header.Set("x-country", "de")
		req.Header.Set("x-user-id", "u1")
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return nil
	}
	// measure sends n requests from c clients and returns the time per request.
	measure := func(b *testing.B, c, n int, h *host, ver, body string) time.Duration {
		var wg sync.WaitGroup
		var mu sync.Mutex
		var firstErr error
		start := time.Now()
		for w := range c {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; i < n; i += c {
					if err := send(h, ver, body); err != nil {
						mu.Lock()
						firstErr = err
						mu.Unlock()
						return
					}
				}
			}()
		}
		wg.Wait()
		if firstErr != nil {
			b.Fatal(firstErr)
		}
		return time.Since(start) / time.Duration(n)
	}
	for _, mode := range []struct{ name, ver string }{{"request", "v1"}, {"batch", "b2"}} {
		for _, c := range []int{1, 64} {
			b.Run(fmt.Sprintf("%s/clients=%d", mode.name, c), func(b *testing.B) {
				n := max(b.N, c)
				measure(b, c, min(n, 200), nocache, mode.ver, sent) // warm connections
				measure(b, c, min(n, 200), cached, mode.ver, sent)
				trips := func() float64 {
					return metricSum(b, nocache, "patchbay_modelhost_feature_store_round_trips_total", `version="`+mode.ver+`"`)
				}
				var client, redis, cache time.Duration
				var tripCount float64
				fromRedis := func() {
					t0 := trips()
					redis += measure(b, c, n, nocache, mode.ver, empty)
					tripCount += trips() - t0
				}
				// ABBA order so background load hits every side alike.
				for _, round := range [2]bool{false, true} {
					if !round {
						client += measure(b, c, n, nocache, mode.ver, sent)
						fromRedis()
						cache += measure(b, c, n, cached, mode.ver, empty)
					} else {
						cache += measure(b, c, n, cached, mode.ver, empty)
						fromRedis()
						client += measure(b, c, n, nocache, mode.ver, sent)
					}
				}
				b.ReportMetric(float64(client.Microseconds())/2, "client-us/req")
				b.ReportMetric(float64(redis.Microseconds())/2, "redis-us/req")
				b.ReportMetric(float64(cache.Microseconds())/2, "cached-us/req")
				b.ReportMetric(float64(client)/float64(redis), "ratio-redis")
				b.ReportMetric(float64(client)/float64(cache), "ratio-cached")
				b.ReportMetric(tripCount/float64(2*n), "redis-trips/req")
				b.Logf("%s, %d clients: client sends features %v/req, host assembles via Redis %v/req (ratio %.2f, %.2f round trips/req), from the local cache %v/req (ratio %.2f)",
					mode.name, c, client/2, redis/2, float64(client)/float64(redis), tripCount/float64(2*n), cache/2, float64(client)/float64(cache))
			})
		}
	}
}
