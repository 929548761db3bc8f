// Package rollout owns the rollout file format (apiVersion patchbay.io/v1, kind Rollout):
// the typed spec, a strict loader that keeps file and line for every field, and the
// validation rules of shared/design.md. It knows nothing of Envoy or xDS.
package rollout

import "time"

const (
	// APIVersion is the only apiVersion the loader accepts.
	APIVersion = "patchbay.io/v1"
	// Kind is the only kind the loader accepts.
	Kind = "Rollout"
	// DefaultProtocol is used when a version names none.
	DefaultProtocol = "http"
)

// Rollout is the desired traffic state of one model.
type Rollout struct {
	APIVersion  string         `yaml:"apiVersion"`
	Kind        string         `yaml:"kind"`
	Model       string         `yaml:"model"`
	Versions    []Version      `yaml:"versions"`
	Traffic     map[string]int `yaml:"traffic"`
	Shadow      []Shadow       `yaml:"shadow"`
	Experiments []Experiment   `yaml:"experiments"`
	Timeout     Duration       `yaml:"timeout"`
	Retries     *int           `yaml:"retries"`
	Pinning     bool           `yaml:"pinning"`
	// BodyMode asks ext_proc to read the buffered request body (identity or model in the
	// OIP JSON "parameters"). It costs a body round trip per request; off by default.
	BodyMode bool `yaml:"bodyMode"`

	// Source is where this document came from: file and line of its first key.
	Source Position `yaml:"-" json:"-"`
	// lines maps a field path ("traffic.v7", "versions[1].name") to its line.
	lines map[string]int
}

// Version is one deployed artifact of the model.
type Version struct {
	Name      string   `yaml:"name"`
	Endpoints []string `yaml:"endpoints"`
	Protocol  string   `yaml:"protocol"`
	// TLS makes Envoy's cluster for this version originate (m)TLS to its endpoints, with the
	// certificates the control plane's --upstream-tls-* flags name (the flag turns it on for
	// every version).
	TLS bool `yaml:"tls"`
}

// Shadow mirrors a fraction of the model's requests to a version; responses are discarded.
type Shadow struct {
	Version string  `yaml:"version"`
	Percent float64 `yaml:"percent"`
}

// Experiment assigns a slice of a layer's users to arms.
type Experiment struct {
	Name  string `yaml:"name"`
	Layer string `yaml:"layer"`
	// Allocation is the percent of the layer's users in the experiment, 0 to 100 with at
	// most two decimals; 0 pauses the experiment (nobody is assigned).
	Allocation Hundredths `yaml:"allocation"`
	Match      *Match     `yaml:"match"`
	Arms       []Arm      `yaml:"arms"`
}

// Match targets an experiment on request headers: every listed header must hold one of its values.
type Match struct {
	Headers map[string][]string `yaml:"headers"`
}

// Arm is one variant of an experiment.
type Arm struct {
	Name    string `yaml:"name"`
	Version string `yaml:"version"`
	// Weight is relative to the other arms' weights: 1..MaxArmWeight.
	Weight int `yaml:"weight"`
}

// Position is a place in a rollout file.
type Position struct {
	File string
	Line int
}

// Duration is a time.Duration written as "2s", "150ms".
type Duration struct{ time.Duration }

// UnmarshalText parses a Go duration string.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	d.Duration = v
	return nil
}

// Line returns the line of a field path in the document, falling back to the closest
// enclosing field, then to the document's first line.
func (r *Rollout) Line(path string) int {
	for p := path; p != ""; p = parent(p) {
		if l, ok := r.lines[p]; ok {
			return l
		}
	}
	return r.Source.Line
}

func parent(p string) string {
	for i := len(p) - 1; i >= 0; i-- {
		switch p[i] {
		case '.':
			return p[:i]
		case '[':
			return p[:i]
		}
	}
	return ""
}

// Set is every rollout loaded from a directory, in file then document order.
type Set struct {
	Rollouts []*Rollout
}

// Model returns the rollout of a model, or nil.
func (s *Set) Model(name string) *Rollout {
	for _, r := range s.Rollouts {
		if r.Model == name {
			return r
		}
	}
	return nil
}
