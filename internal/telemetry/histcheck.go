package telemetry

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// CheckHistogramUnits fails t for each histogram in metricsText (Prometheus text
// exposition, as a /metrics handler serves it) whose bucket bounds do not fit its
// unit; see HistogramUnitProblems. Tests of every part call it on a scrape taken
// after real traffic.
func CheckHistogramUnits(t testing.TB, metricsText string) {
	t.Helper()
	for _, p := range HistogramUnitProblems(metricsText) {
		t.Error(p)
	}
}

// HistogramUnitProblems lists the histograms in metricsText whose buckets do not
// match their unit:
//   - a _seconds histogram whose largest finite bound is over 1000 (millisecond
//     bounds, such as the SDK's default 0…10000, on a seconds metric);
//   - a _seconds histogram with observations that all fall into its first bucket
//     (bounds too coarse for the values, typically milliseconds again) or all
//     above its largest finite bound (values recorded in a smaller unit);
//   - a histogram named for a duration or latency that has no unit suffix.
func HistogramUnitProblems(metricsText string) []string {
	type series struct {
		bounds []float64 // finite le values, ascending
		counts []float64 // cumulative counts by bound
		total  float64   // the +Inf bucket
	}
	histograms := map[string]bool{}
	all := map[string]map[string]*series{} // name → labels (without le) → buckets
	for _, line := range strings.Split(metricsText, "\n") {
		line = strings.TrimSpace(line)
		if f := strings.Fields(line); len(f) == 4 && f[0] == "#" && f[1] == "TYPE" && f[3] == "histogram" {
			histograms[f[2]] = true
			continue
		}
		if line == "" || line[0] == '#' {
			continue
		}
		name, labels, value, ok := splitSample(line)
		if !ok || !strings.HasSuffix(name, "_bucket") {
			continue
		}
		base := strings.TrimSuffix(name, "_bucket")
		le, rest := takeLabel(labels, "le")
		if le == "" {
			continue
		}
		if all[base] == nil {
			all[base] = map[string]*series{}
		}
		s := all[base][rest]
		if s == nil {
			s = &series{}
			all[base][rest] = s
		}
		bound, err := strconv.ParseFloat(le, 64)
		if err != nil {
			continue
		}
		if math.IsInf(bound, 1) {
			s.total = value
			continue
		}
		s.bounds = append(s.bounds, bound)
		s.counts = append(s.counts, value)
	}
	var problems []string
	names := make([]string, 0, len(histograms))
	for n := range histograms {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		if !strings.HasSuffix(name, "_seconds") {
			lower := strings.ToLower(name)
			if strings.Contains(lower, "duration") || strings.Contains(lower, "latency") {
				problems = append(problems, fmt.Sprintf("histogram %s measures time but has no unit suffix (want _seconds)", name))
			}
			continue
		}
		keys := make([]string, 0, len(all[name]))
		for k := range all[name] {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			s := all[name][k]
			if len(s.bounds) == 0 {
				continue
			}
			sort.Sort(byBound{s.bounds, s.counts})
			id := name + "{" + k + "}"
			largest := s.bounds[len(s.bounds)-1]
			switch {
			case largest > 1000:
				problems = append(problems, fmt.Sprintf("histogram %s: largest bucket bound %g s looks like milliseconds", id, largest))
			case s.total > 0 && s.counts[0] == s.total:
				problems = append(problems, fmt.Sprintf("histogram %s: all %g observations fall into the first bucket (le=%g): bounds too coarse for the unit", id, s.total, s.bounds[0]))
			case s.total > 0 && s.counts[len(s.counts)-1] == 0:
				problems = append(problems, fmt.Sprintf("histogram %s: all %g observations are above the largest bound %g s: values recorded in a smaller unit?", id, s.total, largest))
			}
		}
	}
	return problems
}

// splitSample splits `name{labels} value [timestamp]`.
func splitSample(line string) (name, labels string, value float64, ok bool) {
	rest := line
	if i := strings.IndexByte(line, '{'); i >= 0 {
		j := strings.LastIndexByte(line, '}')
		if j < i {
			return "", "", 0, false
		}
		name, labels, rest = line[:i], line[i+1:j], line[j+1:]
	} else {
		i := strings.IndexByte(line, ' ')
		if i < 0 {
			return "", "", 0, false
		}
		name, rest = line[:i], line[i:]
	}
	f := strings.Fields(rest)
	if len(f) == 0 {
		return "", "", 0, false
	}
	v, err := strconv.ParseFloat(f[0], 64)
	return name, labels, v, err == nil
}

// takeLabel returns the value of label key and the other labels, in their order.
// Values are assumed free of `",` sequences, true of the bounds and our labels.
func takeLabel(labels, key string) (value, rest string) {
	var others []string
	for _, kv := range strings.Split(labels, "\",") {
		kv = strings.TrimSuffix(strings.TrimSpace(kv), "\"")
		if kv == "" {
			continue
		}
		if k, v, ok := strings.Cut(kv, "=\""); ok && k == key {
			value = v
			continue
		}
		others = append(others, kv+"\"")
	}
	return value, strings.Join(others, ",")
}

type byBound struct{ bounds, counts []float64 }

func (b byBound) Len() int           { return len(b.bounds) }
func (b byBound) Less(i, j int) bool { return b.bounds[i] < b.bounds[j] }
func (b byBound) Swap(i, j int) {
	b.bounds[i], b.bounds[j] = b.bounds[j], b.bounds[i]
	b.counts[i], b.counts[j] = b.counts[j], b.counts[i]
}
