package modelhost

import (
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestIdentityFeatureSpecErrors: bad identity features are model.yaml errors with file:line.
func TestIdentityFeatureSpecErrors(t *testing.T) {
	const yaml = `runtime: linear
inputs: [{name: x, datatype: FP32, shape: [-1, 6]}]
outputs: [{name: y, datatype: FP32, shape: [-1]}]
features:
  - {name: a, input: x, column: 0, source: identity}
  - {name: b, input: x, column: 1, source: identity, identity: user}
  - {name: c, input: x, column: 2, source: identity, identity: bucket, header: x-other, default: 0}
  - {name: d, input: x, column: 3, source: identity, identity: bucket}
  - {name: e, input: x, column: 4, source: header, header: x-country, identity: known, default: 0}
  - {name: f, input: x, column: 5, source: identity, identity: known, header: "bad header", map: {a: 1}}
`
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "model.yaml"), []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := loadSpec(dir, "m", "v1", []string{"linear"})
	if err == nil {
		t.Fatal("loaded, want errors")
	}
	for _, w := range []string{
		`model.yaml:5: features[0].identity: "", want known or bucket`,
		`model.yaml:6: features[1].identity: "user", want known or bucket`,
		"model.yaml:7: features[2].header: identity bucket always reads x-patchbay-bucket",
		"model.yaml:8: features[3]: default missing",
		"model.yaml:9: features[4].identity: only source identity has one",
		`model.yaml:10: features[5].header: "bad header", want the identity header's name`,
		"model.yaml:10: features[5].map: only source header has a map",
	} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q\nlacks %q", err, w)
		}
	}
	// identity: known needs no default (it is always 0 or 1).
	good := "runtime: linear\ninputs: [{name: x, datatype: FP32, shape: [-1, 2]}]\noutputs: [{name: y, datatype: FP32, shape: [-1]}]\nfeatures:\n" +
		"  - {name: known, input: x, column: 0, source: identity, identity: known}\n" +
		"  - {name: device, input: x, column: 1, source: identity, identity: known, header: X-Device-Id}\n"
	if err := os.WriteFile(filepath.Join(dir, "model.yaml"), []byte(good), 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := loadSpec(dir, "m", "v1", []string{"linear"})
	if err != nil {
		t.Fatal(err)
	}
	if s.Features[0].Header != "x-user-id" || s.Features[1].Header != "x-device-id" {
		t.Errorf("identity headers %q %q, want x-user-id, x-device-id", s.Features[0].Header, s.Features[1].Header)
	}
}

func TestParseBucket(t *testing.T) {
	for _, c := range []struct {
		in     string
		want   float64
		reason int
	}{
		{"0", 0, -1},
		{"9223372036854775808", 0.5, -1},
		{"18446744073709551615", float64(1<<53-1) / (1 << 53), -1},
		{"", 0, reasonMissing},
		{"-1", 0, reasonInvalid},
		{"18446744073709551616", 0, reasonInvalid},
		{"0x10", 0, reasonInvalid},
		{" 5", 0, reasonInvalid},
	} {
		x, r := parseBucket(c.in)
		if x != c.want || r != c.reason {
			t.Errorf("parseBucket(%q) = %v, %d; want %v, %d", c.in, x, r, c.want, c.reason)
		}
	}
}

// FuzzParseBucket: any header value gives a value in [0, 1) or a reason, never a panic;
// a valid uint64 always gives a value.
func FuzzParseBucket(f *testing.F) {
	for _, s := range []string{"0", "18446744073709551615", "", "-1", "1e3", "+5"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		x, r := parseBucket(s)
		if r >= 0 {
			if x != 0 {
				t.Fatalf("parseBucket(%q) = %v with reason %d", s, x, r)
			}
			if _, err := strconv.ParseUint(s, 10, 64); err == nil {
				t.Fatalf("parseBucket(%q): reason %d for a valid uint64", s, r)
			}
			return
		}
		if x < 0 || x >= 1 || math.IsNaN(x) {
			t.Fatalf("parseBucket(%q) = %v, want [0, 1)", s, x)
		}
	})
}
