// Package headers holds the wire contract between patchbay's parts: the HTTP header
// names that clients, Envoy, ext_proc and the model hosts agree on
// (shared/design.md, "Headers"). It is the one place these strings are spelled.
package headers

const (
	// UserID is the default identity header for sticky assignment.
	UserID = "x-user-id"
	// Model names the model on paths that do not carry it (gRPC OIP).
	Model = "x-patchbay-model"
	// Bucket is the decimal uint64 salted hash of (model, identity) set by ext_proc;
	// Envoy's WeightedCluster.header_name reads it as the random value.
	Bucket = "x-patchbay-bucket"
	// Version is set by ext_proc when an experiment arm (or an allowed pin) decides the
	// version, and by Envoy per weighted cluster so a shared host knows what to run.
	Version = "x-patchbay-version"
	// Experiments lists "name=arm,name=arm" exposures; Envoy echoes it on the response.
	Experiments = "x-patchbay-experiments"
	// ServedBy is the response header "model/version" that Envoy adds.
	ServedBy = "x-patchbay-served-by"
	// RouteKey is set by Envoy's early header mutation to "<:path>/<x-patchbay-model>/"
	// (after removing any client-sent value); Envoy's scoped routes read the scope key
	// (model) from it. Not in Stripped: the mutation removes it itself, first, and every
	// model route removes it before the upstream.
	RouteKey = "x-patchbay-route-key"
	// Prefix is common to every patchbay header.
	Prefix = "x-patchbay-"
)

// Stripped lists the patchbay headers a client may not set: ext_proc and Envoy's
// header_mutation filter remove them before routing. Model is not among them.
var Stripped = []string{Bucket, Version, Experiments, ServedBy}

// GRPCInferencePrefix is the path prefix of OIP over gRPC.
const GRPCInferencePrefix = "/inference.GRPCInferenceService/"
