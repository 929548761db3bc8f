package rollout

import (
	"fmt"
	"time"

	"go.yaml.in/yaml/v3"
)

// Writing a parsed rollout back as YAML gives a document that parses to the same spec
// (FuzzParse checks it): percentages as plain numbers, durations as "2s".

// MarshalYAML writes the percentage as the plain number it was written as ("20", "0.25"),
// not as the quoted string its MarshalText would give.
func (h Hundredths) MarshalYAML() (any, error) {
	return &yaml.Node{Kind: yaml.ScalarNode, Value: h.String()}, nil
}

// MarshalText writes the duration as time.Duration's String ("1m30s"), which UnmarshalText reads.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.Duration.String()), nil }

// UnmarshalYAML reads a duration scalar, reporting a bad one at its line (UnmarshalText's
// error alone reaches the user without one).
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: wrong type: got %s, want a duration like 2s or 150ms", n.Line, kindName(n))}}
	}
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: %q is not a duration: want one like 2s or 150ms", n.Line, n.Value)}}
	}
	d.Duration = v
	return nil
}
