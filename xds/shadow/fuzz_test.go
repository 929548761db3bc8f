package shadow

import (
	"math"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	shadowv1 "github.com/patchbay-io/patchbay/api/shadow/v1"
)

// FuzzRecord feeds decoded records from arbitrary bytes (what a host's stream carries)
// to a small comparator: no panic, the pending bound holds, and results stay finite.
func FuzzRecord(f *testing.F) {
	seed := func(r *shadowv1.Record) {
		b, _ := proto.Marshal(r)
		f.Add(b)
	}
	seed(&shadowv1.Record{RequestId: "a", Model: "m", Version: "v1", Traffic: shadowv1.Traffic_TRAFFIC_LIVE,
		Outputs: []*shadowv1.Output{{Name: "y", Values: []float64{0.5}, HasClass: true, ClassIndex: 1}}})
	seed(&shadowv1.Record{RequestId: "a", Model: "m", Version: "v2", Traffic: shadowv1.Traffic_TRAFFIC_SHADOW, LatencySeconds: 0.1,
		Outputs: []*shadowv1.Output{{Name: "y", Values: []float64{math.Inf(1), math.NaN(), 1e308}}}})
	f.Fuzz(func(t *testing.T, b []byte) {
		var clk int64
		c, err := New(Config{MaxPending: 3, Expiry: time.Second, Now: func() time.Time { clk += int64(300 * time.Millisecond); return time.Unix(0, clk) }})
		if err != nil {
			t.Fatal(err)
		}
		// The same bytes as live and shadow records of a few requests.
		for i := range 6 {
			var r shadowv1.Record
			if proto.Unmarshal(b, &r) != nil {
				return
			}
			r.RequestId += string(rune('a' + i%3))
			if i%2 == 1 {
				r.Traffic = shadowv1.Traffic_TRAFFIC_SHADOW
			}
			_ = c.Add(&r)
			if len(c.pending) > 3 || c.order.Len() != len(c.pending) {
				t.Fatalf("pending %d (list %d), bound 3", len(c.pending), c.order.Len())
			}
		}
		for _, res := range c.Results().Outputs {
			if !finite(res.MeanAbsDiff) || !finite(res.MaxAbsDiff) || !finite(res.AbsDiffSum) || !finite(res.MeanLatencyDiffSeconds) || !finite(res.LatencyDiffSum) {
				t.Fatalf("non-finite result %+v", res)
			}
		}
	})
}

func finite(x float64) bool { return !math.IsNaN(x) && !math.IsInf(x, 0) }
