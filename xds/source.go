package xds

import (
	"context"

	"github.com/patchbay-io/patchbay/xds/rollout"
)

// Source is where rollouts come from: a directory of files (the default, from
// Config.RolloutsDir) or the Kubernetes API (xds/kube, Rollout custom resources). After
// Read, both go through the same loader and rules (rollout.LoadData, translate.Build).
type Source interface {
	// Watch calls ready once it is watching, then changed whenever the rollouts may have
	// changed, until ctx ends.
	Watch(ctx context.Context, ready func(), changed func()) error
	// Read returns the current rollout documents. settled is false while they are still
	// changing (a later change notification reads them again).
	Read(ctx context.Context) (files []rollout.File, settled bool, err error)
	// Describe names the source in logs and /status (a directory, "kubernetes namespace X").
	Describe() string
}

// ProblemReporter is implemented by a Source that can show each document's problems
// where its author looks (a Rollout's status.conditions). Report is called after every
// reload with the problems found per document (keyed by rollout.File.Path; no entry: the
// document is fine and applied) and the config version served.
//
// A reload failure tied to no one document (the translation rejected, a version with a share
// whose endpoints do not resolve, an empty set refused, the Store unusable) is reported
// under AllDocuments: every document's author should know that what they wrote is not
// served.
type ProblemReporter interface {
	Report(ctx context.Context, problems map[string][]*rollout.Error, configVersion string)
}

// AllDocuments is the ProblemReporter key of a reload failure tied to no one document; its
// problem is a *rollout.Error with only Msg set.
const AllDocuments = ""
