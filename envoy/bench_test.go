package envoy

import (
	"testing"
	"time"

	"github.com/patchbay-io/patchbay/internal/envoyvalidate"
)

// BenchmarkDeepValidate measures envoyvalidate.Validate on the edge bootstrap. The
// baseline, the generated ValidateAll alone (which never opens an Any), is timed in
// the same run over as many iterations; x-ValidateAll is the ratio.
func BenchmarkDeepValidate(b *testing.B) {
	bs := mustParse(b, Edge)
	b.ReportAllocs()
	for b.Loop() {
		if err := envoyvalidate.Validate(bs); err != nil {
			b.Fatal(err)
		}
	}
	deep := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
	start := time.Now()
	for range b.N {
		if err := bs.ValidateAll(); err != nil {
			b.Fatal(err)
		}
	}
	base := float64(time.Since(start).Nanoseconds()) / float64(b.N)
	b.ReportMetric(base, "ValidateAll-ns/op")
	b.ReportMetric(deep/base, "x-ValidateAll")
}
