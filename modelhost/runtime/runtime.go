// Package runtime is the contract between the model host and a model format: a Loader
// turns a version directory into a Model, and a Model runs a batch of rows. The server
// only knows this package; a new format (ONNX, ...) is a new package with a Loader
// registered in the host's Config.Runtimes, and the server does not change.
package runtime

import (
	"context"

	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

// Model runs inference. Implementations must be safe for concurrent use.
type Model interface {
	// Predict runs the model on inputs, given in the order of Spec.Inputs and already
	// checked against it; the first dimension of every input is the batch. It returns
	// the outputs in the order of Spec.Outputs with the same first dimension.
	Predict(ctx context.Context, inputs []*tensor.Tensor) ([]*tensor.Tensor, error)
}

// Spec is what a Loader is given: where the version lives and its declared signature.
type Spec struct {
	// Dir is the version directory; Artifact the artifact's path inside it.
	Dir      string
	Artifact string
	Inputs   []tensor.Meta
	Outputs  []tensor.Meta
}

// Loader loads one model version. Its error says what is wrong with the artifact or
// with the signature declared for it.
type Loader func(spec Spec) (Model, error)
