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
	// REST and GRPC name the two OIP protocols a version may serve.
	REST = "http"
	GRPC = "grpc"
	// HostPatchbay and HostOIP name the kinds of server a version runs on (Version.Host).
	HostPatchbay = "patchbay"
	HostOIP      = "oip"
	// DefaultHost is used when a version names none.
	DefaultHost = HostPatchbay
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
	// Analysis, when set, has the control plane ramp a canary through steps, judging it
	// against a baseline at each (see analysis.go).
	// (omitted from JSON when unset, so a rollout without one keeps its fingerprint.)
	Analysis *Analysis `yaml:"analysis" json:"Analysis,omitempty"`
	// Contract, when set, is what the model's clients depend on: the control plane holds
	// at zero every version whose OIP metadata breaks it (see contract.go).
	// (omitted from JSON when unset, so a rollout without one keeps its fingerprint.)
	Contract *Contract `yaml:"contract" json:"contract,omitempty"`

	// Closed marks the versions a rollback left at zero (set by the control plane, never
	// read from a file): nothing routes to them — no version route, pinned path, mirror,
	// experiment arm or ext_proc pin — but their Envoy clusters stay, so no route that an
	// Envoy still holds while it applies the change names a cluster it no longer has
	// (Envoy's xDS guidance: remove a cluster only once no route refers to it).
	Closed map[string]bool `yaml:"-" json:"closed,omitempty"`

	// Source is where this document came from: file and line of its first key.
	Source Position `yaml:"-" json:"-"`
	// lines maps a field path ("traffic.v7", "versions[1].name") to its line.
	lines map[string]int
}

// Version is one deployed artifact of the model.
type Version struct {
	Name string `yaml:"name"`
	// Endpoints are the version's OIP REST addresses (host:port), or its OIP gRPC
	// addresses when Protocol is "grpc" (a gRPC-only version, the format before issue 10).
	Endpoints []string `yaml:"endpoints"`
	// GRPCEndpoints are the version's OIP gRPC addresses (host:port), beside its REST
	// Endpoints: a version may serve REST, gRPC or both.
	GRPCEndpoints []string `yaml:"grpcEndpoints"`
	// Protocol is what Endpoints speak: http (default) or grpc.
	Protocol string `yaml:"protocol"`
	// TLS makes Envoy's cluster for this version originate (m)TLS to its endpoints, with the
	// certificates the control plane's --upstream-tls-* flags name (the flag turns it on for
	// every version).
	TLS bool `yaml:"tls"`
	// Host is the kind of server behind the endpoints: patchbay (default), a host that reads
	// x-patchbay-version, so requests keep their unversioned path and every route keeps its
	// mirrors; or oip, an unmodified OIP server (Triton, KServe, MLServer) that knows the
	// version only from the path, so REST requests routed to this version by name are
	// rewritten to /v2/models/<m>/versions/<v>/... (and, Envoy mirroring the rewritten
	// request, those routes carry no REST mirrors).
	Host string `yaml:"host"`
	// MetricsEndpoints are the host:port of the version's model hosts' admin listeners,
	// whose /metrics the control plane scrapes for an analysis with provider embedded.
	MetricsEndpoints []string `yaml:"metricsEndpoints" json:"MetricsEndpoints,omitempty"`
}

// OIPHost reports whether the version runs on an unmodified OIP server (host: oip).
func (v *Version) OIPHost() bool { return v.Host == HostOIP }

// RESTEndpoints are the addresses that answer OIP REST (none for a protocol: grpc version).
func (v *Version) RESTEndpoints() []string {
	if v.Protocol == GRPC {
		return nil
	}
	return v.Endpoints
}

// GRPCAddrs are the addresses that answer OIP gRPC: grpcEndpoints, or endpoints when
// protocol is grpc.
func (v *Version) GRPCAddrs() []string {
	if v.Protocol == GRPC {
		return v.Endpoints
	}
	return v.GRPCEndpoints
}

// Addrs are the addresses of one protocol (REST or GRPC).
func (v *Version) Addrs(protocol string) []string {
	if protocol == GRPC {
		return v.GRPCAddrs()
	}
	return v.RESTEndpoints()
}

// AllEndpoints are every address of the version, REST then gRPC.
func (v *Version) AllEndpoints() []string {
	return append(append([]string(nil), v.Endpoints...), v.GRPCEndpoints...)
}

// Serves reports whether the version has an endpoint for the protocol.
func (v *Version) Serves(protocol string) bool { return len(v.Addrs(protocol)) > 0 }

// HasShare reports whether a version may be given requests without naming it: a share of
// the baseline split or an arm of an experiment.
func (r *Rollout) HasShare(version string) bool {
	if r.Traffic[version] > 0 {
		return true
	}
	for _, e := range r.Experiments {
		for _, a := range e.Arms {
			if a.Version == version {
				return true
			}
		}
	}
	return false
}

// Serves reports whether the model serves a protocol: every version with a share (see
// HasShare) has an endpoint for it. A request of a protocol the model does not serve is
// answered by Envoy with an OIP error; versions without a share that serve it are still
// reachable by name (x-patchbay-version, pinned paths) and as shadows.
func (r *Rollout) Serves(protocol string) bool {
	shared := false
	for i := range r.Versions {
		v := &r.Versions[i]
		if !r.HasShare(v.Name) {
			continue
		}
		shared = true
		if !v.Serves(protocol) {
			return false
		}
	}
	return shared
}

// Version returns the named version, or nil.
func (r *Rollout) Version(name string) *Version {
	for i := range r.Versions {
		if r.Versions[i].Name == name {
			return &r.Versions[i]
		}
	}
	return nil
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
