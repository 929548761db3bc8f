// Package builtin lists the runtimes shipped with the model host, by the name used in
// model.yaml's runtime field.
package builtin

import (
	"github.com/patchbay-io/patchbay/modelhost/runtime"
	"github.com/patchbay-io/patchbay/modelhost/runtime/embedding"
	"github.com/patchbay-io/patchbay/modelhost/runtime/linear"
	"github.com/patchbay-io/patchbay/modelhost/runtime/xgboost"
)

// Loaders returns a fresh map of the built-in runtimes.
func Loaders() map[string]runtime.Loader {
	return map[string]runtime.Loader{
		"xgboost":   xgboost.Load,
		"linear":    linear.Load,
		"embedding": embedding.Load,
	}
}
