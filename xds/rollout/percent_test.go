package rollout

import (
	"math/big"
	"strings"
	"testing"
)

func allocDoc(alloc string) string {
	return "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: m\n" +
		"versions: [{name: v1, endpoints: [\"10.0.0.1:80\"]}]\ntraffic: {v1: 100}\n" +
		"experiments:\n  - name: e\n    layer: l\n    allocation: " + alloc + "\n    arms: [{name: a, version: v1, weight: 1}]\n"
}

// TestAllocationTakesEveryTwoDecimalValueExactly: any value in [0, 100] with at most two
// decimals is taken exactly (0.07, 0.29 and 1.1 were refused through float math); 0 pauses.
func TestAllocationTakesEveryTwoDecimalValueExactly(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]Hundredths{
		"0": 0, "0.07": 7, "0.29": 29, "1.1": 110, "0.57": 57, "12.50": 1250, "33.33": 3333,
		"100": 10000, "100.00": 10000, "4.35": 435, "1.100": 110, "+2": 200, ".5": 50,
	} {
		rs, err := Parse("m.yaml", []byte(allocDoc(in)))
		if err == nil {
			err = Validate(&Set{Rollouts: rs})
		}
		if err != nil {
			t.Errorf("allocation %s refused: %v", in, err)
			continue
		}
		if got := rs[0].Experiments[0].Allocation; got != want {
			t.Errorf("allocation %s = %d hundredths, want %d", in, got, want)
		}
	}
	// Every two-decimal value of the range, exhaustively.
	for bp := 0; bp <= 10000; bp++ {
		s := Hundredths(bp).String()
		got, err := ParseHundredths(s)
		if err != nil || int(got) != bp {
			t.Fatalf("%d hundredths renders %q, parses back to %d (%v)", bp, s, got, err)
		}
	}
}

func TestAllocationRefusals(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		"0.005":       `m.yaml:9: "0.005" has more than two decimals`,
		"100.01":      `m.yaml:9: experiments[0].allocation: 100.01 is outside [0, 100]`,
		"-1":          `m.yaml:9: experiments[0].allocation: -1 is outside [0, 100]`,
		"1e1":         `m.yaml:9: "1e1" is not a decimal number`,
		".nan":        `m.yaml:9: ".nan" is not a decimal number`,
		".inf":        `m.yaml:9: ".inf" is not a decimal number`,
		"0x10":        `m.yaml:9: "0x10" is not a decimal number`,
		"\"20\"":      `m.yaml:9: wrong type: got str, want a percentage`,
		"[20]":        `m.yaml:9: wrong type: got seq, want a percentage`,
		"99999999999": `m.yaml:9: "99999999999" is too large`,
	} {
		rs, err := Parse("m.yaml", []byte(allocDoc(in)))
		if err == nil {
			err = Validate(&Set{Rollouts: rs})
		}
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("allocation %s: got %v, want %q", in, err, want)
		}
	}
}

// TestPausedExperimentIsValidNextToAFullLayer: 0 is a pause, so a layer at 100% may still
// hold paused experiments.
func TestPausedExperimentIsValidNextToAFullLayer(t *testing.T) {
	t.Parallel()
	doc := allocDoc("100") + "  - {name: e2, layer: l, allocation: 0, arms: [{name: a, version: v1, weight: 1}]}\n"
	rs, err := Parse("m.yaml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	if err := Validate(&Set{Rollouts: rs}); err != nil {
		t.Fatal(err)
	}
}

// TestArmWeightsCannotWrap: an arm weight of 2^32 became 0 in the uint32 policy and split
// the brain between Envoy (config accepted) and ext_proc (policy refused).
func TestArmWeightsCannotWrap(t *testing.T) {
	t.Parallel()
	doc := strings.Replace(allocDoc("10"), "weight: 1}", "weight: 4294967296}", 1)
	rs, err := Parse("m.yaml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	err = Validate(&Set{Rollouts: rs})
	want := `m.yaml:10: experiments[0].arms[0].weight: 4294967296 is over the maximum arm weight 1000000`
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("got %v, want %q", err, want)
	}
	rs, _ = Parse("m.yaml", []byte(strings.Replace(allocDoc("10"), "weight: 1}", "weight: 1000000}", 1)))
	if err := Validate(&Set{Rollouts: rs}); err != nil {
		t.Fatalf("weight at the maximum refused: %v", err)
	}
}

// TestVersionTLSField: tls is a boolean; anything else is refused with its line.
func TestVersionTLSField(t *testing.T) {
	t.Parallel()
	doc := func(v string) string {
		return "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: m\n" +
			"versions: [{name: v1, endpoints: [\"10.0.0.1:80\"], tls: " + v + "}]\ntraffic: {v1: 100}\n"
	}
	rs, err := Parse("m.yaml", []byte(doc("true")))
	if err != nil || !rs[0].Versions[0].TLS {
		t.Fatalf("tls: true: %v %+v", err, rs)
	}
	for _, bad := range []string{"1", `"true"`, "[true]"} {
		if _, err := Parse("m.yaml", []byte(doc(bad))); err == nil || !strings.Contains(err.Error(), "m.yaml:4: wrong type") {
			t.Errorf("tls: %s: got %v, want a wrong type error on line 4", bad, err)
		}
	}
}

// FuzzParseHundredths: whatever the input, no panic; an accepted input is exactly the
// decimal it spells (checked with big.Rat) and renders back to the same value.
func FuzzParseHundredths(f *testing.F) {
	for _, s := range []string{"0", "0.07", "1.1", "100", "-3.5", "1.100", ".5", "5.", "1e1", "", ".", "+", "00012.30"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		h, err := ParseHundredths(s)
		if err != nil {
			return
		}
		r, ok := new(big.Rat).SetString(strings.TrimSuffix(s, ".")) // "5." is 5
		if !ok {
			t.Fatalf("accepted %q, which big.Rat cannot read", s)
		}
		r.Mul(r, big.NewRat(100, 1))
		if !r.IsInt() || r.Num().Int64() != int64(h) {
			t.Fatalf("%q parsed to %d hundredths, want %v", s, h, r)
		}
		back, err := ParseHundredths(h.String())
		if err != nil || back != h {
			t.Fatalf("%q -> %d -> %q -> %d (%v)", s, h, h.String(), back, err)
		}
	})
}
