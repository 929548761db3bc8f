package modelhost

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

// versionSpec is one parsed models/<model>/<version>/model.yaml.
type versionSpec struct {
	Model, Version string
	Dir            string
	Runtime        string
	Artifact       string // path
	Default        bool
	Inputs         []tensor.Meta
	Outputs        []tensor.Meta
	// OutputBuckets holds, by output, the bounds of its patchbay_modelhost_output
	// histogram from outputs[].buckets (nil: DefaultOutputBuckets).
	OutputBuckets [][]float64
	MaxBatch      int           // 0: no dynamic batching
	MaxDelay      time.Duration // batching delay
	Instances     int
	MaxQueue      int // batch queue bound (0: batch.DefaultQueueSize)
	// Features (issue 15) fill the inputs in FeatureInputs when the client leaves them
	// out; FeatureEntity is the header naming the entity of store features.
	Features      []featureSpec
	FeatureInputs []featureInput
	FeatureEntity string
}

type yamlTensor struct {
	Name     string  `yaml:"name"`
	Datatype string  `yaml:"datatype"`
	Shape    []int64 `yaml:"shape"`
	// Buckets (outputs only): upper bounds of the output's value histogram, ascending
	// and finite; +Inf is implied.
	Buckets []float64 `yaml:"buckets"`
}

type yamlSpec struct {
	Runtime  string       `yaml:"runtime"`
	Artifact string       `yaml:"artifact"`
	Default  bool         `yaml:"default"`
	Inputs   []yamlTensor `yaml:"inputs"`
	Outputs  []yamlTensor `yaml:"outputs"`
	Batching *struct {
		MaxBatchSize int    `yaml:"max_batch_size"`
		MaxDelay     string `yaml:"max_delay"`
		Instances    int    `yaml:"instances"`
		MaxQueue     int    `yaml:"max_queue"`
	} `yaml:"batching"`
	Features []yamlFeature `yaml:"features"`
	// ONNX holds the onnx runtime's session options; modelhost/runtime/onnx reads and
	// checks them from model.yaml itself (with file:line), so they are only allowed here.
	ONNX yaml.Node `yaml:"onnx"`
}

var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$`)

// lineOf finds the line of a field path ("inputs", 0, "datatype") in a YAML document,
// falling back to the closest enclosing node.
func lineOf(root *yaml.Node, path ...any) int {
	n := root
	if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
		n = n.Content[0]
	}
	line := n.Line
	for _, p := range path {
		var next *yaml.Node
		switch k := p.(type) {
		case string:
			if n.Kind == yaml.MappingNode {
				for i := 0; i+1 < len(n.Content); i += 2 {
					if n.Content[i].Value == k {
						line = n.Content[i].Line
						next = n.Content[i+1]
					}
				}
			}
		case int:
			if n.Kind == yaml.SequenceNode && k < len(n.Content) {
				next = n.Content[k]
				line = next.Line
			}
		}
		if next == nil {
			return line
		}
		n = next
	}
	return line
}

// loadSpec reads and checks one model.yaml; every problem is reported with file:line.
func loadSpec(dir, model, version string, runtimes []string) (*versionSpec, error) {
	file := filepath.Join(dir, "model.yaml")
	raw, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", file, err)
	}
	var y yamlSpec
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	dec.KnownFields(true)
	if err := dec.Decode(&y); err != nil {
		return nil, yamlError(file, err)
	}
	var root yaml.Node
	_ = yaml.Unmarshal(raw, &root) // decoded fine above
	var errs []error
	bad := func(path []any, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s:%d: %s", file, lineOf(&root, path...), fmt.Sprintf(format, args...)))
	}
	s := &versionSpec{Model: model, Version: version, Dir: dir, Runtime: y.Runtime, Default: y.Default}
	if y.Runtime == "" {
		bad(nil, "runtime: missing")
	} else if runtimes != nil && !slices.Contains(runtimes, y.Runtime) {
		bad([]any{"runtime"}, "runtime %q unknown (have %s)", y.Runtime, strings.Join(runtimes, ", "))
	}
	art := y.Artifact
	if art == "" {
		art = "model.json"
	}
	if filepath.IsAbs(art) || strings.Contains(filepath.ToSlash(art), "..") {
		bad([]any{"artifact"}, "artifact: %q must be a file name inside the version directory", art)
	}
	s.Artifact = filepath.Join(dir, art)
	conv := func(field string, in []yamlTensor) []tensor.Meta {
		if len(in) == 0 {
			bad([]any{field}, "%s: at least one tensor required", field)
		}
		seen := map[string]bool{}
		out := make([]tensor.Meta, 0, len(in))
		for i, t := range in {
			dt, ok := tensor.ParseDatatype(t.Datatype)
			switch {
			case t.Name == "":
				bad([]any{field, i}, "%s[%d].name: missing", field, i)
			case seen[t.Name]:
				bad([]any{field, i, "name"}, "%s[%d].name: %q twice", field, i, t.Name)
			}
			seen[t.Name] = true
			if !ok {
				bad([]any{field, i, "datatype"}, "%s[%d].datatype: %q is not an OIP datatype", field, i, t.Datatype)
			}
			if len(t.Shape) == 0 {
				bad([]any{field, i, "shape"}, "%s[%d].shape: missing", field, i)
			}
			for j, d := range t.Shape {
				if d < -1 || d == 0 {
					bad([]any{field, i, "shape", j}, "%s[%d].shape[%d]: %d, want -1 or a positive size", field, i, j, d)
				}
			}
			out = append(out, tensor.Meta{Name: t.Name, Datatype: dt, Shape: t.Shape})
			if t.Buckets == nil {
				continue
			}
			if field != "outputs" {
				bad([]any{field, i, "buckets"}, "%s[%d].buckets: only outputs have a value histogram", field, i)
				continue
			}
			checkBuckets(t.Buckets, func(j int, format string, args ...any) {
				path := []any{field, i, "buckets"}
				if j >= 0 {
					path = append(path, j)
				}
				bad(path, "%s[%d].buckets%s", field, i, fmt.Sprintf(format, args...))
			})
		}
		return out
	}
	s.Inputs = conv("inputs", y.Inputs)
	s.Outputs = conv("outputs", y.Outputs)
	for _, t := range y.Outputs {
		s.OutputBuckets = append(s.OutputBuckets, t.Buckets)
	}
	if b := y.Batching; b != nil {
		if b.MaxBatchSize < 1 {
			bad([]any{"batching", "max_batch_size"}, "batching.max_batch_size: %d, want >= 1", b.MaxBatchSize)
		}
		d, err := time.ParseDuration(b.MaxDelay)
		if err != nil || d < 0 || d > time.Second {
			bad([]any{"batching", "max_delay"}, "batching.max_delay: %q, want a duration between 0 and 1s (e.g. 500us)", b.MaxDelay)
		}
		if b.Instances < 0 {
			bad([]any{"batching", "instances"}, "batching.instances: %d, want >= 0", b.Instances)
		}
		if b.MaxQueue < 0 || b.MaxQueue > 1<<20 {
			bad([]any{"batching", "max_queue"}, "batching.max_queue: %d, want 0 (default 1024) to 1048576", b.MaxQueue)
		}
		s.MaxBatch, s.MaxDelay, s.Instances, s.MaxQueue = b.MaxBatchSize, d, b.Instances, b.MaxQueue
		// Batching concatenates along the first dimension only.
		for _, group := range []struct {
			field string
			ts    []tensor.Meta
		}{{"inputs", s.Inputs}, {"outputs", s.Outputs}} {
			for i, t := range group.ts {
				if len(t.Shape) == 0 || t.Shape[0] != -1 {
					bad([]any{group.field, i, "shape"}, "%s[%d].shape: batching needs a variable first dimension (-1)", group.field, i)
					continue
				}
				for _, d := range t.Shape[1:] {
					if d == -1 {
						bad([]any{group.field, i, "shape"}, "%s[%d].shape: batching needs fixed dimensions after the first", group.field, i)
						break
					}
				}
			}
		}
	}
	s.Features, s.FeatureInputs, s.FeatureEntity = checkFeatures(y.Features, s.Inputs, bad)
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return s, nil
}

// maxOutputBuckets bounds an output histogram's buckets (each is a series per version
// and traffic in every scrape).
const maxOutputBuckets = 64

// checkBuckets reports bounds that are not finite, not strictly ascending, or too many.
func checkBuckets(b []float64, bad func(j int, format string, args ...any)) {
	if len(b) == 0 {
		bad(-1, ": empty; leave it out for the default (20 equal buckets over [0, 1])")
		return
	}
	if len(b) > maxOutputBuckets {
		bad(-1, ": %d bounds, at most %d", len(b), maxOutputBuckets)
		return
	}
	for j, x := range b {
		switch {
		case math.IsNaN(x) || math.IsInf(x, 0):
			bad(j, "[%d]: %v, want a finite bound (+Inf is implied)", j, x)
		case j > 0 && !(x > b[j-1]):
			bad(j, "[%d]: %v, want strictly ascending bounds (after %v)", j, x, b[j-1])
		}
	}
}

var lineRE = regexp.MustCompile(`^(?:yaml: )?line (\d+): `)

// yamlError rewrites yaml's errors as "file:line: message", one per problem.
func yamlError(file string, err error) error {
	var msgs []string
	var te *yaml.TypeError
	if errors.As(err, &te) {
		msgs = te.Errors
	} else {
		msgs = []string{err.Error()}
	}
	errs := make([]error, 0, len(msgs))
	for _, m := range msgs {
		m = typeSuffixRE.ReplaceAllString(m, "")
		if sm := lineRE.FindStringSubmatch(m); sm != nil {
			errs = append(errs, fmt.Errorf("%s:%s: %s", file, sm[1], m[len(sm[0]):]))
		} else {
			errs = append(errs, fmt.Errorf("%s: %s", file, strings.TrimPrefix(m, "yaml: ")))
		}
	}
	return errors.Join(errs...)
}

var typeSuffixRE = regexp.MustCompile(` (in|into) (type )?[\w.\[\]*]*(modelhost|contract)\.\w+`)

// versionLess orders version names naturally: v7 < v8 < v10, digits compared as numbers.
func versionLess(a, b string) bool {
	for a != "" && b != "" {
		da, db := digitPrefix(a), digitPrefix(b)
		if da > 0 && db > 0 {
			na, _ := strconv.ParseUint(strings.TrimLeft(a[:da], "0")+"0", 10, 64)
			nb, _ := strconv.ParseUint(strings.TrimLeft(b[:db], "0")+"0", 10, 64)
			if na != nb {
				return na < nb
			}
			a, b = a[da:], b[db:]
			continue
		}
		if a[0] != b[0] {
			return a[0] < b[0]
		}
		a, b = a[1:], b[1:]
	}
	return len(a) < len(b)
}

func digitPrefix(s string) int {
	i := 0
	for i < len(s) && i < 18 && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	return i
}
