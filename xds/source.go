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
type ProblemReporter interface {
	Report(ctx context.Context, problems map[string][]*rollout.Error, configVersion string)
}
