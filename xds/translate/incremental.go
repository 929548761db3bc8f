package translate

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"reflect"
	"runtime"
	"slices"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/known/emptypb"

	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
	"github.com/patchbay-io/patchbay/internal/envoyvalidate"
	"github.com/patchbay-io/patchbay/xds/rollout"
)

// Flavours of the resources a Builder produces, indexes of Output.Shared and
// ModelOutput.Res.
const (
	FlavourEdge = iota
	FlavourSidecar
	FlavourGRPC
	flavourCount
)

var flavourNames = [flavourCount]string{"edge", "sidecar", "grpc"}

// Output is one incremental build: each flavour's shared resources, each model's own, the
// ext_proc policy and the version of it all.
type Output struct {
	Version string
	Shared  [flavourCount]Resources
	// Models holds each model's resources. A model whose inputs did not change since the
	// previous build has the same *ModelOutput as in the previous Output, so a consumer can
	// skip it by comparing pointers.
	Models map[string]*ModelOutput
	Policy *policyv1.Policy
	// Rebuilt names the models translated by this build (the others were reused).
	Rebuilt []string
}

// Flavour is every resource of flavour f: the shared ones, then each model's.
func (o *Output) Flavour(f int) Resources {
	out := Resources{}
	for t, rs := range o.Shared[f] {
		out[t] = append(out[t], rs...)
	}
	for _, m := range sortedKeys(o.Models) {
		for t, rs := range o.Models[m].Res[f] {
			out[t] = append(out[t], rs...)
		}
	}
	return out
}

// ModelOutput is one model's translated, validated resources for every flavour, each a
// *Raw. A rebuilt resource with the same bytes as before is the previous value (pointer),
// so it is not sent again.
type ModelOutput struct {
	Res  [flavourCount]Resources
	hash [32]byte // of the resources' deterministic bytes, every flavour
	in   modelInputs
}

// modelInputs is everything a model's resources depend on (see EnvoyModel).
type modelInputs struct {
	r         *rollout.Rollout
	slots     SlotMap
	resolved  map[string][]string // r's host names only
	zones     map[string]string   // r's resolved addresses only
	unhealthy map[string]bool
}

func (a modelInputs) same(b modelInputs) bool {
	if a.r != b.r && !reflect.DeepEqual(a.r, b.r) {
		return false
	}
	return slices.Equal(a.slots, b.slots) && reflect.DeepEqual(a.resolved, b.resolved) &&
		reflect.DeepEqual(a.zones, b.zones) && reflect.DeepEqual(a.unhealthy, b.unhealthy)
}

// Builder translates incrementally: it keeps each model's translated and validated
// resources, and a build translates and validates again only the models whose inputs
// changed (their rollout, slot map, resolved addresses and zones, health), plus the
// shared part of each flavour. What it returns is checked as Build checks: Envoy's
// validation rules inside every Any, every route's clusters exist, the policy passes
// policyv1.Validate. A Builder is not safe for concurrent use.
type Builder struct {
	opts   Options
	models map[string]*ModelOutput
}

// NewBuilder returns a Builder for the deployment options.
func NewBuilder(opts Options) *Builder {
	return &Builder{opts: opts, models: map[string]*ModelOutput{}}
}

// Build translates in. On error nothing of the Builder's memory changes: the next build
// starts from the last good one.
func (b *Builder) Build(in *Input) (*Output, error) {
	out := &Output{Models: make(map[string]*ModelOutput, len(in.Set.Rollouts))}
	var errs []error
	for f, role := range []Role{Edge, Sidecar} {
		res, err := EnvoyShared(in, b.opts, role)
		if err != nil {
			return nil, err
		}
		out.Shared[f] = res
	}
	out.Shared[FlavourGRPC] = Resources{}
	for f := range flavourCount {
		for _, typ := range sortedTypes(out.Shared[f]) {
			for _, r := range out.Shared[f][typ] {
				if err := envoyvalidate.Validate(r); err != nil {
					errs = append(errs, fmt.Errorf("%s %s %q: %w", flavourNames[f], shortType(typ), cachev3.GetResourceName(r), err))
				}
			}
		}
	}
	type job struct {
		r    *rollout.Rollout
		mi   modelInputs
		prev *ModelOutput
		out  *ModelOutput
		err  error
	}
	var jobs []*job
	for _, r := range in.Set.Rollouts {
		mi := inputsOf(in, r)
		prev := b.models[r.Model]
		if prev != nil && prev.in.same(mi) {
			out.Models[r.Model] = prev
			continue
		}
		jobs = append(jobs, &job{r: r, mi: mi, prev: prev})
	}
	// Models translate independently: a large build (the first one, or an edit of many
	// files) uses every core.
	workers := min(runtime.GOMAXPROCS(0), max(1, len(jobs)/32))
	var wg sync.WaitGroup
	next := atomic.Int64{}
	for range workers {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= len(jobs) {
					return
				}
				j := jobs[i]
				j.out, j.err = b.buildModel(in, j.r, j.mi, j.prev)
			}
		})
	}
	wg.Wait()
	for _, j := range jobs {
		if j.err != nil {
			errs = append(errs, j.err)
			continue
		}
		out.Models[j.r.Model] = j.out
		out.Rebuilt = append(out.Rebuilt, j.r.Model)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	// Every route must name a cluster that exists. A rebuilt model's routes name its own
	// clusters (checked in buildModel); the shared resources are checked against every
	// model's clusters.
	for f := range flavourCount {
		if checkClusterRefs(out.Shared[f]) == nil {
			continue // the shared routes name no cluster (the fallback table)
		}
		all := Resources{}
		for t, rs := range out.Shared[f] {
			all[t] = rs
		}
		for _, m := range out.Models {
			all[resource.ClusterType] = append(all[resource.ClusterType], m.Res[f][resource.ClusterType]...)
		}
		if err := checkClusterRefs(all); err != nil {
			return nil, fmt.Errorf("%s: %w", flavourNames[f], err)
		}
	}
	policy := Policy(in, "")
	if err := policyv1.Validate(policy); err != nil {
		return nil, fmt.Errorf("ext_proc policy: %w", err)
	}
	pb, err := proto.MarshalOptions{Deterministic: true}.Marshal(policy)
	if err != nil {
		return nil, err
	}
	h := sha256.New()
	for f := range flavourCount {
		for _, typ := range sortedTypes(out.Shared[f]) {
			for _, r := range out.Shared[f][typ] {
				bb, err := proto.MarshalOptions{Deterministic: true}.Marshal(r)
				if err != nil {
					return nil, err
				}
				h.Write(bb)
			}
		}
	}
	for _, m := range sortedKeys(out.Models) {
		mh := out.Models[m].hash
		h.Write([]byte(m))
		h.Write(mh[:])
	}
	h.Write(pb)
	out.Version = hex.EncodeToString(h.Sum(nil))[:16]
	policy.ConfigVersion = out.Version
	out.Policy = policy
	b.models = out.Models
	return out, nil
}

// buildModel translates and validates one model, reusing prev's values of the resources
// whose bytes did not change.
func (b *Builder) buildModel(in *Input, r *rollout.Rollout, mi modelInputs, prev *ModelOutput) (*ModelOutput, error) {
	mo := &ModelOutput{in: mi}
	mo.Res[FlavourEdge] = EnvoyModel(in, r, b.opts, Edge)
	mo.Res[FlavourSidecar] = EnvoyModel(in, r, b.opts, Sidecar)
	mo.Res[FlavourGRPC] = GRPCModel(in, r, b.opts)
	var errs []error
	for f := range flavourCount {
		if err := checkClusterRefs(mo.Res[f]); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", flavourNames[f], err))
		}
	}
	h := sha256.New()
	// The flavours share many resources byte for byte (a version's cluster and endpoints
	// are the same for edge and sidecar Envoys, its gRPC endpoints the same for proxyless
	// clients): one value serves them all, validated once.
	type key struct {
		typ string
		sum [32]byte
	}
	seen := map[key]*Raw{}
	for f := range flavourCount {
		for _, typ := range sortedTypes(mo.Res[f]) {
			for i, res := range mo.Res[f][typ] {
				name := cachev3.GetResourceName(res)
				bb, err := proto.MarshalOptions{Deterministic: true}.Marshal(res)
				if err != nil {
					errs = append(errs, err)
					continue
				}
				h.Write(bb)
				if prev != nil {
					if old, ok := prev.lookup(f, typ, name).(*Raw); ok && bytes.Equal(old.Bytes(), bb) {
						mo.Res[f][typ][i] = old
						continue // validated when it was built
					}
				}
				k := key{typ, sha256.Sum256(bb)}
				if same, ok := seen[k]; ok {
					mo.Res[f][typ][i] = same
					continue
				}
				if err := envoyvalidate.Validate(res); err != nil {
					errs = append(errs, fmt.Errorf("%s %s %q: %w", flavourNames[f], shortType(typ), name, err))
				}
				raw := NewRaw(name, bb)
				seen[k] = raw
				mo.Res[f][typ][i] = raw
			}
		}
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("model %s: %w", r.Model, errors.Join(errs...))
	}
	copy(mo.hash[:], h.Sum(nil))
	return mo, nil
}

// Raw is a translated, validated resource kept as its encoding: a model's resources are
// held this way between builds, a tenth of the memory of the Go messages (at 10,000
// models the messages alone took over 1.5 GiB). It marshals to exactly those bytes (they
// are the unknown fields of an empty message) and has the resource's name, which is all
// go-control-plane's caches use. Decode turns it back into the typed message.
type Raw struct {
	*emptypb.Empty
	name string
}

// NewRaw holds a resource's encoding under its name.
func NewRaw(name string, b []byte) *Raw {
	e := &emptypb.Empty{}
	e.ProtoReflect().SetUnknown(b)
	return &Raw{Empty: e, name: name}
}

// GetName is the resource's name (go-control-plane's GetResourceName reads it).
func (r *Raw) GetName() string { return r.name }

// Bytes is the resource's encoding.
func (r *Raw) Bytes() []byte { return r.Empty.ProtoReflect().GetUnknown() }

// Decode returns the resource as its typed message, for the resource type typeURL.
func (r *Raw) Decode(typeURL string) (types.Resource, error) {
	mt, err := protoregistry.GlobalTypes.FindMessageByURL(typeURL)
	if err != nil {
		return nil, err
	}
	m := mt.New().Interface()
	if err := proto.Unmarshal(r.Bytes(), m); err != nil {
		return nil, err
	}
	return m, nil
}

// lookup finds one of the model's resources by flavour, type and name.
func (mo *ModelOutput) lookup(f int, typ, name string) types.Resource {
	for _, r := range mo.Res[f][typ] {
		if cachev3.GetResourceName(r) == name {
			return r
		}
	}
	return nil
}

// inputsOf gathers what model r's resources depend on.
func inputsOf(in *Input, r *rollout.Rollout) modelInputs {
	mi := modelInputs{r: r, slots: in.Slots[r.Model], unhealthy: in.Unhealthy[r.Model]}
	zone := func(addr string) {
		if z, ok := in.Zones[addr]; ok {
			if mi.zones == nil {
				mi.zones = map[string]string{}
			}
			mi.zones[addr] = z
		}
	}
	for vi := range r.Versions {
		for _, eps := range endpointsOf(&r.Versions[vi]) {
			for _, ep := range eps {
				host, _, err := net.SplitHostPort(ep)
				if err != nil {
					continue
				}
				if net.ParseIP(host) != nil {
					zone(host)
					continue
				}
				if mi.resolved == nil {
					mi.resolved = map[string][]string{}
				}
				addrs := in.Resolved[host]
				mi.resolved[host] = addrs
				for _, a := range addrs {
					zone(a)
				}
			}
		}
	}
	return mi
}

// endpointsOf lists a version's REST then gRPC endpoints without copying them.
func endpointsOf(v *rollout.Version) [2][]string { return [2][]string{v.Endpoints, v.GRPCEndpoints} }

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
