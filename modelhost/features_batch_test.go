package modelhost_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/patchbay-io/patchbay/modelhost"
)

// info answers INFO <section> in full (a RESP bulk string).
func (r *redisServer) info(t testing.TB, section string) string {
	t.Helper()
	c, err := net.DialTimeout("tcp", r.addr, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := fmt.Fprintf(c, "*2\r\n$4\r\nINFO\r\n$%d\r\n%s\r\n", len(section), section); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	head, err := br.ReadString('\n')
	if err != nil || !strings.HasPrefix(head, "$") {
		t.Fatalf("INFO %s: %q %v", section, head, err)
	}
	n, _ := strconv.Atoi(strings.TrimSpace(head[1:]))
	body := make([]byte, n)
	if _, err := io.ReadFull(br, body); err != nil {
		t.Fatal(err)
	}
	return string(body)
}

var hmgetCallsRE = regexp.MustCompile(`cmdstat_hmget:calls=(\d+)`)

// hmgetCalls is Redis's own count of HMGET commands since the last CONFIG RESETSTAT.
func (r *redisServer) hmgetCalls(t testing.TB) int {
	m := hmgetCallsRE.FindStringSubmatch(r.info(t, "commandstats"))
	if m == nil {
		return 0
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// metricSum adds the samples of a metric whose labels contain every one of labels.
func metricSum(t testing.TB, h *host, name string, labels ...string) float64 {
	t.Helper()
	resp, err := http.Get(h.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	total := 0.0
next:
	for sc.Scan() {
		l := sc.Text()
		if !strings.HasPrefix(l, name+"{") {
			continue
		}
		for _, lb := range labels {
			if !strings.Contains(l, lb) {
				continue next
			}
		}
		f := strings.Fields(l)
		x, _ := strconv.ParseFloat(f[len(f)-1], 64)
		total += x
	}
	return total
}

// TestFeaturesPipelinedPerBatch: on a version with dynamic batching, concurrent requests'
// store lookups share pipelined round trips (at most half as many as requests) (counted by the host's round-trip metric and
// by Redis's own HMGET count, duplicates fetched once), and every prediction still equals
// the reference computed with that request's stored values. Without batching (v1) each
// request is one HMGET.
func TestFeaturesPipelinedPerBatch(t *testing.T) {
	rs := startRedis(t, "")
	const entities, perEntity = 12, 4
	for e := range entities {
		if _, err := rs.do("HSET", fmt.Sprintf("patchbay:features:u%d", e), "ctr", fmt.Sprint(float64(e)/10), "spend", fmt.Sprint(e)); err != nil {
			t.Fatal(err)
		}
	}
	// Cache off: every request is a lookup. A generous timeout: the test counts round
	// trips, it does not time them.
	// b3: batches of at most 4 with a long window: a gathering goes out when 4 joined or
	// when the pipeline in flight returns, whichever comes first.
	repo := featureRepo(t)
	writeFile(t, filepath.Join(repo, "scorer", "b3", "model.yaml"), fmt.Sprintf(featureYAML, "")+"batching: {max_batch_size: 4, max_delay: 1s}\n")
	writeFile(t, filepath.Join(repo, "scorer", "b3", "linear.json"), `{"link": "logistic", "weights": [0.5, 0.01, 2, 0.3], "bias": -0.2}`)
	h := startHost(t, repo, func(c *modelhost.Config) {
		c.FeatureStore, c.FeatureCacheTTL, c.FeatureTimeout = rs.addr, -1, 2*time.Second
	})
	for _, ver := range []string{"b1", "v1", "b3"} {
		if _, err := rs.do("CONFIG", "RESETSTAT"); err != nil {
			t.Fatal(err)
		}
		trips0 := metricSum(t, h, "patchbay_modelhost_feature_store_round_trips_total", `version="`+ver+`"`)
		n := entities * perEntity
		errs := make([]string, n)
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				e := i % entities
				p, hour, msg := predictREST(t, h, ver, map[string]string{"x-country": "de", "x-user-id": fmt.Sprintf("u%d", e)})
				if msg != "" {
					errs[i] = msg
					return
				}
				x := [4]float64{1, float64(hour), float64(float32(float64(e) / 10)), float64(e)}
				want := reference(x)
				x[1] = float64((hour + 1) % 24)
				if !near(p, want) && !near(p, reference(x)) {
					errs[i] = fmt.Sprintf("u%d: prediction %v, want %v (its stored ctr=%v spend=%d)", e, p, want, float64(e)/10, e)
				}
			}()
		}
		close(start)
		wg.Wait()
		for _, e := range errs {
			if e != "" {
				t.Errorf("%s: %s", ver, e)
			}
		}
		trips := metricSum(t, h, "patchbay_modelhost_feature_store_round_trips_total", `version="`+ver+`"`) - trips0
		calls := rs.hmgetCalls(t)
		t.Logf("%s: %d concurrent requests over %d entities: %v round trips, %d HMGETs", ver, n, entities, trips, calls)
		switch ver {
		case "v1":
			if trips != float64(n) || calls != n {
				t.Errorf("v1 (no batching): %v round trips, %d HMGETs, want %d each", trips, calls, n)
			}
			continue
		case "b3":
			if trips < float64(n/4) || trips >= float64(n) {
				t.Errorf("b3: %v round trips for %d concurrent requests, want %d..%d (at most 4 lookups each)", trips, n, n/4, n-1)
			}
			continue
		}
		// A lookup that finds nothing in flight goes out alone; the others gather behind it.
		if trips < 1 || trips > float64(n/2) {
			t.Errorf("b1: %v round trips for %d concurrent requests, want 1..%d (pipelined per batch)", trips, n, n/2)
		}
		if calls >= n || float64(calls) < trips {
			t.Errorf("b1: Redis counted %d HMGETs for %d requests over %d entities in %v round trips, want fewer than %d (each entity once per pipeline)", calls, n, entities, trips, n)
		}
	}
}

// TestFeatureCachePerVersion: two versions that read the same entity's hash with
// different store features (here in another order) each get their own fields, also when
// the other version's answer for that entity is cached.
func TestFeatureCachePerVersion(t *testing.T) {
	rs := startRedis(t, "")
	if _, err := rs.do("HSET", "patchbay:features:u1", "ctr", "0.8", "spend", "1.5"); err != nil {
		t.Fatal(err)
	}
	repo := featureRepo(t)
	writeFile(t, filepath.Join(repo, "scorer", "v3", "model.yaml"), `runtime: linear
artifact: linear.json
inputs:  [{name: x, datatype: FP32, shape: [-1, 4]}]
outputs: [{name: p, datatype: FP32, shape: [-1]}]
features:
  - {name: spend, input: x, column: 3, source: store, entity: x-user-id, default: -1}
  - {name: country, input: x, column: 0, source: header, header: x-country, map: {de: 1, fr: 2}, default: 0}
  - {name: hour, input: x, column: 1, source: hour}
  - {name: ctr, input: x, column: 2, source: store, entity: x-user-id, default: 0.25}
`)
	writeFile(t, filepath.Join(repo, "scorer", "v3", "linear.json"), `{"link": "logistic", "weights": [0.5, 0.01, 2, 0.3], "bias": -0.2}`)
	h := startHost(t, repo, func(c *modelhost.Config) { c.FeatureStore, c.FeatureCacheTTL = rs.addr, time.Minute })
	for _, ver := range []string{"v1", "v3", "v1", "v3"} {
		p, hour, e := predictREST(t, h, ver, map[string]string{"x-country": "de", "x-user-id": "u1"})
		if e != "" {
			t.Fatalf("%s: %s", ver, e)
		}
		if want := reference([4]float64{1, float64(hour), 0.8, 1.5}); !near(p, want) && !near(p, reference([4]float64{1, float64((hour + 1) % 24), 0.8, 1.5})) {
			t.Fatalf("%s: prediction %v, want %v (ctr=0.8 spend=1.5)", ver, p, want)
		}
	}
	if n := rs.hmgetCalls(t); n != 2 {
		t.Errorf("%d HMGETs for two versions' first requests (then cached), want 2", n)
	}
}
