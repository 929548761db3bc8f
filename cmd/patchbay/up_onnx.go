package main

import (
	"fmt"
	"slices"
	"strings"

	"github.com/patchbay-io/patchbay/modelhost/runtime/onnx"
)

// fraudREST is the tour's fraud request: one payment's six features.
const fraudREST = `{"inputs":[{"name":"x","datatype":"FP32","shape":[1,6],"data":[1.2,-0.3,0.8,1.5,0,0.4]}]}`

// printONNXTry adds the tour's lines for the example whose two versions are the same task
// in two runtimes (fraud: v1 XGBoost, v2 an ONNX MLP), asked directly on their hosts, when
// the example directory has it. Without the ONNX Runtime library (or in the static build),
// it says how to get it instead of printing a line that would fail.
func (u *upRun) printONNXTry(b *strings.Builder, curl string) {
	c := u.cfg
	if !u.hasModel("fraud") || len(c.hostHTTP) < 2 {
		return
	}
	fmt.Fprintf(b, "  # fraud, one task two ways (50/50): v1 XGBoost on host a, v2 an ONNX MLP run by ONNX Runtime on host b\n")
	fmt.Fprintf(b, "  %s -s -d '%s' %s/v2/models/fraud/versions/v1/infer\n", curl, fraudREST, u.url(c.hostHTTP[0], ""))
	if _, err := onnx.FindLibrary(""); err != nil || !onnx.Available {
		fmt.Fprintf(b, "  # (fraud v2 is unavailable here: the ONNX runtime needs the cgo build and the library; `make onnxruntime`)\n")
		return
	}
	fmt.Fprintf(b, "  %s -s -d '%s' %s/v2/models/fraud/versions/v2/infer\n", curl, fraudREST, u.url(c.hostHTTP[1], ""))
}

// hasModel reports whether the example's rollouts, as hostRepositories loaded them,
// name model.
func (u *upRun) hasModel(model string) bool {
	return slices.Contains(u.models, model)
}
