package v1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Rollout is the desired traffic state of one model: patchbay's rollout file format as a
// namespaced Kubernetes object. The API server checks only what is cheap to state in a
// schema (types, ranges, enums); the control plane applies the file format's full rules and
// reports their problems in status.conditions, by field path.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Namespaced,shortName=pbro,categories=patchbay
// +kubebuilder:printcolumn:name="Model",type=string,JSONPath=`.status.model`
// +kubebuilder:printcolumn:name="Split",type=string,JSONPath=`.status.split`
// +kubebuilder:printcolumn:name="State",type=string,JSONPath=`.status.state`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type Rollout struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   RolloutSpec   `json:"spec"`
	Status RolloutStatus `json:"status,omitempty"`
}

// RolloutSpec has the rollout file format's fields, with the same names and meaning
// (apiVersion and kind are the object's own).
type RolloutSpec struct {
	// Model is the logical name clients call. Default: the object's metadata.name.
	// +optional
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`
	Model string `json:"model,omitempty"`
	// Versions are the model's deployed artifacts.
	// +kubebuilder:validation:MinItems=1
	Versions []ModelVersion `json:"versions"`
	// Traffic is the baseline split: version -> percent, summing to 100.
	Traffic map[string]int `json:"traffic"`
	// Shadow mirrors fractions of the requests to versions; their responses are discarded.
	// +optional
	Shadow []Shadow `json:"shadow,omitempty"`
	// Experiments are evaluated in order; the first one a user is in decides the version.
	// +optional
	Experiments []Experiment `json:"experiments,omitempty"`
	// Timeout is the per-model request timeout ("2s", "150ms").
	// +optional
	// +kubebuilder:validation:Type=string
	// +kubebuilder:validation:Pattern=`^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$`
	Timeout *metav1.Duration `json:"timeout,omitempty"`
	// Retries is the number of retries per request.
	// +optional
	// +kubebuilder:validation:Minimum=0
	Retries *int `json:"retries,omitempty"`
	// Pinning honours client paths that name a version (/v2/models/<m>/versions/<v>/...).
	// +optional
	Pinning bool `json:"pinning,omitempty"`
	// BodyMode asks ext_proc to read the buffered request body (identity or model in the
	// OIP JSON "parameters"); it costs a body round trip per request.
	// +optional
	BodyMode bool `json:"bodyMode,omitempty"`
	// Analysis ramps a canary through steps of its share, judging it against a baseline
	// at each step (the file format's analysis section).
	// +optional
	Analysis *Analysis `json:"analysis,omitempty"`
	// Contract is what the model's clients depend on (the file format's contract): the
	// control plane holds at zero every version whose OIP model metadata breaks it.
	// +optional
	Contract *Contract `json:"contract,omitempty"`
}

// Contract mirrors the file format's contract: the inputs and outputs clients depend on.
type Contract struct {
	// +optional
	Inputs []Tensor `json:"inputs,omitempty"`
	// +optional
	Outputs []Tensor `json:"outputs,omitempty"`
}

// Tensor is one contracted input or output (shape: -1 for a variable dimension).
type Tensor struct {
	// +kubebuilder:validation:MinLength=1
	Name string `json:"name"`
	// +kubebuilder:validation:MinLength=1
	Datatype string `json:"datatype"`
	// +kubebuilder:validation:MinItems=1
	Shape []int64 `json:"shape"`
}

// ModelVersion is one deployed artifact of the model (the file format's versions[]).
type ModelVersion struct {
	// +kubebuilder:validation:MinLength=1
	Name string `json:"name"`
	// Endpoints are the version's OIP REST addresses (host:port), or its OIP gRPC addresses
	// when protocol is grpc.
	// +optional
	Endpoints []string `json:"endpoints,omitempty"`
	// GRPCEndpoints are the version's OIP gRPC addresses beside its REST endpoints.
	// +optional
	GRPCEndpoints []string `json:"grpcEndpoints,omitempty"`
	// Protocol is what endpoints speak. Default http.
	// +optional
	// +kubebuilder:validation:Enum=http;grpc
	Protocol string `json:"protocol,omitempty"`
	// TLS makes Envoy originate (m)TLS to the endpoints.
	// +optional
	TLS bool `json:"tls,omitempty"`
	// Host is the kind of server behind the endpoints: patchbay (default) or oip.
	// +optional
	// +kubebuilder:validation:Enum=patchbay;oip
	Host string `json:"host,omitempty"`
	// MetricsEndpoints are the host:port of the version's model hosts' admin listeners,
	// whose /metrics the control plane scrapes for an analysis with provider embedded.
	// +optional
	// +kubebuilder:validation:items:MinLength=1
	MetricsEndpoints []string `json:"metricsEndpoints,omitempty"`
}

// Analysis ramps a canary through steps of its share (the file format's analysis; its
// rules, e.g. that baseline and canary are versions of this rollout, are the control
// plane's and reported in status.conditions).
type Analysis struct {
	// Baseline is the version the canary is judged against.
	// +kubebuilder:validation:MinLength=1
	Baseline string `json:"baseline"`
	// Canary is the version ramped through the steps.
	// +kubebuilder:validation:MinLength=1
	Canary string `json:"canary"`
	// Steps are the canary's shares in percent, strictly increasing, 1..100.
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=100
	// +kubebuilder:validation:items:Minimum=1
	// +kubebuilder:validation:items:Maximum=100
	Steps []int `json:"steps"`
	// Interval is how long a step lasts at least ("30s"; 100ms..24h). Default 30s.
	// +optional
	// +kubebuilder:validation:Type=string
	// +kubebuilder:validation:Pattern=`^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$`
	Interval *metav1.Duration `json:"interval,omitempty"`
	// MinRequests is the requests each of canary and baseline must have had in a step's
	// window before a gate is judged. Default 100.
	// +optional
	// +kubebuilder:validation:Minimum=1
	MinRequests *int `json:"minRequests,omitempty"`
	// Provider is where metrics come from: embedded (default) or prometheus.
	// +optional
	// +kubebuilder:validation:Enum=embedded;prometheus
	Provider string `json:"provider,omitempty"`
	// Prometheus configures the prometheus provider.
	// +optional
	Prometheus *Prometheus `json:"prometheus,omitempty"`
	// Webhook, when set, is POSTed every decision as JSON (an http(s) URL).
	// +optional
	Webhook string `json:"webhook,omitempty"`
	// Gates are the conditions the canary must meet at each step.
	// +kubebuilder:validation:MinItems=1
	Gates []Gate `json:"gates"`
}

// Prometheus configures the prometheus provider of an analysis.
type Prometheus struct {
	// URL is the Prometheus server's http(s) URL.
	// +kubebuilder:validation:MinLength=1
	URL string `json:"url"`
	// Queries override the provider's PromQL templates by name (requests, errors,
	// latency, drift).
	// +optional
	Queries map[string]string `json:"queries,omitempty"`
}

// Gate is one condition the canary must meet over a step's window. Which fields a gate
// takes depends on its metric (the control plane checks it).
type Gate struct {
	// +kubebuilder:validation:Enum=error-rate;latency;drift;shadow-agreement
	Metric string `json:"metric"`
	// Max: error-rate: the canary's error rate (a number 0..1); latency: the quantile (a
	// duration like "250ms").
	// +optional
	// +kubebuilder:validation:Schemaless
	// +kubebuilder:pruning:PreserveUnknownFields
	Max *Threshold `json:"max,omitempty"`
	// MaxIncrease (error-rate): the canary's error rate minus the baseline's, 0..1.
	// +optional
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=1
	MaxIncrease *float64 `json:"maxIncrease,omitempty"`
	// Percentile (latency): 50..99.9.
	// +optional
	// +kubebuilder:validation:Minimum=50
	// +kubebuilder:validation:Maximum=99.9
	Percentile float64 `json:"percentile,omitempty"`
	// MaxRatio (latency): the canary's quantile over the baseline's, positive.
	// +optional
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:ExclusiveMinimum=true
	MaxRatio *float64 `json:"maxRatio,omitempty"`
	// Output (drift, shadow-agreement): an output tensor of the model.
	// +optional
	Output string `json:"output,omitempty"`
	// MaxPSI (drift): the largest population stability index allowed, positive.
	// +optional
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:ExclusiveMinimum=true
	MaxPSI *float64 `json:"maxPSI,omitempty"`
	// Min (shadow-agreement): class agreement rate 0..1 (an alias of minAgreement).
	// +optional
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=1
	Min *float64 `json:"min,omitempty"`
	// MinAgreement (shadow-agreement): class agreement rate 0..1.
	// +optional
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=1
	MinAgreement *float64 `json:"minAgreement,omitempty"`
	// MaxMeanAbsDiff (shadow-agreement): the mean absolute score difference, >= 0.
	// +optional
	// +kubebuilder:validation:Minimum=0
	MaxMeanAbsDiff *float64 `json:"maxMeanAbsDiff,omitempty"`
}

// Threshold is a gate bound as written: a JSON number (0.01) or string ("250ms"). Its
// schema accepts any value; the control plane refuses anything but a scalar.
type Threshold struct {
	// Raw is the value's JSON.
	Raw []byte `json:"-"`
}

// MarshalJSON writes the value as it was read (null when empty).
func (t Threshold) MarshalJSON() ([]byte, error) {
	if len(t.Raw) == 0 {
		return []byte("null"), nil
	}
	return t.Raw, nil
}

// UnmarshalJSON keeps the value's JSON.
func (t *Threshold) UnmarshalJSON(b []byte) error {
	t.Raw = append(t.Raw[:0], b...)
	return nil
}

// Shadow mirrors a fraction of the model's requests to a version.
type Shadow struct {
	Version string `json:"version"`
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=100
	Percent float64 `json:"percent"`
}

// Experiment assigns a slice of a layer's users to arms.
type Experiment struct {
	Name  string `json:"name"`
	Layer string `json:"layer"`
	// Allocation is the percent of the layer's users in the experiment, 0 to 100 with at
	// most two decimals; 0 pauses it.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=100
	Allocation float64 `json:"allocation"`
	// +optional
	Match *Match `json:"match,omitempty"`
	// +kubebuilder:validation:MinItems=1
	Arms []Arm `json:"arms"`
}

// Match targets an experiment on request headers: every listed header must hold one of its values.
type Match struct {
	// +optional
	Headers map[string][]string `json:"headers,omitempty"`
}

// Arm is one variant of an experiment.
type Arm struct {
	Name    string `json:"name"`
	Version string `json:"version"`
	// Weight is relative to the other arms' weights.
	// +kubebuilder:validation:Minimum=1
	Weight int `json:"weight"`
}

// Condition types, reasons and states the control plane writes to status.
const (
	// ConditionReady is True when the Rollout's spec is what the control plane serves.
	ConditionReady = "Ready"
	// ReasonApplied: the spec is served. ReasonRolledBack: the spec is served under a
	// rollback in force. ReasonInvalid: the spec breaks a rule; the last good spec stays served.
	ReasonApplied    = "Applied"
	ReasonRolledBack = "RolledBack"
	ReasonInvalid    = "Invalid"

	StateServing    = "Serving"
	StateRolledBack = "RolledBack"
	StateInvalid    = "Invalid"

	// ConditionRollbackRequest reports the outcome of the last rollback request (True,
	// reason Executed; False, reason Failed, with why).
	ConditionRollbackRequest = "RollbackRequest"
	ReasonExecuted           = "Executed"
	ReasonFailed             = "Failed"
)

// RollbackRequestAnnotation asks the control plane for a rollback through the Kubernetes
// API (`patchbay rollout rollback --kubeconfig`): its value is a JSON RollbackRequest. A
// control plane executes a value that differs from status.lastRollbackRequest, then writes
// the value there. It never edits the annotation (its Role needs no write on Rollouts).
const RollbackRequestAnnotation = "patchbay.io/rollback-request"

// RollbackRequest is the value of RollbackRequestAnnotation.
type RollbackRequest struct {
	// Version: send 100% to it (empty: the last known-good split).
	Version string `json:"version,omitempty"`
	// Release ends the rollback in force instead.
	Release bool `json:"release,omitempty"`
	// At is when the operator asked (RFC 3339, UTC); it makes every request distinct.
	At string `json:"at"`
	// By is who asked, as the API server authenticated them.
	By string `json:"by"`
}

// RolloutStatus is the model's durable state, shared by every control-plane replica (the
// fields of xds/store.ModelState, written with optimistic concurrency), and what the
// control plane reports about the spec.
type RolloutStatus struct {
	// SpecFingerprint identifies the spec Slots were laid out for.
	// +optional
	SpecFingerprint string `json:"specFingerprint,omitempty"`
	// Slots is the slot map as runs of consecutive slots per version, in slot order.
	// +optional
	Slots []SlotRun `json:"slots,omitempty"`
	// Rollback is the rollback in force, if any.
	// +optional
	Rollback *Rollback `json:"rollback,omitempty"`
	// History is the distinct splits the spec served, oldest first.
	// +optional
	History []map[string]int `json:"history,omitempty"`
	// ConfigVersion is the config version served with this state.
	// +optional
	ConfigVersion string `json:"configVersion,omitempty"`
	// Analysis is where the canary analysis of the spec stands, if it has one.
	// +optional
	Analysis *AnalysisState `json:"analysis,omitempty"`

	// Model is the model name served (spec.model, or metadata.name when that is empty).
	// +optional
	Model string `json:"model,omitempty"`
	// Split is the split in force, printable: "v7=90,v8=10".
	// +optional
	Split string `json:"split,omitempty"`
	// State is Serving, RolledBack or Invalid.
	// +optional
	// +kubebuilder:validation:Enum=Serving;RolledBack;Invalid
	State string `json:"state,omitempty"`
	// LastApplied is the last spec the control plane applied, as the rollout document it
	// rendered: while the spec is invalid, a control-plane replica that never saw it good
	// (restarted) serves this one.
	// +optional
	LastApplied string `json:"lastApplied,omitempty"`
	// LastRollbackRequest is the value of the annotation patchbay.io/rollback-request the
	// control plane last handled (`patchbay rollout rollback --kubeconfig` waits for it).
	// +optional
	LastRollbackRequest string `json:"lastRollbackRequest,omitempty"`
	// ObservedGeneration is the metadata.generation the conditions describe.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Conditions: Ready (reason Applied, RolledBack or Invalid; an Invalid message names
	// each problem's field path, e.g. "spec.traffic: sums to 90, want 100").
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// SlotRun is a stretch of consecutive slots of the slot map held by one version.
type SlotRun struct {
	Version string `json:"version"`
	Slots   int    `json:"slots"`
}

// Rollback is a rollback in force.
type Rollback struct {
	// Traffic is the split in force (version -> percent).
	Traffic map[string]int `json:"traffic"`
	// Reason says why.
	// +optional
	Reason string `json:"reason,omitempty"`
	// At is when it was taken.
	// +optional
	At metav1.Time `json:"at,omitempty"`
	// FromIndex is the history index of the split it restored; -1 for a named version.
	FromIndex int `json:"fromIndex"`
	// SpecFingerprint identifies the spec the rollback was taken on.
	// +optional
	SpecFingerprint string `json:"specFingerprint,omitempty"`
}

// AnalysisState is where a canary analysis of one spec stands (xds/store.AnalysisState).
type AnalysisState struct {
	// SpecFingerprint is the spec it runs on: another spec starts it again at step 0.
	SpecFingerprint string `json:"specFingerprint"`
	// Step is the index of the current step in spec.analysis.steps.
	// +kubebuilder:validation:Minimum=0
	Step int `json:"step"`
	// StepStarted is when the current step began.
	StepStarted metav1.Time `json:"stepStarted"`
	// Phase is running, waiting, succeeded or failed (no enum here: the status is the
	// control plane's own record, which the API server must not refuse).
	Phase string `json:"phase"`
	// Reason says why the phase is what it is (a wait, a failed gate).
	// +optional
	Reason string `json:"reason,omitempty"`
	// LastDecision is the last decision that changed the state.
	// +optional
	LastDecision *AnalysisDecision `json:"lastDecision,omitempty"`
}

// AnalysisDecision is one evaluation of an analysis.
type AnalysisDecision struct {
	At   metav1.Time `json:"at"`
	Step int         `json:"step"`
	// Decision is advance, wait, fail or done.
	Decision string `json:"decision"`
	// +optional
	Gates []GateResult `json:"gates,omitempty"`
}

// GateResult is one gate bound judged in a decision.
type GateResult struct {
	Metric    string  `json:"metric"`
	Value     float64 `json:"value"`
	Threshold float64 `json:"threshold"`
	Pass      bool    `json:"pass"`
}

// RolloutList is a list of Rollouts.
//
// +kubebuilder:object:root=true
type RolloutList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []Rollout `json:"items"`
}
