package onnx

import (
	"strings"
	"testing"
)

// FuzzParseOptions: any model.yaml either gives options within their ranges or fails
// with file:line, never a panic.
func FuzzParseOptions(f *testing.F) {
	f.Add("onnx: {intra_op_threads: 2, inter_op_threads: 1, graph_optimization_level: basic}\n")
	f.Add("runtime: onnx\nonnx:\n  threads: 2\n")
	f.Add("onnx: 3\n")
	f.Add("onnx:\n  intra_op_threads: [1]\n")
	f.Add("- a\n")
	f.Fuzz(func(t *testing.T, y string) {
		o, err := parseOptions("model.yaml", []byte(y))
		if err != nil {
			if !strings.HasPrefix(err.Error(), "model.yaml") {
				t.Fatalf("error without the file: %v", err)
			}
			return
		}
		if o.IntraOpThreads < 0 || o.IntraOpThreads > 256 || o.InterOpThreads < 0 || o.InterOpThreads > 256 {
			t.Fatalf("threads out of range: %+v", o)
		}
		switch o.GraphOptimization {
		case "disable", "basic", "extended", "all":
		default:
			t.Fatalf("level %q", o.GraphOptimization)
		}
	})
}
