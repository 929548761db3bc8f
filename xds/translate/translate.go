// Package translate turns validated rollouts into xDS resources: Envoy listeners, routes,
// clusters and endpoints (edge and sidecar), the proxyless gRPC flavour, and the ext_proc
// policy. Every function here is pure: same input, same output, golden-tested.
package translate

import (
	"fmt"
	"net"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/patchbay-io/patchbay/api/headers"
	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
	"github.com/patchbay-io/patchbay/xds/rollout"
)

// Names of things the control plane emits and the bootstraps refer to.
const (
	EdgeListener    = "patchbay_edge"
	SidecarListener = "patchbay_sidecar"
	// RouteConfigName is the one RouteConfiguration of the shape before Scoped RDS.
	//
	// Deprecated: Envoy nodes now use ScopedRoutesName, ModelRouteName and
	// FallbackRouteName; kept for the benchmark's reference of the old shape.
	RouteConfigName = "patchbay"
	// ScopedRoutesName is the HCM's scoped_routes name (the SRDS collection).
	ScopedRoutesName = "patchbay"
	// FallbackRouteName is the RouteConfiguration of requests naming no model (the
	// scope key ("", "")): gRPC calls without x-patchbay-model.
	FallbackRouteName = "patchbay/fallback"
	// FallbackScopeName is the ScopedRouteConfiguration of FallbackRouteName.
	FallbackScopeName = "patchbay/scope/fallback"
	// RouteKeyHeader is the header the early header mutation sets from the path and
	// x-patchbay-model; the scope key is read from it (see ScopeKey).
	RouteKeyHeader = headers.RouteKey
	ExtprocCluster = "patchbay_extproc"
	DefaultTimeout = 200 * time.Millisecond
	// HealthCheckInterval and HealthCheckTimeout are those of the active health checks
	// emitted on every model cluster (2 failures: unhealthy, 1 success: healthy); the
	// control plane's version prober uses the same by default.
	HealthCheckInterval = 2 * time.Second
	HealthCheckTimeout  = time.Second
	defaultRetryOn      = "connect-failure,refused-stream,reset,unavailable,retriable-status-codes"
	grpcOIPPrefix       = "/inference.GRPCInferenceService/"
	restModelsPrefix    = "/v2/models/"
)

// ModelRouteName names model m's RouteConfiguration.
func ModelRouteName(m string) string { return "patchbay/model/" + m }

// ScopeName names one ScopedRouteConfiguration of model m; shape is one of base, infer,
// ready, versions, named, health-live, health-ready.
func ScopeName(m, shape string) string { return "patchbay/scope/" + m + "/" + shape }

// Input is everything a translation depends on.
type Input struct {
	Set *rollout.Set
	// Slots holds each model's current slot map (see NextSlotMap); a model without one
	// gets the initial layout.
	Slots map[string]SlotMap
	// Resolved maps each DNS host name used in an endpoint to its current IP addresses.
	// The control plane resolves names itself so that every flavour gets EDS with IPs.
	Resolved map[string][]string
	// Zones maps an endpoint IP address to its zone (Kubernetes: the EndpointSlice
	// endpoint's zone). A version's endpoints with a zone are served in one EDS locality
	// per zone (Locality.Zone, weighted by its endpoint count, so every endpoint keeps an
	// even share), which Envoy's zone-aware routing and grpc-go's locality picking use;
	// endpoints without one stay in the version's own locality.
	Zones map[string]string
	// Unhealthy marks the versions the control plane's prober found unhealthy (model ->
	// version). Their baseline slots are lent to the model's healthy versions and their
	// version routes (x-patchbay-version) are not emitted, for as long as they are marked;
	// Slots itself is not changed. A model whose every version with a share, or every
	// version with a baseline share, is marked keeps its split unchanged (fail static).
	Unhealthy map[string]map[string]bool
}

// Options are the deployment knobs that come from flags.
type Options struct {
	EdgeAddress    string        // host:port of the edge listener
	SidecarAddress string        // host:port of the sidecar outbound listener
	ExtprocTimeout time.Duration // ext_proc message_timeout; 0 means DefaultTimeout
	AccessLog      bool          // stdout access log with the routing decision

	// UpstreamTLS, when its CA is set, makes Envoy's clusters to model hosts originate TLS
	// (presenting Cert/Key when set) for every version; without it only versions with
	// `tls: true` do, and those need it set. Paths are as Envoy sees them; Envoy reads them
	// through SDS from files, so rotation needs no push.
	UpstreamTLS    TLSFiles
	AllUpstreamTLS bool // --upstream-tls: every version, not only `tls: true` ones
	// EdgeTLS, when Cert is set, makes the edge listener terminate TLS (requiring client
	// certificates when CA is set too).
	EdgeTLS TLSFiles
}

// TLSFiles are PEM paths as Envoy sees them.
type TLSFiles struct{ Cert, Key, CA string }

// Role is the kind of Envoy node.
type Role int

const (
	// Edge is an Envoy in front of the model hosts.
	Edge Role = iota
	// Sidecar is an Envoy beside a client service, outbound listener on localhost.
	Sidecar
)

// Resources is one flavour's resources by type URL, ready for cache.NewSnapshot.
type Resources map[resource.Type][]types.Resource

// ClusterName names the Envoy cluster of one model version's OIP REST endpoints. Model
// names are DNS labels and version names never hold '_', so the name is unambiguous.
func ClusterName(model, version string) string { return model + "_" + version }

// GRPCClusterName names the cluster of one model version's OIP gRPC endpoints (Envoy's
// gRPC routes and the proxyless flavour): ClusterName + "_grpc". A version name never
// holds '_', so it cannot collide with a REST cluster.
func GRPCClusterName(model, version string) string { return ClusterName(model, version) + "_grpc" }

// ProtocolClusterName is ClusterName for rollout.REST, GRPCClusterName for rollout.GRPC.
func ProtocolClusterName(model, version, protocol string) string {
	if protocol == rollout.GRPC {
		return GRPCClusterName(model, version)
	}
	return ClusterName(model, version)
}

// StatName is a cluster's alt_stat_name: the cluster name with every '.' written "__".
// Envoy's default tag extraction takes the cluster_name tag as the first dot-separated
// token after "cluster." (envoy source/common/config/well_known_names.cc:
// addTokenized(CLUSTER_NAME, "cluster.$.**")), so "ranker_v1.2" would be tagged
// "ranker_v1" and share its stats with version v1. Model and version names hold no '_',
// so the encoding stays unambiguous (a gRPC suffix is a single '_').
func StatName(cluster string) string { return strings.ReplaceAll(cluster, ".", "__") }

// slotMap returns the model's slot map from the input or its initial layout.
func (in *Input) slotMap(r *rollout.Rollout) SlotMap {
	if m := in.Slots[r.Model]; len(m) == Slots {
		return m
	}
	return NextSlotMap(nil, versionNames(r), r.Traffic)
}

// down returns the model's versions to route around: the marked ones, unless every version
// with a share is marked (then nil: nothing changes).
func (in *Input) down(r *rollout.Rollout) map[string]bool {
	bad := in.Unhealthy[r.Model]
	if len(bad) == 0 {
		return nil
	}
	for _, v := range r.Versions {
		if r.HasShare(v.Name) && !bad[v.Name] {
			return bad
		}
	}
	return nil
}

// ServingSlots is the slot map the split is emitted with: the model's slot map, with each
// slot of an unhealthy version lent to the model's healthy versions with a baseline share,
// in rollout order, one slot each in turn (none healthy: unchanged). Slots of healthy versions never move, so their users stay where they are;
// when the version recovers its slots come back to it.
func (in *Input) ServingSlots(r *rollout.Rollout) SlotMap {
	base := in.slotMap(r)
	down := in.down(r)
	if down == nil {
		return base
	}
	var to []string
	for _, v := range r.Versions {
		if r.Traffic[v.Name] > 0 && !down[v.Name] {
			to = append(to, v.Name)
		}
	}
	if len(to) == 0 {
		// No baseline version is healthy: serve the split as it is (fail static) rather than
		// hand the whole model to an experiment-only version, a canary, on the strength of the
		// control plane's own view of the network.
		return base
	}
	out := make(SlotMap, len(base))
	k := 0
	for i, v := range base {
		out[i] = v
		if down[v] {
			out[i] = to[k%len(to)]
			k++
		}
	}
	return out
}

// SlotMaps returns the next slot map of every model given the previous ones.
func SlotMaps(set *rollout.Set, prev map[string]SlotMap) map[string]SlotMap {
	out := make(map[string]SlotMap, len(set.Rollouts))
	for _, r := range set.Rollouts {
		out[r.Model] = NextSlotMap(prev[r.Model], versionNames(r), r.Traffic)
	}
	return out
}

// openVersionNames are the versions a request may name: all but those a rollback closed.
func openVersionNames(r *rollout.Rollout) []string {
	var names []string
	for _, v := range r.Versions {
		if !r.Closed[v.Name] {
			names = append(names, v.Name)
		}
	}
	return names
}

func versionNames(r *rollout.Rollout) []string {
	names := make([]string, len(r.Versions))
	for i, v := range r.Versions {
		names[i] = v.Name
	}
	return names
}

// endpoints returns the IP:port endpoints of a list of a version's addresses, resolving
// DNS names through in.Resolved.
func (in *Input) endpoints(addrs []string) []hostPort {
	var out []hostPort
	// Two names (or a name and its own IP) may give one address: gRPC NACKs a cluster
	// listing an address twice, so each address appears once.
	seen := map[hostPort]bool{}
	add := func(hp hostPort) {
		if !seen[hp] {
			seen[hp] = true
			out = append(out, hp)
		}
	}
	for _, ep := range addrs {
		host, portStr, err := net.SplitHostPort(ep)
		if err != nil {
			continue // rollout.Validate rejects these
		}
		port, _ := strconv.Atoi(portStr)
		if net.ParseIP(host) != nil {
			add(hostPort{host, uint32(port)})
			continue
		}
		ips := append([]string(nil), in.Resolved[host]...)
		sort.Strings(ips)
		for _, ip := range ips {
			add(hostPort{ip, uint32(port)})
		}
	}
	return out
}

type hostPort struct {
	ip   string
	port uint32
}

// Hostnames lists the DNS names (not IP literals) used by endpoints and grpcEndpoints in
// the set, sorted.
func Hostnames(set *rollout.Set) []string {
	seen := map[string]bool{}
	for _, r := range set.Rollouts {
		for _, v := range r.Versions {
			for _, ep := range v.AllEndpoints() {
				host, _, err := net.SplitHostPort(ep)
				if err == nil && net.ParseIP(host) == nil {
					seen[host] = true
				}
			}
		}
	}
	out := make([]string, 0, len(seen))
	for h := range seen {
		out = append(out, h)
	}
	sort.Strings(out)
	return out
}

// Policy builds the ext_proc policy resource from the same input as the Envoy resources.
// Experiments of a layer take consecutive slot ranges in file order, so raising the
// allocation of a layer's last experiment only adds users to it.
func Policy(in *Input, version string) *policyv1.Policy {
	p := &policyv1.Policy{ConfigVersion: version}
	layerNext := map[string]uint32{}
	var layers []string
	for _, r := range in.Set.Rollouts {
		down := in.down(r)
		m := &policyv1.Model{
			Name:     r.Model,
			Salt:     "patchbay/model/" + r.Model,
			Versions: openVersionNames(r),
			Pinning:  r.Pinning,
			BodyMode: r.BodyMode,
		}
		for _, e := range r.Experiments {
			if _, ok := layerNext[e.Layer]; !ok {
				layers = append(layers, e.Layer)
			}
			// Allocation is exact hundredths of a percent, one slot each (LayerSlots is
			// 10000). 0 (a paused experiment) gives an empty range: nobody is assigned.
			start := layerNext[e.Layer]
			alloc := uint32(0)
			if e.Allocation > 0 {
				alloc = uint32(min(int64(e.Allocation), policyv1.LayerSlots))
			}
			end := min(start+alloc, policyv1.LayerSlots)
			layerNext[e.Layer] = end
			// An arm on a version the prober marks unhealthy pauses the whole experiment
			// (empty range; the layer's other ranges stay where they are) until it recovers:
			// its users take the healthy split and are not reported as exposed, so the
			// analysis never counts baseline answers as an arm's, and no arm of it gets
			// traffic the other arms do not.
			for _, a := range e.Arms {
				if down[a.Version] {
					end = start
				}
			}
			pe := &policyv1.Experiment{
				Name:      e.Name,
				Layer:     e.Layer,
				SlotStart: start,
				SlotEnd:   end,
				Salt:      "patchbay/experiment/" + e.Name,
			}
			if e.Match != nil {
				names := make([]string, 0, len(e.Match.Headers))
				for h := range e.Match.Headers {
					names = append(names, h)
				}
				sort.Strings(names)
				for _, h := range names {
					pe.Match = append(pe.Match, &policyv1.HeaderMatch{Name: h, Values: e.Match.Headers[h]})
				}
			}
			for _, a := range e.Arms {
				pe.Arms = append(pe.Arms, &policyv1.Arm{Name: a.Name, Version: a.Version, Weight: uint32(a.Weight)})
			}
			m.Experiments = append(m.Experiments, pe)
		}
		p.Models = append(p.Models, m)
	}
	for _, l := range layers {
		p.Layers = append(p.Layers, &policyv1.Layer{Name: l, Salt: "patchbay/layer/" + l})
	}
	return p
}

func errorJSON(msg string) string {
	return `{"error":` + strconv.Quote(msg) + `}`
}

func mustNonEmpty(name string, rs []types.Resource) error {
	if len(rs) == 0 {
		return fmt.Errorf("no %s", name)
	}
	return nil
}

// ResolvedEndpoints returns the "ip:port" endpoints a list of a version's addresses is
// emitted with (DNS names through resolved), in emitted order.
func ResolvedEndpoints(resolved map[string][]string, addrs []string) []string {
	in := &Input{Resolved: resolved}
	var out []string
	for _, hp := range in.endpoints(addrs) {
		out = append(out, net.JoinHostPort(hp.ip, strconv.Itoa(int(hp.port))))
	}
	return out
}

// UpstreamTLS reports whether Envoy's clusters of a version originate TLS.
func UpstreamTLS(v rollout.Version, opts Options) bool { return upstreamTLS(v, opts) }
