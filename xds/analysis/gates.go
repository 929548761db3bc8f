package analysis

import (
	"math"
	"sort"
)

// The gate math: pure functions of counts and histograms.

// ErrorRate is errors / requests (0 when there were no requests).
func ErrorRate(requests, errors float64) float64 {
	if requests <= 0 {
		return 0
	}
	return errors / requests
}

// HistogramQuantile is the q-quantile (0..1) of a histogram given as upper bounds
// (ascending, +Inf last) and the count of each bucket (not cumulative), with Prometheus's
// histogram_quantile rules: linear interpolation inside the bucket holding the rank, the
// first bucket starting at 0 (when its bound is positive), and a rank in the +Inf bucket
// answered with the largest finite bound. NaN when the histogram is empty or malformed.
func HistogramQuantile(q float64, bounds, counts []float64) float64 {
	if len(bounds) == 0 || len(bounds) != len(counts) || q < 0 || q > 1 || math.IsNaN(q) {
		return math.NaN()
	}
	total := 0.0
	for _, c := range counts {
		if c < 0 || math.IsNaN(c) {
			return math.NaN()
		}
		total += c
	}
	if total == 0 {
		return math.NaN()
	}
	rank := q * total
	cum := 0.0
	for i, c := range counts {
		if cum+c >= rank && c > 0 {
			if math.IsInf(bounds[i], 1) {
				if i == 0 {
					return math.NaN()
				}
				return bounds[i-1]
			}
			lower := 0.0
			if i > 0 {
				lower = bounds[i-1]
			} else if bounds[0] <= 0 {
				return bounds[0]
			}
			return lower + (bounds[i]-lower)*(rank-cum)/c
		}
		cum += c
	}
	// q = 1 with trailing empty buckets: the last non-empty bucket's bound.
	for i := len(counts) - 1; i >= 0; i-- {
		if counts[i] > 0 && !math.IsInf(bounds[i], 1) {
			return bounds[i]
		}
	}
	return math.NaN()
}

// PSIFloor is the smallest proportion PSI uses for a bucket: an empty bucket on one side
// would make ln(p/q) infinite, so proportions below it are raised to it.
const PSIFloor = 1e-4

// PSI is the population stability index of an actual distribution (the canary's bucket
// counts) against an expected one (the baseline's), over the same buckets:
// sum over buckets of (a - e) * ln(a / e), where a and e are each side's proportions,
// raised to PSIFloor. 0 when both are the same; 0.1 is commonly read as a small shift,
// 0.25 as a large one. NaN when either side is empty or the lengths differ.
func PSI(actual, expected []float64) float64 {
	if len(actual) != len(expected) || len(actual) == 0 {
		return math.NaN()
	}
	ta, te := 0.0, 0.0
	for i := range actual {
		ta += actual[i]
		te += expected[i]
	}
	if ta <= 0 || te <= 0 {
		return math.NaN()
	}
	psi := 0.0
	for i := range actual {
		a := math.Max(actual[i]/ta, PSIFloor)
		e := math.Max(expected[i]/te, PSIFloor)
		psi += (a - e) * math.Log(a/e)
	}
	return psi
}

// LatencyRatioFloor is the baseline latency (seconds) a ratio is taken over at least, so
// a baseline answering in ~0 s does not make any canary latency an infinite ratio.
const LatencyRatioFloor = 0.001

// LatencyRatio is canary / max(baseline, LatencyRatioFloor).
func LatencyRatio(canary, baseline float64) float64 {
	return canary / math.Max(baseline, LatencyRatioFloor)
}

// CapacityNeeded is how many ready endpoints the canary needs to take nextShare percent of
// the pair's traffic: ceil(nextShare/100 × baselineReady), at least 1. The baseline's ready
// endpoints are taken as what the pair's whole traffic needs (it carried it before the
// analysis), so the canary needs that capacity in proportion to its next share.
func CapacityNeeded(nextShare, baselineReady int) int {
	n := (nextShare*baselineReady + 99) / 100
	return max(n, 1)
}

// Cumulative turns Prometheus's cumulative bucket counts (by upper bound) into sorted
// bounds and per-bucket counts, adding a +Inf bucket holding total minus the last
// cumulative count when the buckets have none.
func Cumulative(buckets map[float64]float64, total float64) (bounds, counts []float64) {
	for b := range buckets {
		bounds = append(bounds, b)
	}
	sort.Float64s(bounds)
	prev := 0.0
	for _, b := range bounds {
		c := buckets[b] - prev
		if c < 0 {
			c = 0
		}
		counts = append(counts, c)
		prev = buckets[b]
	}
	if len(bounds) == 0 || !math.IsInf(bounds[len(bounds)-1], 1) {
		bounds = append(bounds, math.Inf(1))
		counts = append(counts, math.Max(total-prev, 0))
	}
	return bounds, counts
}
