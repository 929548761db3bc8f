// Package policy compiles the control plane's Policy resource into an immutable lookup
// table for the ext_proc hot path: every header value a decision can produce is built
// once here, so a decision only hashes, compares and picks pointers.
package policy

import (
	"fmt"
	"sort"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/patchbay-io/patchbay/api/headers"
	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
)

// MaxLayersPerModel bounds the layers one model's experiments may span: a request is
// exposed to at most one experiment per layer, and decisions keep exposures in a
// fixed-size array so that they do not allocate.
const MaxLayersPerModel = policyv1.MaxLayersPerModel

// maxCombos bounds how many x-patchbay-experiments values are precomputed per model.
// Beyond it the value is assembled per request (which allocates).
const maxCombos = 4096

// Table is a compiled, validated Policy. It is immutable once built and shared by
// every request goroutine.
type Table struct {
	// ConfigVersion is the rollout config version the control plane built it from.
	ConfigVersion string
	// NVersions and NArms count the IDs handed out.
	NVersions, NArms int
	// Identity lists the identity headers, first present wins.
	Identity []string
	models   map[string]*Model
	// Models in policy order.
	Models []*Model
}

// Model is one logical model with everything a decision for it needs.
type Model struct {
	// ID numbers the table's models 0..n-1, for per-model side tables.
	ID       int
	Name     string
	Salt     string
	Pinning  bool
	BodyMode bool
	// Header sets x-patchbay-model to Name: every routed answer carries it, so Envoy's
	// route and the decision name the same model.
	Header   *corev3.HeaderValueOption
	Versions []*Version
	versions map[string]*Version
	// Experiments in file order; the first the user is in decides the version.
	Experiments []*Experiment
	// Layers groups Experiments by layer, in order of first appearance.
	Layers []*Layer
	// combos[i] is the x-patchbay-experiments header for exposure combination i
	// (mixed radix over Layers; see Experiment.Digit). nil when too many to precompute.
	combos []*corev3.HeaderValueOption
}

// Version is one model version and its precomputed x-patchbay-version header.
type Version struct {
	// ID numbers the table's versions (all models) 0..n-1.
	ID     int
	Name   string
	Header *corev3.HeaderValueOption
}

// Layer is the group of one model's experiments that share a layer: a user is in at
// most one of them.
type Layer struct {
	Name        string
	Salt        string
	Experiments []*Experiment
	// Stride is this layer's place value in the exposure combination index.
	Stride int
}

// Experiment is one slice of a layer, split into arms.
type Experiment struct {
	Name      string
	Index     int // position among the model's experiments (file order)
	SlotStart uint32
	SlotEnd   uint32
	Salt      string
	Match     []HeaderMatch
	Arms      []*Arm
	Total     uint64 // sum of arm weights
	// Digit is the combination digit of this experiment's first arm within its layer
	// (0 in a layer means "no exposure"); arm i has digit Digit+i.
	Digit int
}

// HeaderMatch holds when the request's first value of Name is one of Values.
type HeaderMatch struct {
	Name   string
	Values []string
}

// Arm is one arm of an experiment.
type Arm struct {
	// ID numbers the table's arms (all models) 0..n-1.
	ID         int
	Experiment *Experiment
	Name       string
	Version    *Version
	// Upper is the exclusive upper bound of the arm's range in [0, Total).
	Upper uint64
	// Label is "experiment=arm".
	Label string
}

// Model returns the compiled model named name, or nil.
func (t *Table) Model(name string) *Model { return t.models[name] }

// GetLayers returns the model's layers; nil-safe.
func (m *Model) GetLayers() []*Layer {
	if m == nil {
		return nil
	}
	return m.Layers
}

// Version returns the model's version named name, or nil.
func (m *Model) Version(name string) *Version { return m.versions[name] }

// CombosHeader returns the precomputed x-patchbay-experiments header for combination
// index combo (> 0), or nil when the model has too many combinations to precompute.
func (m *Model) CombosHeader(combo int) *corev3.HeaderValueOption {
	if combo <= 0 || combo >= len(m.combos) {
		return nil
	}
	return m.combos[combo]
}

// NoAppend is the shared, never-modified `append: false` of every header ext_proc sets.
var NoAppend = wrapperspb.Bool(false)

// SetHeader returns a header option that replaces key's values with value (raw_value).
//
// Envoy's ext_proc filter reads only the deprecated BoolValue `append` of a set_headers
// entry (absent means false: replace) and never looks at `append_action`
// (source/extensions/filters/http/ext_proc/mutation_utils.cc,
// MutationUtils::applyHeaderMutations: PROTOBUF_GET_WRAPPED_OR_DEFAULT(sh, append, false),
// then setCopy or addCopy). So `append: false` is set explicitly, the field Envoy acts on;
// append_action OVERWRITE_IF_EXISTS_OR_ADD says the same for readers of the newer field.
func SetHeader(key, value string) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{
		Header:       &corev3.HeaderValue{Key: key, RawValue: []byte(value)},
		Append:       NoAppend,
		AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
	}
}

// Compile validates p and builds its table. defaultIdentity is used when the policy
// names no identity headers. All problems are reported at once.
func Compile(p *policyv1.Policy, defaultIdentity []string) (*Table, error) {
	// Every structural rule lives in policyv1.Validate, which the control plane's build gate
	// runs too, so what it serves compiles; below, the table is only built.
	if err := policyv1.Validate(p); err != nil {
		return nil, err
	}
	t := &Table{ConfigVersion: p.GetConfigVersion(), models: make(map[string]*Model)}
	ids := p.GetIdentityHeaders()
	if len(ids) == 0 {
		ids = defaultIdentity
	}
	if len(ids) == 0 {
		ids = []string{headers.UserID}
	}
	for i, h := range ids {
		h = strings.ToLower(h)
		if !policyv1.ValidHeaderName(h) { // the process's default list is not in the policy
			return nil, fmt.Errorf("identity_headers[%d]: %q is not a header name", i, ids[i])
		}
		t.Identity = append(t.Identity, h)
	}
	layers := make(map[string]string, len(p.GetLayers()))
	for _, l := range p.GetLayers() {
		layers[l.GetName()] = l.GetSalt()
	}
	for _, pm := range p.GetModels() {
		m := &Model{
			Name:     pm.GetName(),
			Salt:     pm.GetSalt(),
			Pinning:  pm.GetPinning(),
			BodyMode: pm.GetBodyMode(),
			Header:   SetHeader(headers.Model, pm.GetName()),
			versions: make(map[string]*Version),
		}
		for _, vn := range pm.GetVersions() {
			v := &Version{ID: t.NVersions, Name: vn, Header: SetHeader(headers.Version, vn)}
			t.NVersions++
			m.versions[vn] = v
			m.Versions = append(m.Versions, v)
		}
		layerOf := make(map[string]*Layer)
		for _, pe := range pm.GetExperiments() {
			e := &Experiment{
				Name:      pe.GetName(),
				Index:     len(m.Experiments),
				SlotStart: pe.GetSlotStart(),
				SlotEnd:   pe.GetSlotEnd(),
				Salt:      pe.GetSalt(),
			}
			for _, hm := range pe.GetMatch() {
				// Header names are case-insensitive; Envoy sends them lower-case.
				e.Match = append(e.Match, HeaderMatch{Name: strings.ToLower(hm.GetName()), Values: append([]string(nil), hm.GetValues()...)})
			}
			for _, pa := range pe.GetArms() {
				e.Total += uint64(pa.GetWeight())
				e.Arms = append(e.Arms, &Arm{
					ID: t.NArms, Experiment: e, Name: pa.GetName(), Version: m.versions[pa.GetVersion()], Upper: e.Total,
					Label: e.Name + "=" + pa.GetName(),
				})
				t.NArms++
			}
			l := layerOf[pe.GetLayer()]
			if l == nil {
				l = &Layer{Name: pe.GetLayer(), Salt: layers[pe.GetLayer()]}
				layerOf[pe.GetLayer()] = l
				m.Layers = append(m.Layers, l)
			}
			l.Experiments = append(l.Experiments, e)
			m.Experiments = append(m.Experiments, e)
		}
		m.ID = len(t.Models)
		t.models[m.Name] = m
		t.Models = append(t.Models, m)
	}
	for _, m := range t.Models {
		m.buildCombos()
	}
	return t, nil
}

// buildCombos assigns combination digits and precomputes every x-patchbay-experiments
// value when there are at most maxCombos of them.
func (m *Model) buildCombos() {
	total := 1
	for _, l := range m.Layers {
		l.Stride = total
		digits := 1 // 0 = not exposed in this layer
		for _, e := range l.Experiments {
			e.Digit = digits
			digits += len(e.Arms)
		}
		if total > maxCombos {
			continue
		}
		total *= digits
	}
	if len(m.Layers) == 0 || total > maxCombos {
		return
	}
	m.combos = make([]*corev3.HeaderValueOption, total)
	arms := make([]*Arm, 0, len(m.Layers))
	for c := 1; c < total; c++ {
		arms = arms[:0]
		for _, l := range m.Layers {
			d := (c / l.Stride) % (len(m.armsOf(l)) + 1)
			if d > 0 {
				arms = append(arms, m.armsOf(l)[d-1])
			}
		}
		m.combos[c] = SetHeader(headers.Experiments, JoinLabels(arms))
	}
}

// armsOf lists a layer's arms in digit order.
func (m *Model) armsOf(l *Layer) []*Arm {
	var arms []*Arm
	for _, e := range l.Experiments {
		arms = append(arms, e.Arms...)
	}
	return arms
}

// JoinLabels renders exposures as "name=arm,name=arm" in experiment file order.
func JoinLabels(arms []*Arm) string {
	sorted := append([]*Arm(nil), arms...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Experiment.Index < sorted[j].Experiment.Index })
	var b strings.Builder
	for i, a := range sorted {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(a.Label)
	}
	return b.String()
}
