// Package onnxbench benchmarks the onnx runtime behind the model host (bench_test.go,
// cgo build only; README.md lists the command and the metrics).
package onnxbench
