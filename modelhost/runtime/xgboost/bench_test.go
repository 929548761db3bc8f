package xgboost

import (
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

func BenchmarkPredictRows(b *testing.B) {
	for _, name := range []string{"binary", "regression", "multiclass"} {
		b.Run(name, func(b *testing.B) {
			raw, err := os.ReadFile(filepath.Join(fixtures, name, "model.json"))
			if err != nil {
				b.Fatal(err)
			}
			e, err := Parse(raw)
			if err != nil {
				b.Fatal(err)
			}
			const n = 1000
			rng := rand.New(rand.NewPCG(1, 2))
			rows := make([]float32, n*e.Features())
			for i := range rows {
				if rng.Float64() < 0.1 {
					rows[i] = float32(math.NaN())
				} else {
					rows[i] = float32(rng.NormFloat64())
				}
			}
			out := make([]float32, n*e.Width())
			b.ReportAllocs()
			for b.Loop() {
				e.PredictRows(rows, out)
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/row")
		})
	}
}
