package modelhost

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.yaml.in/yaml/v3"

	"github.com/patchbay-io/patchbay/api/contract"
	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

// Service contracts (issue 15): <repository>/<model>/contract.yaml declares the inputs and
// outputs the model's clients depend on, in the format of a rollout's contract field. The
// control plane holds a version whose metadata breaks it; the host, as defence in depth,
// refuses requests whose inputs break it before the runtime runs, and says in its metadata
// which inputs a request may leave out.

// contractFile is a model's contract in the repository, beside its version directories.
const contractFile = "contract.yaml"

// loadContract reads dir/contract.yaml: nil, nil when there is none. Every problem is
// reported as contract.yaml's file:line.
func loadContract(dir string) (*contract.Contract, error) {
	file := filepath.Join(dir, contractFile)
	raw, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", file, err)
	}
	return ParseContract(file, raw)
}

// ParseContract decodes and checks a model's contract.yaml as the host does when it loads
// the model (for tools that check a repository before a host reads it): every problem is
// an error "file:line: field: message".
func ParseContract(file string, raw []byte) (*contract.Contract, error) {
	var c contract.Contract
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("%s:1: empty; a contract lists inputs and/or outputs (name, datatype, shape with -1 for a variable dimension)", file)
		}
		return nil, linePerError(yamlError(file, err))
	}
	fes := contract.Validate(&c)
	if len(fes) == 0 {
		return &c, nil
	}
	// The node tree only places the errors: a valid contract is parsed once.
	var root yaml.Node
	_ = yaml.Unmarshal(raw, &root) // decoded fine above
	errs := make([]error, 0, len(fes))
	for _, fe := range fes {
		msg := fe.Msg
		if fe.Field != "" {
			msg = fe.Field + ": " + msg
		}
		errs = append(errs, fmt.Errorf("%s:%d: %s", file, lineOf(&root, fieldPath(fe.Field)...), msg))
	}
	return nil, errors.Join(errs...)
}

// linePerError keeps one problem per line: yaml quotes the offending value in its
// message, newlines included.
func linePerError(err error) error {
	j, ok := err.(interface{ Unwrap() []error })
	if !ok {
		return err
	}
	esc := strings.NewReplacer("\r", `\r`, "\n", `\n`)
	errs := j.Unwrap()
	out := make([]error, len(errs))
	for i, e := range errs {
		out[i] = errors.New(esc.Replace(e.Error()))
	}
	return errors.Join(out...)
}

// fieldPath splits a contract.FieldError field ("inputs[0].shape[1]") into lineOf's path
// ("inputs", 0, "shape", 1). The field is written by contract.Validate, not by a user.
func fieldPath(field string) []any {
	var path []any
	for _, part := range strings.Split(field, ".") {
		name, rest, _ := strings.Cut(part, "[")
		if name != "" {
			path = append(path, name)
		}
		for rest != "" {
			idx, after, ok := strings.Cut(rest, "]")
			n, err := strconv.Atoi(idx)
			if !ok || err != nil {
				return path
			}
			path = append(path, n)
			rest = strings.TrimPrefix(after, "[")
		}
	}
	return path
}

// contractPlan is a model's contract as one loaded version applies it, built at load so a
// request pays only the comparisons.
type contractPlan struct {
	inputs []contractInput
	// breach is how the version's own metadata breaks the contract (nil: it keeps it). Such
	// a version still loads (the control plane holds it at zero); its index row says why.
	breach error
}

type contractInput struct {
	want contract.Tensor
	// optional: the version fills this input from its features, so a request may leave
	// it out.
	optional bool
	expected string // "FP32 [-1 4]", for the errors
	refused  metric.AddOption
}

// optionalInputs says, by signature input, whether a request may leave it out: the
// version's features fill every column of it.
func optionalInputs(spec *versionSpec) []bool {
	out := make([]bool, len(spec.Inputs))
	for _, fi := range spec.FeatureInputs {
		full := len(fi.Cols) > 0
		for _, j := range fi.Cols {
			if j < 0 {
				full = false
			}
		}
		for i := range spec.Inputs {
			if spec.Inputs[i].Name == fi.Name && full {
				out[i] = true
			}
		}
	}
	return out
}

// versionMetadata is the version's OIP model metadata as the control plane reads it.
func versionMetadata(spec *versionSpec) contract.Metadata {
	conv := func(ms []tensor.Meta, opt []bool) []contract.Tensor {
		out := make([]contract.Tensor, len(ms))
		for i, m := range ms {
			out[i] = contract.Tensor{Name: m.Name, Datatype: m.Datatype.String(), Shape: m.Shape}
			if opt != nil {
				o := opt[i]
				out[i].Optional = &o
			}
		}
		return out
	}
	return contract.Metadata{Inputs: conv(spec.Inputs, optionalInputs(spec)), Outputs: conv(spec.Outputs, nil)}
}

// applyContract sets (or clears, c nil) the contract a ready version applies to requests.
// A version whose metadata breaks c still serves; the breach is logged and shown in the
// repository index.
func (s *Server) applyContract(v *version, c *contract.Contract) {
	if !v.ready() || c == nil {
		v.contract.Store(nil)
		return
	}
	p := &contractPlan{breach: contract.Check(c, versionMetadata(v.spec))}
	optional := map[string]bool{}
	opt := optionalInputs(v.spec)
	for i := range v.spec.Inputs {
		optional[v.spec.Inputs[i].Name] = opt[i]
	}
	for _, w := range c.Inputs {
		p.inputs = append(p.inputs, contractInput{want: w, optional: optional[w.Name],
			expected: w.Datatype + " " + fmt.Sprint(w.Shape),
			refused: metric.WithAttributeSet(attribute.NewSet(attribute.String("model", v.spec.Model),
				attribute.String("version", v.spec.Version), attribute.String("input", w.Name)))})
	}
	if p.breach != nil {
		s.log.Warn().Str("model", v.spec.Model).Str("version", v.spec.Version).Str("breach", oneLine(p.breach)).
			Msg("version's metadata breaks the model's contract.yaml; it loads (the control plane holds it at zero), and requests are checked against the contract")
	}
	v.contract.Store(p)
}

// contractReason is the repository index's reason for a ready version that breaks its
// model's contract ("" when it keeps it or there is none).
func (v *version) contractReason() string {
	if p := v.contract.Load(); p != nil && p.breach != nil {
		return "breaks " + contractFile + ": " + oneLine(p.breach)
	}
	return ""
}

func oneLine(err error) string { return strings.ReplaceAll(err.Error(), "\n", "; ") }

// checkContract refuses a request whose inputs (as the client sent them, before feature
// assembly) break the contract: a contracted input must be present, unless the version
// fills it from its features, and conform to the contracted datatype and shape.
func (s *Server) checkContract(ctx context.Context, p *contractPlan, in []*tensor.Tensor) *apiError {
	for i := range p.inputs {
		ci := &p.inputs[i]
		var found *tensor.Tensor
		for _, t := range in {
			if t.Name == ci.want.Name {
				found = t
				break
			}
		}
		if found == nil {
			if ci.optional {
				continue
			}
			s.inst.contractRefusals.Add(ctx, 1, ci.refused)
			return errInvalid("input %q is missing; the contract requires it (expected %s)", ci.want.Name, ci.expected)
		}
		if err := contract.Conforms("input", ci.want, found.Datatype.String(), found.Shape); err != nil {
			s.inst.contractRefusals.Add(ctx, 1, ci.refused)
			msg := oneLine(err)
			if !strings.Contains(msg, "(expected ") {
				msg += " (expected " + ci.expected + ")"
			}
			return errInvalid("%s", msg)
		}
	}
	return nil
}

// failedVersion is a version that cannot load for a reason of its model (a bad
// contract.yaml): not ready, with err as its reason.
func (s *Server) failedVersion(name, vname, dir string, err error) *version {
	v := &version{drained: make(chan struct{}), servedBy: []string{name + "/" + vname}, err: err}
	v.attrs = s.inst.versionAttrs(name, vname)
	v.spec = &versionSpec{Model: name, Version: vname, Dir: dir}
	return v
}
