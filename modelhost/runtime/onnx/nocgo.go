//go:build !cgo

package onnx

import (
	"errors"

	"github.com/patchbay-io/patchbay/modelhost/runtime"
)

// Available is false in a build without cgo: no onnx model can load.
const Available = false

// errNoCgo is every load's answer in a static build.
var errNoCgo = errors.New("onnx runtime: this binary was built without cgo: the onnx runtime needs the cgo build (see modelhost/runtime/onnx/README.md)")

// Loader returns the stub runtime of a build without cgo: every load fails saying why.
func Loader(Config) runtime.Loader {
	return func(runtime.Spec) (runtime.Model, error) { return nil, errNoCgo }
}

// Load is Loader(Config{}).
func Load(spec runtime.Spec) (runtime.Model, error) { return Loader(Config{})(spec) }
