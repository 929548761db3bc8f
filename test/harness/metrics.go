package harness

import (
	"bufio"
	"net/http"
	"strconv"
	"strings"
	"testing"
)

// MetricSum adds up the samples of the Prometheus metric name (a counter, or a
// histogram's name_sum or name_count) at url whose lines contain every filter (e.g.
// `version="v8"`).
func MetricSum(t testing.TB, url, name string, filters ...string) float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
next:
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		for _, f := range filters {
			if !strings.Contains(line, f) {
				continue next
			}
		}
		v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		if err == nil {
			sum += v
		}
	}
	return sum
}
