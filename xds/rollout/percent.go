package rollout

import (
	"fmt"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Hundredths is a percentage held exactly, in hundredths of a percent (basis points of the
// whole): 20% is 2000, 0.07% is 7, 100% is 10000. Rollout files write it as a decimal with
// at most two decimals; it is parsed from the YAML text, never through a float, so every such
// value (0.07, 0.29, 1.1) is taken as written.
type Hundredths int64

// HundredthsMax is 100%.
const HundredthsMax Hundredths = 10000

// maxPercentDigits bounds the integer part read (a larger number is refused before it could
// overflow; anything over 100 is refused by validation anyway).
const maxPercentDigits = 9

// ParseHundredths parses a decimal percentage with at most two significant decimals
// ("20", "0.07", "1.1", "12.50", "-3"): digits, an optional '.', then digits; an optional
// leading sign. Exponents, hex, '_' separators, infinities and NaN are refused. Decimals past
// the second must be zeros ("1.100" is 1.1; "0.005" is refused).
func ParseHundredths(s string) (Hundredths, error) {
	orig := s
	neg := false
	switch {
	case strings.HasPrefix(s, "-"):
		neg, s = true, s[1:]
	case strings.HasPrefix(s, "+"):
		s = s[1:]
	}
	intPart, frac, hasDot := strings.Cut(s, ".")
	if intPart == "" && (!hasDot || frac == "") {
		return 0, fmt.Errorf("%q is not a decimal number", orig)
	}
	if !allDigits(intPart) || !allDigits(frac) {
		return 0, fmt.Errorf("%q is not a decimal number like 20 or 0.25", orig)
	}
	intPart = strings.TrimLeft(intPart, "0")
	if len(intPart) > maxPercentDigits {
		return 0, fmt.Errorf("%q is too large", orig)
	}
	if len(frac) > 2 {
		if strings.Trim(frac[2:], "0") != "" {
			return 0, fmt.Errorf("%q has more than two decimals (a layer has 10000 slots)", orig)
		}
		frac = frac[:2]
	}
	for len(frac) < 2 {
		frac += "0"
	}
	var v int64
	if intPart != "" {
		n, err := strconv.ParseInt(intPart, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%q is not a decimal number", orig)
		}
		v = n * 100
	}
	f, _ := strconv.ParseInt(frac, 10, 64) // two digits checked above
	v += f
	if neg {
		v = -v
	}
	return Hundredths(v), nil
}

func allDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// UnmarshalYAML reads the scalar's text as written (not its float value).
func (h *Hundredths) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode || (n.Tag != "!!int" && n.Tag != "!!float") {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: wrong type: got %s, want a percentage like 20 or 0.25", n.Line, kindName(n))}}
	}
	v, err := ParseHundredths(n.Value)
	if err != nil {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: %v", n.Line, err)}}
	}
	*h = v
	return nil
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.SequenceNode:
		return "seq"
	case yaml.MappingNode:
		return "map"
	}
	return strings.TrimPrefix(n.Tag, "!!")
}

// String renders the percentage as a decimal without trailing zeros: "20", "0.07", "1.1".
func (h Hundredths) String() string {
	v := int64(h)
	sign := ""
	if v < 0 {
		sign, v = "-", -v
	}
	s := sign + strconv.FormatInt(v/100, 10)
	if f := v % 100; f != 0 {
		s += strings.TrimRight(fmt.Sprintf(".%02d", f), "0")
	}
	return s
}

// MarshalText renders the percentage as written (for /status and fingerprints).
func (h Hundredths) MarshalText() ([]byte, error) { return []byte(h.String()), nil }
