package policyv1

import (
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
)

func goodPolicy() *Policy {
	return &Policy{
		ConfigVersion: "v",
		Layers:        []*Layer{{Name: "l", Salt: "s"}},
		Models: []*Model{{
			Name: "m", Salt: "s", Versions: []string{"v1", "v2"},
			Experiments: []*Experiment{
				{Name: "e1", Layer: "l", SlotStart: 0, SlotEnd: 3000, Salt: "s",
					Match: []*HeaderMatch{{Name: "X-Country", Values: []string{"US"}}},
					Arms:  []*Arm{{Name: "a", Version: "v1", Weight: 1}, {Name: "b", Version: "v2", Weight: 1}}},
				// Paused (allocation 0): an empty range holds nobody and is valid.
				{Name: "e2", Layer: "l", SlotStart: 3000, SlotEnd: 3000, Arms: []*Arm{{Name: "a", Version: "v2", Weight: 7}}},
			},
		}},
	}
}

func TestValidateAcceptsGoodAndPaused(t *testing.T) {
	if err := Validate(goodPolicy()); err != nil {
		t.Fatal(err)
	}
}

func TestValidateRefusesWhatExtprocCannotCompile(t *testing.T) {
	for _, tc := range []struct {
		name, want string
		edit       func(p *Policy)
	}{
		{"nil", "policy: missing", nil},
		{"bad identity header", `identity_headers[0]: "x user" is not a header name`, func(p *Policy) { p.IdentityHeaders = []string{"x user"} }},
		{"duplicate layer", `layers[1] "l": duplicate layer`, func(p *Policy) { p.Layers = append(p.Layers, &Layer{Name: "l"}) }},
		{"empty model", "models[1]: empty name", func(p *Policy) { p.Models = append(p.Models, &Model{}) }},
		{"duplicate model", `models[1] "m": duplicate model`, func(p *Policy) { p.Models = append(p.Models, proto.Clone(p.Models[0]).(*Model)) }},
		{"no versions", `"m": no versions`, func(p *Policy) { p.Models[0].Versions = nil }},
		{"duplicate version", `versions[1] "v1": duplicate version`, func(p *Policy) { p.Models[0].Versions[1] = "v1" }},
		{"bad experiment name", "name must be non-empty without ',' or '='", func(p *Policy) { p.Models[0].Experiments[0].Name = "a=b" }},
		{"duplicate experiment", "duplicate experiment name", func(p *Policy) { p.Models[0].Experiments[1].Name = "e1" }},
		{"unknown layer", `layer "x" is not in policy layers`, func(p *Policy) { p.Models[0].Experiments[0].Layer = "x" }},
		{"slots past the layer", "slots [0, 10001) not a range within [0, 10000)", func(p *Policy) { p.Models[0].Experiments[0].SlotEnd = 10001 }},
		{"inverted slots", "slots [3001, 3000) not a range", func(p *Policy) { p.Models[0].Experiments[1].SlotStart = 3001 }},
		{"overlap", `slots [2999, 3100) overlap experiment "e1" [0, 3000)`, func(p *Policy) {
			p.Models[0].Experiments[1].SlotStart, p.Models[0].Experiments[1].SlotEnd = 2999, 3100
		}},
		{"match without values", `match[0] "X-Country": no values`, func(p *Policy) { p.Models[0].Experiments[0].Match[0].Values = nil }},
		{"no arms", `"e2": no arms`, func(p *Policy) { p.Models[0].Experiments[1].Arms = nil }},
		{"duplicate arm", `arms[1] "a": duplicate arm`, func(p *Policy) { p.Models[0].Experiments[0].Arms[1].Name = "a" }},
		{"unknown arm version", `unknown version "v9"`, func(p *Policy) { p.Models[0].Experiments[0].Arms[0].Version = "v9" }},
		{"zero weight (a wrapped 2^32)", "zero weight", func(p *Policy) { p.Models[0].Experiments[0].Arms[0].Weight = 0 }},
		{"weights overflow", "arm weights sum to 4294967296", func(p *Policy) {
			p.Models[0].Experiments[0].Arms[0].Weight, p.Models[0].Experiments[0].Arms[1].Weight = 1<<31, 1<<31
		}},
		{"too many layers", "experiments span 18 layers, at most 16", func(p *Policy) { // l and 17 more
			for i := 0; i < 17; i++ {
				n := "L" + string(rune('a'+i))
				p.Layers = append(p.Layers, &Layer{Name: n})
				p.Models[0].Experiments = append(p.Models[0].Experiments, &Experiment{Name: "x" + n, Layer: n, Arms: []*Arm{{Name: "a", Version: "v1", Weight: 1}}})
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var p *Policy
			if tc.edit != nil {
				p = goodPolicy()
				tc.edit(p)
			}
			err := Validate(p)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
		})
	}
}
