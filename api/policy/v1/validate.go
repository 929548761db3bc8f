package policyv1

import (
	"errors"
	"fmt"
	"math"
	"strings"
)

// MaxLayersPerModel bounds the layers one model's experiments may span (ext_proc keeps a
// request's exposures in a fixed-size array of this length).
const MaxLayersPerModel = 16

// Validate checks every structural rule ext_proc's compiler relies on, so that the control
// plane can refuse, inside the same build gate as the Envoy resources, a policy ext_proc
// would NACK (and ext_proc refuses it by the same rules). All problems are reported at once.
//
// Rules: identity headers are header names; layers have unique non-empty names; models have
// unique non-empty names and at least one version, with unique non-empty version names;
// experiment names are non-empty, without ',' or '=', unique across the policy; an
// experiment's layer is in layers; its slots [slot_start, slot_end) lie within
// [0, LayerSlots) (an empty range, allocation 0, holds nobody and is valid) and never overlap
// another experiment's in the same layer; match headers are header names with at least one
// value; it has at least one arm; arm names are non-empty, without ',' or '=', unique in the
// experiment; an arm's version is one of its model's; arm weights are positive and sum to at
// most 2^32-1; a model's experiments span at most MaxLayersPerModel layers.
func Validate(p *Policy) error {
	if p == nil {
		return errors.New("policy: missing")
	}
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	for i, h := range p.GetIdentityHeaders() {
		if !ValidHeaderName(strings.ToLower(h)) {
			bad("identity_headers[%d]: %q is not a header name", i, h)
		}
	}
	layers := make(map[string]bool, len(p.GetLayers()))
	for i, l := range p.GetLayers() {
		switch {
		case l.GetName() == "":
			bad("layers[%d]: empty name", i)
		case layers[l.GetName()]:
			bad("layers[%d] %q: duplicate layer", i, l.GetName())
		default:
			layers[l.GetName()] = true
		}
	}
	type slotRange struct {
		start, end uint32
		who        string
	}
	layerRanges := make(map[string][]slotRange)
	expNames := make(map[string]string)
	models := make(map[string]bool)
	for mi, m := range p.GetModels() {
		where := fmt.Sprintf("models[%d] %q", mi, m.GetName())
		switch {
		case m.GetName() == "":
			bad("models[%d]: empty name", mi)
			continue
		case models[m.GetName()]:
			bad("%s: duplicate model", where)
			continue
		}
		models[m.GetName()] = true
		if len(m.GetVersions()) == 0 {
			bad("%s: no versions", where)
		}
		versions := make(map[string]bool, len(m.GetVersions()))
		for vi, v := range m.GetVersions() {
			switch {
			case v == "":
				bad("%s: versions[%d]: empty name", where, vi)
			case versions[v]:
				bad("%s: versions[%d] %q: duplicate version", where, vi, v)
			}
			versions[v] = true
		}
		modelLayers := map[string]bool{}
		for ei, e := range m.GetExperiments() {
			ewhere := fmt.Sprintf("%s: experiments[%d] %q", where, ei, e.GetName())
			if e.GetName() == "" || strings.ContainsAny(e.GetName(), ",=") {
				bad("%s: name must be non-empty without ',' or '='", ewhere)
				continue
			}
			if other, dup := expNames[e.GetName()]; dup {
				bad("%s: duplicate experiment name (also in %s)", ewhere, other)
				continue
			}
			expNames[e.GetName()] = where
			if !layers[e.GetLayer()] {
				bad("%s: layer %q is not in policy layers", ewhere, e.GetLayer())
				continue
			}
			modelLayers[e.GetLayer()] = true
			start, end := e.GetSlotStart(), e.GetSlotEnd()
			if start > end || end > LayerSlots {
				bad("%s: slots [%d, %d) not a range within [0, %d)", ewhere, start, end, LayerSlots)
			} else if start < end {
				for _, r := range layerRanges[e.GetLayer()] {
					if start < r.end && r.start < end {
						bad("%s: slots [%d, %d) overlap %s [%d, %d) in layer %q", ewhere, start, end, r.who, r.start, r.end, e.GetLayer())
					}
				}
				layerRanges[e.GetLayer()] = append(layerRanges[e.GetLayer()], slotRange{start, end, fmt.Sprintf("experiment %q", e.GetName())})
			}
			for hi, hm := range e.GetMatch() {
				if !ValidHeaderName(strings.ToLower(hm.GetName())) {
					bad("%s: match[%d]: %q is not a header name", ewhere, hi, hm.GetName())
				}
				if len(hm.GetValues()) == 0 {
					bad("%s: match[%d] %q: no values", ewhere, hi, hm.GetName())
				}
			}
			if len(e.GetArms()) == 0 {
				bad("%s: no arms", ewhere)
			}
			arms := map[string]bool{}
			var total uint64
			for ai, a := range e.GetArms() {
				awhere := fmt.Sprintf("%s: arms[%d] %q", ewhere, ai, a.GetName())
				if a.GetName() == "" || strings.ContainsAny(a.GetName(), ",=") {
					bad("%s: name must be non-empty without ',' or '='", awhere)
				}
				if arms[a.GetName()] {
					bad("%s: duplicate arm", awhere)
				}
				arms[a.GetName()] = true
				if !versions[a.GetVersion()] || a.GetVersion() == "" {
					bad("%s: unknown version %q", awhere, a.GetVersion())
				}
				if a.GetWeight() == 0 {
					bad("%s: zero weight", awhere)
				}
				total += uint64(a.GetWeight())
			}
			if total > math.MaxUint32 {
				bad("%s: arm weights sum to %d, more than %d", ewhere, total, uint64(math.MaxUint32))
			}
		}
		if len(modelLayers) > MaxLayersPerModel {
			bad("%s: experiments span %d layers, at most %d supported", where, len(modelLayers), MaxLayersPerModel)
		}
	}
	return errors.Join(errs...)
}

// validHeaderName accepts lower-case HTTP token characters.
func ValidHeaderName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0:
		default:
			return false
		}
	}
	return true
}
