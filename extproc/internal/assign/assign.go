// Package assign decides, from request headers only, which variant a prediction request
// belongs to: the sticky bucket, the experiments it is exposed to, and the version when
// an experiment arm or an allowed pin decides it. Decide does not allocate.
package assign

import (
	"math/rand/v2"
	"strings"
	"unsafe"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"

	"github.com/patchbay-io/patchbay/api/headers"
	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
	"github.com/patchbay-io/patchbay/extproc/internal/policy"
)

// Outcome is what a decision concluded.
type Outcome uint8

const (
	// PassThrough: not a model request; leave it alone.
	PassThrough Outcome = iota
	// Routed: a known model; Bucket (and maybe Version, exposures) are set.
	Routed
	// UnknownModel: the path or x-patchbay-model names no known model (404).
	UnknownModel
	// UnknownVersion: a pinned version the model does not have (404).
	UnknownVersion
	// PinForbidden: the path names a version and the rollout does not allow pinning (403).
	PinForbidden
	// NeedBody: a body-mode model without identity in the headers; decide on the body.
	NeedBody
	// ModelConflict: the request names more than one model (x-patchbay-model repeated,
	// or a path and x-patchbay-model that disagree); refused (400 / INVALID_ARGUMENT).
	ModelConflict
)

// Source says what decided the version.
type Source uint8

const (
	// Split: no version decided here; Envoy's weighted split reads the bucket.
	Split Source = iota
	// Experiment: an experiment arm decided the version.
	Experiment
	// Pin: the client's path named an allowed version.
	Pin
)

// Decision is the result of one decision. It is filled in place so that it can live on
// the caller's stack; strings in it may alias the request's memory.
type Decision struct {
	Outcome Outcome
	Model   *policy.Model
	// ModelName and PinnedVersion are as the request spelled them (alias request memory).
	ModelName     string
	PinnedVersion string
	// HeaderModel is the first x-patchbay-model value and ModelHeaders how many times
	// the header came (Envoy sends each repeated header as its own HeaderValue).
	HeaderModel  string
	ModelHeaders int
	// GRPC is true for gRPC requests (errors then carry a gRPC status).
	GRPC bool
	// Stripped has bit i set when the client sent headers.Stripped[i].
	Stripped uint8
	// OtherPatchbay is true when the client sent other x-patchbay-* headers (not
	// x-patchbay-model, not in headers.Stripped): they are removed too.
	OtherPatchbay bool
	// Identity as found (aliases request memory); Anonymous when none was found.
	Identity  string
	Anonymous bool
	Bucket    uint64
	Version   *policy.Version
	Source    Source
	// Combo indexes the model's precomputed x-patchbay-experiments header (0: none).
	Combo    int
	Exposed  [policy.MaxLayersPerModel]*policy.Arm
	NExposed int
}

// Exposures returns the arms the request was exposed to, in layer order.
func (d *Decision) Exposures() []*policy.Arm { return d.Exposed[:d.NExposed] }

// Value returns a header's value: raw_value when set (Envoy sends that), else value.
// The string aliases the header's memory and must not outlive it.
func Value(h *corev3.HeaderValue) string {
	if b := h.GetRawValue(); len(b) > 0 {
		return unsafe.String(unsafe.SliceData(b), len(b))
	}
	return h.GetValue()
}

// Find returns the first value of header name (lower-case), and whether it was present.
func Find(hs []*corev3.HeaderValue, name string) (string, bool) {
	for _, h := range hs {
		if h.GetKey() == name {
			return Value(h), true
		}
	}
	return "", false
}

const modelsPrefix = "/v2/models/"

// ParsePath extracts the model and optional version from an OIP REST path
// (/v2/models/<model>[/versions/<version>][/...][?query]). ok is false for other paths.
func ParsePath(path string) (model, version string, ok bool) {
	if i := strings.IndexAny(path, "?#"); i >= 0 {
		path = path[:i]
	}
	rest, found := strings.CutPrefix(path, modelsPrefix)
	if !found {
		return "", "", false
	}
	model, rest, _ = strings.Cut(rest, "/")
	if model == "" {
		return "", "", false
	}
	if v, found := strings.CutPrefix(rest, "versions/"); found {
		version, _, _ = strings.Cut(v, "/")
	}
	return model, version, true
}

// Decide fills d for a request with headers hs under table t. It does not allocate.
func Decide(t *policy.Table, hs []*corev3.HeaderValue, d *Decision) {
	*d = Decision{}
	var path string
	idRank := len(t.Identity)
	for _, h := range hs {
		k := h.GetKey()
		switch {
		case k == ":path":
			path = Value(h)
		case k == "content-type":
			d.GRPC = strings.HasPrefix(Value(h), "application/grpc")
		case strings.HasPrefix(k, headers.Prefix):
			if k == headers.Model {
				if d.ModelHeaders == 0 {
					d.HeaderModel = Value(h)
				}
				d.ModelHeaders++
				continue
			}
			d.notePatchbay(k)
		}
		if idRank > 0 {
			for i, name := range t.Identity[:idRank] {
				if k == name {
					if v := Value(h); v != "" {
						d.Identity, idRank = v, i
					}
					break
				}
			}
		}
	}
	model, version, isModelPath := ParsePath(path)
	if !isModelPath {
		model = d.HeaderModel
	}
	if d.conflict(model, isModelPath) {
		return
	}
	if model == "" {
		d.Outcome = PassThrough
		return
	}
	d.ModelName = model
	m := t.Model(model)
	if m == nil {
		d.Outcome = UnknownModel
		return
	}
	d.Model = m
	if version != "" {
		d.PinnedVersion = version
		if !m.Pinning {
			d.Outcome = PinForbidden
			return
		}
		v := m.Version(version)
		if v == nil {
			d.Outcome = UnknownVersion
			return
		}
		d.Outcome = Routed
		d.Version, d.Source = v, Pin
		d.bucket(d.Identity)
		return
	}
	if d.Identity == "" && m.BodyMode {
		d.Outcome = NeedBody
		return
	}
	Assign(m, d.Identity, hs, d)
}

// notePatchbay records a client-sent x-patchbay-* header other than x-patchbay-model.
// x-patchbay-route-key is not the client's: Envoy's early header mutation removed the
// client's and set its own before any filter ran, and Envoy selects the route scope by it
// again after ext_proc's answer (it must stay).
func (d *Decision) notePatchbay(k string) {
	if k == headers.RouteKey {
		return
	}
	for i, s := range headers.Stripped {
		if k == s {
			d.Stripped |= 1 << i
			return
		}
	}
	d.OtherPatchbay = true
}

// ScanForbidden fills only d.Stripped and d.OtherPatchbay (what to remove when there is
// no policy to decide with), and refuses a request that names more than one model
// (Outcome ModelConflict), which needs no policy to tell; otherwise Outcome is PassThrough.
func ScanForbidden(hs []*corev3.HeaderValue, d *Decision) {
	*d = Decision{}
	var path string
	for _, h := range hs {
		k := h.GetKey()
		switch {
		case k == ":path":
			path = Value(h)
		case k == "content-type":
			d.GRPC = strings.HasPrefix(Value(h), "application/grpc")
		case k == headers.Model:
			if d.ModelHeaders == 0 {
				d.HeaderModel = Value(h)
			}
			d.ModelHeaders++
		case strings.HasPrefix(k, headers.Prefix):
			d.notePatchbay(k)
		}
	}
	model, _, isModelPath := ParsePath(path)
	if !isModelPath {
		model = d.HeaderModel
	}
	d.conflict(model, isModelPath)
}

// conflict refuses a request that names more than one model: x-patchbay-model more
// than once (Envoy sends each repeated header as its own HeaderValue: its ext_proc
// filter copies every HeaderMap entry, source/extensions/filters/http/ext_proc/
// mutation_utils.cc headersToProto, and only inline headers are comma-joined), or a
// model path and an x-patchbay-model that differ. Envoy's route, which may match on
// the header, and this decision must name the same model.
func (d *Decision) conflict(model string, isModelPath bool) bool {
	if d.ModelHeaders > 1 || (isModelPath && d.ModelHeaders == 1 && d.HeaderModel != model) {
		d.ModelName = model
		d.Outcome = ModelConflict
		return true
	}
	return false
}

// Assign decides for a known model and identity ("" for none): bucket, experiments and
// version. It is the second half of Decide, and what body mode calls once the identity
// is read from the body. It does not allocate.
func Assign(m *policy.Model, identity string, hs []*corev3.HeaderValue, d *Decision) {
	d.Outcome = Routed
	d.Model = m
	d.Identity = identity
	if !d.bucket(identity) {
		return // no identity: random bucket, no experiments
	}
	first := -1
	for _, l := range m.Layers {
		pos := uint32(policyv1.Hash(l.Salt, identity) % policyv1.LayerSlots)
		for _, e := range l.Experiments {
			if pos < e.SlotStart || pos >= e.SlotEnd {
				continue
			}
			// The slot belongs to e: a user it does not target is in no experiment here.
			if !matches(e, hs) {
				break
			}
			r := policyv1.Hash(e.Salt, identity) % e.Total
			for i, a := range e.Arms {
				if r < a.Upper {
					d.Exposed[d.NExposed] = a
					d.NExposed++
					d.Combo += l.Stride * (e.Digit + i)
					if first < 0 || e.Index < first {
						first = e.Index
						d.Version, d.Source = a.Version, Experiment
					}
					break
				}
			}
			break
		}
	}
}

// bucket sets the sticky bucket for identity, or a random one when there is none, and
// reports whether the request has an identity.
func (d *Decision) bucket(identity string) bool {
	if identity == "" {
		d.Anonymous = true
		d.Bucket = rand.Uint64()
		return false
	}
	d.Bucket = policyv1.Hash(d.Model.Salt, identity)
	return true
}

func matches(e *policy.Experiment, hs []*corev3.HeaderValue) bool {
	for _, hm := range e.Match {
		v, ok := Find(hs, hm.Name)
		if !ok {
			return false
		}
		in := false
		for _, want := range hm.Values {
			if v == want {
				in = true
				break
			}
		}
		if !in {
			return false
		}
	}
	return true
}
