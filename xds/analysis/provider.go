// Package analysis judges a canary against its baseline: the metrics
// Provider interface, the gate math (pure functions) and the decision.
package analysis

import (
	"context"
	"time"
)

// Window names a version of a model and a time range to measure it over.
type Window struct {
	Model, Version string
	Start, End     time.Time
}

// Provider answers the questions the gates ask about one version in a window.
type Provider interface {
	// Requests and errors of a version in the window (errors: 5xx / gRPC non-OK).
	Counts(ctx context.Context, w Window) (requests, errors float64, err error)
	// The latency quantile q (0..1) of the version in the window, in seconds.
	LatencyQuantile(ctx context.Context, w Window, q float64) (float64, error)
	// The histogram of an output's values: upper bounds (ascending, +Inf last) and the count
	// observed in each bucket in the window (not cumulative).
	ScoreHistogram(ctx context.Context, w Window, output string) (bounds, counts []float64, err error)
}
