// Package v1 is the Rollout custom resource (patchbay.io/v1, kind Rollout): the rollout
// file format as a Kubernetes API object. Spec has exactly the file format's fields with the
// same names (xds/rollout is their reference and the loader that validates them); status is
// the model's durable state (xds/store.ModelState) plus what `kubectl get` and operators read.
//
// The CRD (charts/patchbay/crds/rollouts.patchbay.io.yaml) and zz_generated.deepcopy.go are
// generated from these types by `make generate` (controller-gen); a test fails when either
// is stale or when a spec field's name drifts from the file format's.
//
// +kubebuilder:object:generate=true
// +groupName=patchbay.io
package v1
