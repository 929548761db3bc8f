package policy

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"

	"github.com/patchbay-io/patchbay/api/headers"
	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
)

func validPolicy() *policyv1.Policy {
	return &policyv1.Policy{
		ConfigVersion: "cfg-1",
		Layers:        []*policyv1.Layer{{Name: "ranking", Salt: "ls1"}, {Name: "ui", Salt: "ls2"}},
		Models: []*policyv1.Model{{
			Name: "ranker", Salt: "ms", Versions: []string{"v7", "v8"},
			Experiments: []*policyv1.Experiment{
				{Name: "ltv", Layer: "ranking", SlotStart: 0, SlotEnd: 2000, Salt: "e1",
					Arms: []*policyv1.Arm{{Name: "control", Version: "v7", Weight: 50}, {Name: "treatment", Version: "v8", Weight: 50}}},
				{Name: "fresh", Layer: "ranking", SlotStart: 2000, SlotEnd: 3000, Salt: "e2",
					Arms: []*policyv1.Arm{{Name: "on", Version: "v8", Weight: 1}}},
				{Name: "color", Layer: "ui", SlotStart: 5000, SlotEnd: 10000, Salt: "e3",
					Match: []*policyv1.HeaderMatch{{Name: "x-country", Values: []string{"US"}}},
					Arms:  []*policyv1.Arm{{Name: "a", Version: "v7", Weight: 1}, {Name: "b", Version: "v7", Weight: 3}}},
			},
		}},
	}
}

func TestCompileValid(t *testing.T) {
	t.Parallel()
	tbl, err := Compile(validPolicy(), nil)
	if err != nil {
		t.Fatalf("Compile: %v", err)
	}
	if tbl.ConfigVersion != "cfg-1" || !cmp.Equal(tbl.Identity, []string{headers.UserID}) {
		t.Errorf("version %q identity %v", tbl.ConfigVersion, tbl.Identity)
	}
	m := tbl.Model("ranker")
	if m == nil || tbl.Model("nope") != nil {
		t.Fatalf("Model lookup wrong: %v", m)
	}
	if got := len(m.Layers); got != 2 {
		t.Fatalf("layers = %d, want 2", got)
	}
	// ranking: none + 2 arms + 1 arm = 4 digits; ui: none + 2 arms = 3 digits.
	if m.Layers[0].Stride != 1 || m.Layers[1].Stride != 4 || len(m.combos) != 12 {
		t.Fatalf("strides %d,%d combos %d", m.Layers[0].Stride, m.Layers[1].Stride, len(m.combos))
	}
	// ltv=treatment (digit 2) and color=b (digit 2, stride 4): 2 + 8 = 10.
	want := SetHeader(headers.Experiments, "ltv=treatment,color=b")
	if diff := cmp.Diff(want, m.CombosHeader(10), protocmp.Transform()); diff != "" {
		t.Errorf("combo 10 (-want +got):\n%s", diff)
	}
	if m.CombosHeader(0) != nil {
		t.Errorf("combo 0 must be no header")
	}
	if e := m.Experiments[2]; e.Total != 4 || e.Arms[0].Upper != 1 || e.Arms[1].Upper != 4 || e.Arms[1].Label != "color=b" {
		t.Errorf("arm ranges wrong: %+v %+v", e.Arms[0], e.Arms[1])
	}
	if v := m.Version("v8"); v == nil || string(v.Header.GetHeader().GetRawValue()) != "v8" || v.Header.GetHeader().GetValue() != "" {
		t.Errorf("version header must use raw_value only: %v", v)
	}
}

func TestCompilePolicyIdentityWins(t *testing.T) {
	t.Parallel()
	p := validPolicy()
	p.IdentityHeaders = []string{"x-account", "x-user-id"}
	tbl, err := Compile(p, []string{"x-other"})
	if err != nil {
		t.Fatal(err)
	}
	if !cmp.Equal(tbl.Identity, []string{"x-account", "x-user-id"}) {
		t.Errorf("identity = %v", tbl.Identity)
	}
	p.IdentityHeaders = nil
	if tbl, _ = Compile(p, []string{"x-other"}); !cmp.Equal(tbl.Identity, []string{"x-other"}) {
		t.Errorf("default identity = %v", tbl.Identity)
	}
}

func TestCompileRejects(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		mutate func(p *policyv1.Policy)
		want   []string
	}{
		{"unknown arm version", func(p *policyv1.Policy) { p.Models[0].Experiments[0].Arms[1].Version = "v9" }, []string{`unknown version "v9"`}},
		{"zero weight", func(p *policyv1.Policy) { p.Models[0].Experiments[0].Arms[0].Weight = 0 }, []string{"zero weight"}},
		{"overlap", func(p *policyv1.Policy) { p.Models[0].Experiments[1].SlotStart = 1999 }, []string{`overlap experiment "ltv" [0, 2000) in layer "ranking"`}},
		{"reversed range", func(p *policyv1.Policy) { p.Models[0].Experiments[1].SlotEnd = 1999 }, []string{"slots [2000, 1999)"}},
		{"beyond slots", func(p *policyv1.Policy) { p.Models[0].Experiments[2].SlotEnd = 10001 }, []string{"slots [5000, 10001)"}},
		{"unknown layer", func(p *policyv1.Policy) { p.Models[0].Experiments[0].Layer = "nope" }, []string{`layer "nope" is not in policy layers`}},
		{"duplicate model", func(p *policyv1.Policy) { p.Models = append(p.Models, proto.Clone(p.Models[0]).(*policyv1.Model)) }, []string{"duplicate model"}},
		{"duplicate version", func(p *policyv1.Policy) { p.Models[0].Versions = append(p.Models[0].Versions, "v7") }, []string{`"v7": duplicate version`}},
		{"no versions", func(p *policyv1.Policy) { p.Models[0].Versions = nil; p.Models[0].Experiments = nil }, []string{"no versions"}},
		{"no arms", func(p *policyv1.Policy) { p.Models[0].Experiments[0].Arms = nil }, []string{"no arms"}},
		{"bad match header", func(p *policyv1.Policy) { p.Models[0].Experiments[2].Match[0].Name = "x country" }, []string{"not a header name"}},
		{"match without values", func(p *policyv1.Policy) { p.Models[0].Experiments[2].Match[0].Values = nil }, []string{"no values"}},
		{"bad identity header", func(p *policyv1.Policy) { p.IdentityHeaders = []string{"x user"} }, []string{"identity_headers[0]"}},
		{"separator in experiment name", func(p *policyv1.Policy) { p.Models[0].Experiments[0].Name = "a,b" }, []string{"without ','"}},
		{"duplicate experiment", func(p *policyv1.Policy) { p.Models[0].Experiments[1].Name = "ltv" }, []string{"duplicate experiment name"}},
		{"all at once", func(p *policyv1.Policy) {
			p.Models[0].Experiments[0].Arms[0].Weight = 0
			p.Models[0].Experiments[2].Arms[0].Version = "v0"
		}, []string{"zero weight", `unknown version "v0"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			p := validPolicy()
			tt.mutate(p)
			_, err := Compile(p, nil)
			if err == nil {
				t.Fatal("Compile accepted an invalid policy")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
	if _, err := Compile(nil, nil); err == nil {
		t.Error("nil policy accepted")
	}
}

func TestCompileNormalizesAndAcceptsEmptyRanges(t *testing.T) {
	t.Parallel()
	p := validPolicy()
	p.IdentityHeaders = []string{"X-User-Id"}
	p.Models[0].Experiments[2].Match[0].Name = "X-Country"
	// Allocation 0 (or a full layer) yields an empty range, even inside another's.
	p.Models[0].Experiments[1].SlotStart, p.Models[0].Experiments[1].SlotEnd = 1000, 1000
	tbl, err := Compile(p, nil)
	if err != nil {
		t.Fatalf("Compile: %v", err)
	}
	if tbl.Identity[0] != "x-user-id" || tbl.Model("ranker").Experiments[2].Match[0].Name != "x-country" {
		t.Errorf("header names not lower-cased: %v %v", tbl.Identity, tbl.Model("ranker").Experiments[2].Match)
	}
}

func TestCompileManyCombosFallsBack(t *testing.T) {
	t.Parallel()
	p := &policyv1.Policy{Models: []*policyv1.Model{{Name: "m", Versions: []string{"v1"}}}}
	// 3 layers with 20 arms each: 21^3 = 9261 combinations > maxCombos.
	for l := range 3 {
		name := string(rune('a' + l))
		p.Layers = append(p.Layers, &policyv1.Layer{Name: name, Salt: name})
		e := &policyv1.Experiment{Name: "e" + name, Layer: name, SlotStart: 0, SlotEnd: 10000, Salt: name}
		for a := range 20 {
			e.Arms = append(e.Arms, &policyv1.Arm{Name: "arm" + string(rune('a'+a)), Version: "v1", Weight: 1})
		}
		p.Models[0].Experiments = append(p.Models[0].Experiments, e)
	}
	tbl, err := Compile(p, nil)
	if err != nil {
		t.Fatal(err)
	}
	if m := tbl.Model("m"); m.CombosHeader(5) != nil {
		t.Error("combinations beyond the cap must not be precomputed")
	}
}
