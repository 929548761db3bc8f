// Package builtin lists the runtimes shipped with the model host, by the name used in
// model.yaml's runtime field.
package builtin

import (
	"github.com/patchbay-io/patchbay/modelhost/runtime"
	"github.com/patchbay-io/patchbay/modelhost/runtime/embedding"
	"github.com/patchbay-io/patchbay/modelhost/runtime/linear"
	"github.com/patchbay-io/patchbay/modelhost/runtime/onnx"
	"github.com/patchbay-io/patchbay/modelhost/runtime/xgboost"
)

// Options configure the built-in runtimes that take any.
type Options struct {
	// ONNXRuntimeLib is the ONNX Runtime shared library (--onnxruntime-lib); empty:
	// $PATCHBAY_ONNXRUNTIME_LIB, then the repository's .cache/onnxruntime/lib.
	ONNXRuntimeLib string
}

// Loaders returns a fresh map of the built-in runtimes with default options.
func Loaders() map[string]runtime.Loader { return LoadersWith(Options{}) }

// LoadersWith returns a fresh map of the built-in runtimes. "onnx" loads ONNX Runtime
// on its first model only; in a build without cgo it refuses every model saying so.
func LoadersWith(o Options) map[string]runtime.Loader {
	return map[string]runtime.Loader{
		"xgboost":   xgboost.Load,
		"linear":    linear.Load,
		"embedding": embedding.Load,
		"onnx":      onnx.Loader(onnx.Config{Library: o.ONNXRuntimeLib}),
	}
}
