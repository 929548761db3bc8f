package rollout

import (
	"errors"
	"fmt"
	"net"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

var (
	// Model names are DNS labels: they become listener names, cluster names and URL parts.
	modelNameRe = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	// Version names may also hold dots (v1.2); never '_', which separates model and version in cluster names.
	versionNameRe = regexp.MustCompile(`^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$`)
	// Experiment, layer and arm names end up in headers "name=arm,...".
	nameRe   = regexp.MustCompile(`^[a-zA-Z0-9]([a-zA-Z0-9._-]{0,61}[a-zA-Z0-9])?$`)
	headerRe = regexp.MustCompile(`^[a-z0-9!#$%&'*+.^_|~-]+$`)
)

// MaxArmWeight bounds one arm's weight, so that the weights of any experiment sum far below
// the uint32 the ext_proc policy carries them in (a weight of 2^32 used to wrap to 0).
const MaxArmWeight = 1_000_000

// MaxArmsPerExperiment bounds an experiment's arms (with MaxArmWeight, the sum of weights
// stays below 2^32).
const MaxArmsPerExperiment = 100

// MaxRetries bounds the per-model retry count.
const MaxRetries = 10

// MaxLayersPerModel bounds the layers one model's experiments may span (ext_proc keeps the
// exposures of a request in a fixed-size array; it refuses policies beyond this).
const MaxLayersPerModel = 16

// Validate checks every rule of shared/design.md across the set and returns all
// problems at once, each with file, line and field path.
func Validate(s *Set) error { return validate(s.Rollouts, nil) }

// check is one step of Validate for one rollout, in the order Validate takes them: a
// problem found from the rollout alone, or a rule that depends on the rollouts before it
// in the set (a model or experiment name defined twice, a layer over-allocated), evaluated
// when the set is validated. A rollout's checks depend on it alone, so a Cache keeps them
// with its parse and a reload validates only the rules that span files again.
type check struct {
	kind  checkKind
	err   *Error // checkProblem
	index int    // the experiment of checkExperimentUnique and checkLayerAllocation
}

type checkKind uint8

const (
	checkProblem checkKind = iota
	checkModelUnique
	checkExperimentUnique
	checkLayerAllocation
)

func newError(r *Rollout, field, format string, args ...any) *Error {
	return &Error{File: r.Source.File, Line: r.Line(field), Field: field, Msg: fmt.Sprintf(format, args...)}
}

// validate is Validate of rollouts, with plans[i], where it is given (not nil), the checks
// of rollouts[i] (see checksOf).
func validate(rollouts []*Rollout, plans [][]check) error {
	var errs []error
	models := map[string]*Rollout{}
	experiments := map[string]*Rollout{}
	layerAlloc := map[string]Hundredths{}
	for i, r := range rollouts {
		var plan []check
		if i < len(plans) {
			plan = plans[i]
		}
		if plan == nil { // checksOf never returns nil
			plan = checksOf(r)
		}
		for _, c := range plan {
			switch c.kind {
			case checkProblem:
				errs = append(errs, c.err)
			case checkModelUnique:
				if o := models[r.Model]; o != nil {
					errs = append(errs, newError(r, "model", "%q is already defined at %s:%d", r.Model, o.Source.File, o.Line("model")))
				} else {
					models[r.Model] = r
				}
			case checkExperimentUnique:
				e := &r.Experiments[c.index]
				if o := experiments[e.Name]; o != nil {
					errs = append(errs, newError(r, "experiments["+strconv.Itoa(c.index)+"].name", "experiment %q is already defined in %s", e.Name, o.Source.File))
				} else {
					experiments[e.Name] = r
				}
			case checkLayerAllocation:
				e := &r.Experiments[c.index]
				layerAlloc[e.Layer] += e.Allocation
				if layerAlloc[e.Layer] > HundredthsMax {
					errs = append(errs, newError(r, "experiments["+strconv.Itoa(c.index)+"].allocation", "layer %q is over-allocated: its experiments take %v%% of users", e.Layer, layerAlloc[e.Layer]))
				}
			}
		}
	}
	// Stable order: by file, then line.
	sort.SliceStable(errs, func(i, j int) bool {
		a, b := errs[i].(*Error), errs[j].(*Error)
		if a.File != b.File {
			return a.File < b.File
		}
		return a.Line < b.Line
	})
	return errors.Join(errs...)
}

// checksOf is Validate's walk of one rollout: its own problems, and where the rules that
// span the set apply, in Validate's order.
func checksOf(r *Rollout) []check {
	plan := make([]check, 0, 1)
	add := func(r *Rollout, field, format string, args ...any) {
		plan = append(plan, check{err: newError(r, field, format, args...)})
	}
	if r.APIVersion != APIVersion {
		add(r, "apiVersion", "got %q, want %q", r.APIVersion, APIVersion)
	}
	if r.Kind != Kind {
		add(r, "kind", "got %q, want %q", r.Kind, Kind)
	}
	switch {
	case r.Model == "":
		add(r, "model", "missing")
	case !modelNameRe.MatchString(r.Model):
		add(r, "model", "%q is not a DNS label (lower-case letters, digits, '-', at most 63)", r.Model)
	default:
		plan = append(plan, check{kind: checkModelUnique})
	}
	versions := validateVersions(r, add)
	validateTraffic(r, versions, add)
	validateAnalysis(r, versions, add)
	validateContract(r, add)
	shadowed := map[string]bool{}
	for i, sh := range r.Shadow {
		f := "shadow[" + strconv.Itoa(i) + "]"
		if !versions[sh.Version] {
			add(r, f+".version", "unknown version %q (versions: %s)", sh.Version, versionList(r))
		} else if shadowed[sh.Version] {
			add(r, f+".version", "version %q is shadowed twice", sh.Version)
		}
		shadowed[sh.Version] = true
		if !(sh.Percent > 0 && sh.Percent <= 100) {
			add(r, f+".percent", "%v is outside (0, 100]", sh.Percent)
		}
	}
	for i, e := range r.Experiments {
		f := "experiments[" + strconv.Itoa(i) + "]"
		if !nameRe.MatchString(e.Name) {
			add(r, f+".name", "%q is not a valid name (letters, digits, '.', '_', '-')", e.Name)
		} else {
			plan = append(plan, check{kind: checkExperimentUnique, index: i})
		}
		if !nameRe.MatchString(e.Layer) {
			add(r, f+".layer", "%q is not a valid layer name", e.Layer)
		}
		// 0 pauses the experiment: nobody is assigned, its arms stay defined.
		if e.Allocation < 0 || e.Allocation > HundredthsMax {
			add(r, f+".allocation", "%v is outside [0, 100]", e.Allocation)
		} else {
			plan = append(plan, check{kind: checkLayerAllocation, index: i})
		}
		if e.Match != nil {
			for h, vals := range e.Match.Headers {
				hf := f + ".match.headers." + h
				if !headerRe.MatchString(h) {
					add(r, hf, "%q is not a lower-case header name", h)
				}
				if len(vals) == 0 {
					add(r, hf, "needs at least one value")
				}
			}
		}
		if len(e.Arms) == 0 {
			add(r, f+".arms", "an experiment needs at least one arm")
		} else if len(e.Arms) > MaxArmsPerExperiment {
			add(r, f+".arms", "%d arms; at most %d", len(e.Arms), MaxArmsPerExperiment)
		}
		arms := map[string]bool{}
		for j, a := range e.Arms {
			af := f + ".arms[" + strconv.Itoa(j) + "]"
			if !nameRe.MatchString(a.Name) {
				add(r, af+".name", "%q is not a valid arm name", a.Name)
			} else if arms[a.Name] {
				add(r, af+".name", "arm %q is listed twice", a.Name)
			}
			arms[a.Name] = true
			if !versions[a.Version] {
				add(r, af+".version", "unknown version %q (versions: %s)", a.Version, versionList(r))
			}
			if a.Weight <= 0 {
				add(r, af+".weight", "%d: arm weights must be positive", a.Weight)
			} else if a.Weight > MaxArmWeight {
				add(r, af+".weight", "%d is over the maximum arm weight %d (weights are relative: scale them down)", a.Weight, MaxArmWeight)
			}
		}
	}
	layers := map[string]bool{}
	for _, e := range r.Experiments {
		layers[e.Layer] = true
	}
	if len(layers) > MaxLayersPerModel {
		add(r, "experiments", "the experiments span %d layers; at most %d per model", len(layers), MaxLayersPerModel)
	}
	if r.Timeout.Duration < 0 {
		add(r, "timeout", "must not be negative")
	}
	if r.Retries != nil && (*r.Retries < 0 || *r.Retries > MaxRetries) {
		add(r, "retries", "%d is outside 0..%d", *r.Retries, MaxRetries)
	}
	return plan
}

func validateVersions(r *Rollout, add func(*Rollout, string, string, ...any)) map[string]bool {
	versions := map[string]bool{}
	if len(r.Versions) == 0 {
		add(r, "versions", "a rollout needs at least one version")
	}
	for i, v := range r.Versions {
		f := "versions[" + strconv.Itoa(i) + "]"
		switch {
		case !versionNameRe.MatchString(v.Name):
			add(r, f+".name", "%q is not a valid version name (lower-case letters, digits, '.', '-')", v.Name)
		case versions[v.Name]:
			add(r, f+".name", "version %q is listed twice", v.Name)
		}
		versions[v.Name] = true
		if !validProtocol(v.Protocol) {
			add(r, f+".protocol", "%q: want http or grpc", v.Protocol)
		}
		if v.Host != "" && v.Host != HostPatchbay && v.Host != HostOIP {
			add(r, f+".host", "%q: want patchbay (a host reading x-patchbay-version, the default) or oip (an unmodified OIP server: Triton, KServe, MLServer)", v.Host)
		}
		if v.Protocol == GRPC && len(v.GRPCEndpoints) > 0 {
			add(r, f+".grpcEndpoints", "protocol: grpc says endpoints speak OIP gRPC; give OIP REST addresses in endpoints (protocol http) and gRPC ones in grpcEndpoints, or drop grpcEndpoints")
		}
		if len(v.Endpoints) == 0 && len(v.GRPCEndpoints) == 0 {
			add(r, f+".endpoints", "a version needs at least one endpoint (endpoints: OIP REST, grpcEndpoints: OIP gRPC)")
		}
		for _, list := range []struct {
			field string
			eps   []string
		}{{"endpoints", v.Endpoints}, {"grpcEndpoints", v.GRPCEndpoints}, {"metricsEndpoints", v.MetricsEndpoints}} {
			seen := map[string]bool{}
			for j, ep := range list.eps {
				ef := f + "." + list.field + "[" + strconv.Itoa(j) + "]"
				if err := checkEndpoint(ep); err != nil {
					add(r, ef, "%v", err)
				}
				// gRPC clients reject a cluster listing one address twice.
				if seen[ep] {
					add(r, ef, "%q is listed twice", ep)
				}
				seen[ep] = true
			}
		}
	}
	// A protocol is served by the model only if every version with a share serves it, so
	// that the baseline split and every experiment arm have a cluster of the caller's
	// protocol. A model must serve at least one.
	if len(r.Versions) > 0 && len(r.Traffic) > 0 && !r.Serves(REST) && !r.Serves(GRPC) {
		var parts []string
		for _, v := range r.Versions {
			if !r.HasShare(v.Name) {
				continue
			}
			var ps []string
			if v.Serves(REST) {
				ps = append(ps, "REST")
			}
			if v.Serves(GRPC) {
				ps = append(ps, "gRPC")
			}
			parts = append(parts, v.Name+": "+strings.Join(ps, "+"))
		}
		add(r, "versions", "no protocol is served by every version with traffic or an experiment arm (%s): a model needs one protocol all of them serve", strings.Join(parts, ", "))
	}
	return versions
}

func validateTraffic(r *Rollout, versions map[string]bool, add func(*Rollout, string, string, ...any)) {
	if len(r.Traffic) == 0 {
		add(r, "traffic", "missing: give each version's percent of baseline traffic (summing to 100)")
		return
	}
	sum := 0
	names := make([]string, 0, len(r.Traffic))
	for v := range r.Traffic {
		names = append(names, v)
	}
	sort.Strings(names)
	for _, v := range names {
		p := r.Traffic[v]
		if !versions[v] {
			add(r, "traffic."+v, "unknown version %q (versions: %s)", v, versionList(r))
		}
		if p < 0 || p > 100 {
			add(r, "traffic."+v, "%d is outside 0..100", p)
		}
		sum += p
	}
	if sum != 100 {
		add(r, "traffic", "weights sum to %d, want 100", sum)
	}
}

// checkEndpoint accepts host:port where host is an IP address or a DNS name.
func checkEndpoint(ep string) error {
	host, port, err := net.SplitHostPort(ep)
	if err != nil {
		return fmt.Errorf("%q: want host:port", ep)
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("%q: port must be 1..65535", ep)
	}
	if host == "" {
		return fmt.Errorf("%q: empty host", ep)
	}
	if net.ParseIP(host) == nil && !validHostname(host) {
		return fmt.Errorf("%q: host is neither an IP address nor a DNS name", ep)
	}
	return nil
}

func validHostname(h string) bool {
	if len(h) > 253 {
		return false
	}
	for _, l := range strings.Split(strings.TrimSuffix(h, "."), ".") {
		if !modelNameRe.MatchString(strings.ToLower(l)) {
			return false
		}
	}
	return true
}

func versionList(r *Rollout) string {
	names := make([]string, len(r.Versions))
	for i, v := range r.Versions {
		names[i] = v.Name
	}
	return strings.Join(names, ", ")
}

func validProtocol(p string) bool { return p == "http" || p == "grpc" }

// ValidModelName reports whether s is a valid model name (a DNS label), for callers that
// take a model name from outside (the admin API, the CLI).
func ValidModelName(s string) bool { return modelNameRe.MatchString(s) }

// Warnings are problems that do not stop a set from being served, each located like a
// validation error: a REST endpoint shared by several host: oip versions (see below), and
// a gRPC endpoint shared by several versions of a model. gRPC
// paths carry no version (the OIP gRPC request names one only in model_version, which
// Envoy does not rewrite), so an unmodified OIP gRPC server (Triton, KServe, MLServer)
// holding several versions cannot tell which one Envoy routed to: give each version its
// own gRPC endpoints, or run a host that honours x-patchbay-version (patchbay modelhost).
func Warnings(s *Set) []*Error {
	var out []*Error
	for _, r := range s.Rollouts {
		// An unmodified OIP server (host: oip) holding several versions on one REST endpoint
		// answers the baseline split with its default version: Envoy cannot rewrite the path
		// per weighted cluster, only on routes that name the version.
		firstREST := map[string]string{}
		for i, v := range r.Versions {
			if !v.OIPHost() || v.Protocol == GRPC {
				continue
			}
			for j, ep := range v.Endpoints {
				prev, ok := firstREST[ep]
				if !ok || prev == v.Name {
					firstREST[ep] = v.Name
					continue
				}
				field := "versions[" + strconv.Itoa(i) + "].endpoints[" + strconv.Itoa(j) + "]"
				out = append(out, &Error{File: r.Source.File, Line: r.Line(field), Field: field,
					Msg: fmt.Sprintf("warning: REST endpoint %q of a host: oip version also serves version %q: baseline-split requests reach it on the unversioned path and get the server's default version; give each version its own endpoints", ep, prev)})
			}
		}
		first := map[string]string{}
		for i, v := range r.Versions {
			for j, ep := range v.GRPCAddrs() {
				prev, ok := first[ep]
				if !ok {
					first[ep] = v.Name
					continue
				}
				if prev == v.Name {
					continue
				}
				field := "versions[" + strconv.Itoa(i) + "]." + map[bool]string{true: "endpoints", false: "grpcEndpoints"}[v.Protocol == GRPC] + "[" + strconv.Itoa(j) + "]"
				out = append(out, &Error{File: r.Source.File, Line: r.Line(field), Field: field,
					Msg: fmt.Sprintf("warning: gRPC endpoint %q also serves version %q: only a host that reads x-patchbay-version (patchbay modelhost) can tell the versions apart over gRPC; give each version its own gRPC endpoints for other OIP servers", ep, prev)})
			}
		}
	}
	return out
}
