package modelhost

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"google.golang.org/grpc/codes"

	"github.com/patchbay-io/patchbay/modelhost/internal/batch"
	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

// apiError is an error with its REST status and gRPC code.
type apiError struct {
	status int
	code   codes.Code
	msg    string
}

func (e *apiError) Error() string { return e.msg }

func errInvalid(format string, a ...any) *apiError {
	return &apiError{http.StatusBadRequest, codes.InvalidArgument, fmt.Sprintf(format, a...)}
}

func errNotFound(format string, a ...any) *apiError {
	return &apiError{http.StatusNotFound, codes.NotFound, fmt.Sprintf(format, a...)}
}

func errUnavailable(format string, a ...any) *apiError {
	return &apiError{http.StatusServiceUnavailable, codes.Unavailable, fmt.Sprintf(format, a...)}
}

// errRepositoryOffDataPath answers repository calls on the inference ports.
var errRepositoryOffDataPath = &apiError{http.StatusForbidden, codes.PermissionDenied,
	"the model repository extension (load, unload, index) is served only on the model host's admin listener (--admin), with its bearer token"}

func asAPIError(err error) *apiError {
	var ae *apiError
	if errors.As(err, &ae) {
		return ae
	}
	switch {
	case errors.Is(err, context.Canceled):
		return &apiError{499, codes.Canceled, "request canceled"}
	case errors.Is(err, context.DeadlineExceeded):
		return &apiError{http.StatusGatewayTimeout, codes.DeadlineExceeded, "deadline exceeded"}
	case errors.Is(err, batch.ErrQueueFull):
		return &apiError{http.StatusTooManyRequests, codes.ResourceExhausted, "model version's batch queue is full; retry later"}
	case errors.Is(err, batch.ErrStopped):
		return errUnavailable("model version is being unloaded")
	}
	return &apiError{http.StatusInternalServerError, codes.Internal, "inference failed: " + err.Error()}
}

// lookup finds the version to run: the named one, else the default, and marks it in
// flight. The caller must release it.
func (s *Server) lookup(name, ver string) (*version, *apiError) {
	for range 3 {
		t := s.table.Load()
		m, ok := t.models[name]
		if !ok {
			return nil, errNotFound("model %q not found", name)
		}
		var v *version
		if ver != "" {
			if v, ok = m.versions[ver]; !ok {
				return nil, errNotFound("model %q has no version %q (have %s)", name, ver, strings.Join(m.names, ", "))
			}
			if !v.ready() {
				return nil, errUnavailable("model %q version %q is not ready: %v", name, ver, v.err)
			}
		} else if v = m.def; v == nil {
			return nil, errUnavailable("model %q has no ready version", name)
		}
		if v.acquire() {
			return v, nil
		}
		// Retired between the table load and acquire: a newer table has replaced it.
	}
	return nil, errUnavailable("model %q is being reloaded; retry", name)
}

// peek finds a version without marking it in flight (metadata, readiness).
func (s *Server) peek(name, ver string) (*model, *version, *apiError) {
	m, ok := s.table.Load().models[name]
	if !ok {
		return nil, nil, errNotFound("model %q not found", name)
	}
	if ver == "" {
		if m.def == nil {
			return m, nil, errUnavailable("model %q has no ready version", name)
		}
		return m, m.def, nil
	}
	v, ok := m.versions[ver]
	if !ok {
		return m, nil, errNotFound("model %q has no version %q (have %s)", name, ver, strings.Join(m.names, ", "))
	}
	return m, v, nil
}

// complete applies the version's contract to the inputs as the client sent them, then
// appends the inputs its features fill (REST and gRPC alike). get reads a request header
// (lower-case name).
func (s *Server) complete(ctx context.Context, v *version, get func(string) string, in []*tensor.Tensor) ([]*tensor.Tensor, *apiError) {
	if p := v.contract.Load(); p != nil {
		if aerr := s.checkContract(ctx, p, in); aerr != nil {
			return nil, aerr
		}
	}
	if v.feats != nil {
		return v.feats.assemble(ctx, get, in)
	}
	return in, nil
}

// prepare orders inputs by the signature and checks each against it; it also checks
// requested output names. in is reordered into ordered (len = signature inputs).
func (s *Server) prepare(v *version, in []*tensor.Tensor, ordered []*tensor.Tensor, requested []string) ([]*tensor.Tensor, *apiError) {
	sigIn, sigOut := v.spec.Inputs, v.spec.Outputs
	ordered = ordered[:0]
	for i := range sigIn {
		meta := &sigIn[i]
		var found *tensor.Tensor
		for _, t := range in {
			if t.Name == meta.Name {
				if found != nil {
					return nil, errInvalid("input %q given twice", meta.Name)
				}
				found = t
			}
		}
		if found == nil && len(in) == 0 {
			return nil, errInvalid("no inputs (model %s/%s expects %s)", v.spec.Model, v.spec.Version, names(sigIn))
		}
		if found == nil {
			return nil, errInvalid("missing input %q (model %s/%s expects %s)", meta.Name, v.spec.Model, v.spec.Version, names(sigIn))
		}
		if err := meta.Check(found, s.cfg.MaxTensorElements); err != nil {
			return nil, errInvalid("%v", err)
		}
		ordered = append(ordered, found)
	}
	if len(in) != len(sigIn) {
		for _, t := range in {
			if !hasName(sigIn, t.Name) {
				return nil, errInvalid("unknown input %q (model %s/%s expects %s)", t.Name, v.spec.Model, v.spec.Version, names(sigIn))
			}
		}
	}
	if len(ordered) > 1 {
		for _, t := range ordered[1:] {
			if t.Shape[0] != ordered[0].Shape[0] {
				return nil, errInvalid("inputs %q and %q differ in the batch dimension (%d vs %d)", ordered[0].Name, t.Name, ordered[0].Shape[0], t.Shape[0])
			}
		}
	}
	for _, r := range requested {
		if !hasName(sigOut, r) {
			return nil, errInvalid("unknown output %q requested (model %s/%s has %s)", r, v.spec.Model, v.spec.Version, names(sigOut))
		}
	}
	return ordered, nil
}

func hasName(ms []tensor.Meta, n string) bool {
	for i := range ms {
		if ms[i].Name == n {
			return true
		}
	}
	return false
}

func names(ms []tensor.Meta) string {
	var b strings.Builder
	for i := range ms {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(ms[i].Name)
	}
	return b.String()
}

// run executes a prepared request (batched when the version batches) and returns the
// outputs named after the signature, filtered to requested (all when empty). The values
// of every output (requested or not) go to the output histograms under the request's
// traffic.
func (s *Server) run(ctx context.Context, v *version, inputs []*tensor.Tensor, requested []string, tr traffic) ([]*tensor.Tensor, error) {
	var outs []*tensor.Tensor
	var err error
	if v.batcher != nil {
		var res batch.Result
		res, err = v.batcher.Do(ctx, inputs)
		outs = res.Outputs
		if err == nil {
			s.inst.queue.Record(ctx, res.Queued.Seconds(), v.attrs.base...)
		}
	} else {
		outs, err = v.predict(ctx, inputs)
		if len(inputs) > 0 && len(inputs[0].Shape) > 0 {
			s.inst.batchRows.Record(ctx, inputs[0].Shape[0], v.attrs.base...)
		}
	}
	if err != nil {
		return nil, err
	}
	sigOut := v.spec.Outputs
	if len(outs) != len(sigOut) {
		return nil, fmt.Errorf("runtime returned %d outputs, signature has %d", len(outs), len(sigOut))
	}
	for i, o := range outs {
		o.Name = sigOut[i].Name
		o.Datatype = sigOut[i].Datatype
		if i < len(v.outs) {
			// Without the request's context: a value needs no trace exemplar, and the
			// SDK then skips the span lookup on every value.
			v.outs[i].record(context.Background(), o, tr)
		}
	}
	if len(requested) == 0 {
		return outs, nil
	}
	sel := make([]*tensor.Tensor, 0, len(requested))
	for _, r := range requested {
		for _, o := range outs {
			if o.Name == r {
				sel = append(sel, o)
			}
		}
	}
	return sel, nil
}
