package v1_test

import (
	"encoding/json"
	"testing"

	v1 "github.com/patchbay-io/patchbay/api/k8s/v1"
)

// TestThresholdKeepsTheValueAsWritten: a gate's max reads and writes back as the JSON
// number or string it was (the file format takes either), and deep copies do not share it.
func TestThresholdKeepsTheValueAsWritten(t *testing.T) {
	for _, in := range []string{`{"metric":"error-rate","max":0.01}`, `{"metric":"latency","max":"250ms"}`, `{"metric":"latency"}`} {
		var g v1.Gate
		if err := json.Unmarshal([]byte(in), &g); err != nil {
			t.Fatal(err)
		}
		out, err := json.Marshal(g)
		if err != nil {
			t.Fatal(err)
		}
		if string(out) != in {
			t.Errorf("%s wrote back as %s", in, out)
		}
		c := g.DeepCopy()
		if g.Max != nil {
			c.Max.Raw[0] = 'x'
			if g.Max.Raw[0] == 'x' {
				t.Errorf("%s: deep copy shares the threshold", in)
			}
		}
	}
}
