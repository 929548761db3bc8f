// Package onnx runs ONNX models on ONNX Runtime (the real library, loaded at run time
// through github.com/yalue/onnxruntime_go). This file is the part shared by both builds:
// where the library is found and model.yaml's session options; onnx.go (cgo) is the
// runtime, nocgo.go the stub a static (CGO_ENABLED=0) binary registers instead.
package onnx

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"go.yaml.in/yaml/v3"
)

// Version is the ONNX Runtime release onnxruntime_go v1.27.0 is made for (its C API
// headers); `make onnxruntime` installs this one.
const Version = "1.24.1"

// LibraryName is the file scripts/onnxruntime.sh installs.
const LibraryName = "libonnxruntime.so." + Version

// EnvLibrary names the library when no flag does.
const EnvLibrary = "PATCHBAY_ONNXRUNTIME_LIB"

// repoLocal is where `make onnxruntime` puts the library, relative to the repository.
var repoLocal = filepath.Join(".cache", "onnxruntime", "lib", LibraryName)

// Config configures the runtime.
type Config struct {
	// Library is the ONNX Runtime shared library (--onnxruntime-lib). Empty: $EnvLibrary,
	// else .cache/onnxruntime/lib/LibraryName in the working directory or a parent.
	Library string
}

// howToGet ends every "library missing" error.
const howToGet = "run `make onnxruntime` in the patchbay repository (it fetches ONNX Runtime " + Version +
	" into .cache/onnxruntime/lib), or pass --onnxruntime-lib PATH / set " + EnvLibrary + "=PATH to a libonnxruntime.so " + Version

// FindLibrary resolves the library path: explicit, then $PATCHBAY_ONNXRUNTIME_LIB, then
// the repository-local copy. The error says how to get the library.
func FindLibrary(explicit string) (string, error) {
	for _, c := range []struct{ path, from string }{{explicit, "--onnxruntime-lib"}, {os.Getenv(EnvLibrary), "$" + EnvLibrary}} {
		if c.path == "" {
			continue
		}
		if _, err := os.Stat(c.path); err != nil {
			return "", fmt.Errorf("ONNX Runtime library %s (from %s): %w; %s", c.path, c.from, err, howToGet)
		}
		return c.path, nil
	}
	dir, err := os.Getwd()
	if err == nil {
		for {
			p := filepath.Join(dir, repoLocal)
			if _, err := os.Stat(p); err == nil {
				return p, nil
			}
			parent := filepath.Dir(dir)
			if parent == dir {
				break
			}
			dir = parent
		}
	}
	return "", errors.New("ONNX Runtime library not found: " + howToGet)
}

// Options are model.yaml's onnx: session options.
type Options struct {
	// IntraOpThreads: threads one operator may use (0: ONNX Runtime's default, one per
	// core). Default 1: the host runs requests concurrently, and at batch 1 to 64 on the
	// MLP one thread per request measured fastest (README).
	IntraOpThreads int
	// InterOpThreads: threads running independent operators in parallel (default 1).
	InterOpThreads int
	// GraphOptimization: disable, basic, extended or all (default all).
	GraphOptimization string
}

// DefaultOptions are the measured defaults (README "Session options").
func DefaultOptions() Options {
	return Options{IntraOpThreads: 1, InterOpThreads: 1, GraphOptimization: "all"}
}

// ReadOptions reads the onnx: section of dir/model.yaml; problems come with file:line.
func ReadOptions(dir string) (Options, error) {
	file := filepath.Join(dir, "model.yaml")
	raw, err := os.ReadFile(file)
	if err != nil {
		return DefaultOptions(), fmt.Errorf("read %s: %w", file, err)
	}
	return parseOptions(file, raw)
}

// parseOptions reads the onnx: section of a model.yaml's bytes; file names it in errors.
func parseOptions(file string, raw []byte) (Options, error) {
	o := DefaultOptions()
	var root yaml.Node
	if err := yaml.Unmarshal(raw, &root); err != nil {
		return o, fmt.Errorf("%s: %w", file, err)
	}
	if len(root.Content) == 0 || root.Content[0].Kind != yaml.MappingNode {
		return o, nil
	}
	top := root.Content[0]
	var sec *yaml.Node
	for i := 0; i+1 < len(top.Content); i += 2 {
		if top.Content[i].Value == "onnx" {
			sec = top.Content[i+1]
		}
	}
	if sec == nil || sec.Kind == yaml.ScalarNode && sec.Tag == "!!null" {
		return o, nil
	}
	if sec.Kind != yaml.MappingNode {
		return o, fmt.Errorf("%s:%d: onnx: want a mapping of session options (intra_op_threads, inter_op_threads, graph_optimization_level)", file, sec.Line)
	}
	var errs []error
	for i := 0; i+1 < len(sec.Content); i += 2 {
		k, v := sec.Content[i], sec.Content[i+1]
		bad := func(format string, args ...any) {
			errs = append(errs, fmt.Errorf("%s:%d: onnx.%s: %s", file, v.Line, k.Value, fmt.Sprintf(format, args...)))
		}
		switch k.Value {
		case "intra_op_threads", "inter_op_threads":
			n, err := strconv.Atoi(v.Value)
			if v.Kind != yaml.ScalarNode || err != nil || n < 0 || n > 256 {
				bad("%q, want a thread count from 0 (ONNX Runtime's default: one per core) to 256", v.Value)
				continue
			}
			if k.Value == "intra_op_threads" {
				o.IntraOpThreads = n
			} else {
				o.InterOpThreads = n
			}
		case "graph_optimization_level":
			switch v.Value {
			case "disable", "basic", "extended", "all":
				o.GraphOptimization = v.Value
			default:
				bad("%q, want disable, basic, extended or all", v.Value)
			}
		default:
			errs = append(errs, fmt.Errorf("%s:%d: onnx.%s: unknown session option (have intra_op_threads, inter_op_threads, graph_optimization_level)", file, k.Line, k.Value))
		}
	}
	return o, errors.Join(errs...)
}
