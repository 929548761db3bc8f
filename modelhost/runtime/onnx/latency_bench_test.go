//go:build cgo

package onnx

import (
	"context"
	"fmt"
	"path/filepath"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

// BenchmarkPredictLatency: Predict on mlp-large at batch 1, hot (back to back) and after
// an idle gap (as in a host between requests), on the calling goroutine or handed to a
// goroutine locked to its OS thread. Reports medians of per-call times.
func BenchmarkPredictLatency(b *testing.B) {
	needLibrary(b)
	dir := filepath.Join(fixtures, "mlp-large")
	m, err := load(Config{}, specOf(b, dir))
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	e := readExpected(b, "mlp-large")
	f32 := e.Cases[0].Inputs[0].tensor(b).F32[:256]
	in := func() []*tensor.Tensor {
		return []*tensor.Tensor{{Name: "features", Datatype: tensor.FP32, Shape: []int64{1, 256}, F32: f32}}
	}
	work := make(chan func())
	go func() {
		runtime.LockOSThread()
		for f := range work {
			f()
		}
	}()
	defer close(work)
	for _, gap := range []time.Duration{0, 300 * time.Microsecond} {
		for _, mode := range []string{"caller", "locked", "caller-cancelctx"} {
			b.Run(fmt.Sprintf("gap=%v/%s", gap, mode), func(b *testing.B) {
				var ts []float64
				for range b.N {
					ctx := context.Background()
					var cancel context.CancelFunc = func() {}
					if mode == "caller-cancelctx" {
						ctx, cancel = context.WithCancel(ctx)
					}
					start := time.Now()
					if mode == "locked" {
						done := make(chan struct{})
						work <- func() { _, _ = m.Predict(ctx, in()); close(done) }
						<-done
					} else if _, err := m.Predict(ctx, in()); err != nil {
						b.Fatal(err)
					}
					ts = append(ts, float64(time.Since(start).Nanoseconds()))
					cancel()
					if gap > 0 {
						t := time.Now()
						for time.Since(t) < gap { // idle, not spinning: sleep
							time.Sleep(gap)
						}
					}
				}
				slices.Sort(ts)
				b.ReportMetric(ts[len(ts)/2], "median-ns")
			})
		}
	}
}
