package xdsscale

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/patchbay-io/patchbay/xds/translate"
)

// EdgeNode is an edge Envoy's node as the control plane classifies it (xds.FlavourOf:
// user agent "envoy", no sidecar role: the edge flavour).
func EdgeNode(id string) *corev3.Node {
	return &corev3.Node{Id: id, Cluster: "patchbay-edge", UserAgentName: "envoy"}
}

// envoyTypes are the types an Envoy-like client subscribes to, in the order Envoy's ADS
// mux starts them (CDS and LDS wildcard first, then what they name).
var envoyTypes = []string{resource.ClusterType, resource.ListenerType, resource.ScopedRouteType, resource.RouteType, resource.EndpointType}

// wildcardType: subscribed to as a whole (LDS, CDS, SRDS: Envoy's scoped_rds subscribes to
// every ScopedRouteConfiguration of the collection); the others by the names the held
// resources refer to.
func wildcardType(t string) bool {
	return t == resource.ListenerType || t == resource.ClusterType || t == resource.ScopedRouteType
}

// Held is one resource as the client holds it.
type Held struct {
	Version string // the delta Resource version ("" over SotW)
	Raw     []byte // the Any's value, as received
	Msg     proto.Message
}

// Envoy is an Envoy-like ADS client of the edge flavour over one gRPC stream, delta or
// SotW: LDS, CDS and SRDS wildcard; RDS of every RouteConfiguration its listeners and
// scopes name; EDS of every EDS cluster — the subscriptions Envoy makes (envoy
// source/extensions/config_subscription/grpc/grpc_mux_impl.cc and new_grpc_mux_impl.cc
// drive one stream per ADS; source/common/router/scoped_rds.cc subscribes RDS for each
// scope's route_configuration_name; source/common/upstream/cds_api_helper.cc then EDS per
// cluster). It ACKs every response, and reconnects (with initial_resource_versions over
// delta, as Envoy's delta mux does after a stream failure) when the stream ends.
type Envoy struct {
	Delta bool
	node  *corev3.Node
	cc    *grpc.ClientConn

	mu      sync.Mutex
	notify  chan struct{} // closed and replaced at every change
	res     map[string]map[string]*Held
	got     map[string]bool // a response of this type arrived on the current stream
	subs    map[string][]string
	stats   Stats
	streamN int
	err     error
}

// Stats counts what the client received.
type Stats struct {
	Responses  map[string]int // per type URL
	RouteBytes int            // bytes of RDS resources received (delta Resource / SotW Any)
	Bytes      int            // bytes of every resource received
	Removed    []string       // delta removals: "type name"
	Streams    int            // streams opened (1 + reconnects)
	SotWShort  []string       // SotW LDS/CDS/SRDS responses with fewer resources than the client held: "type got/held"
}

// DialEnvoy connects an Envoy-like client to addr (delta or SotW) with the reconnect
// back-off of Envoy's ADS gRPC stream (base 500 ms, max 30 s, jittered: envoy
// source/common/config/utility.h, "prepareJitteredExponentialBackOffStrategy" defaults).
func DialEnvoy(ctx context.Context, addr, id string, delta bool) (*Envoy, error) {
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<30)),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 500 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 30 * time.Second}}))
	if err != nil {
		return nil, err
	}
	e := &Envoy{Delta: delta, node: EdgeNode(id), cc: cc, notify: make(chan struct{}),
		res: map[string]map[string]*Held{}, got: map[string]bool{}, subs: map[string][]string{},
		stats: Stats{Responses: map[string]int{}}}
	for _, t := range envoyTypes {
		e.res[t] = map[string]*Held{}
	}
	go e.loop(ctx)
	return e, nil
}

// Close closes the client's connection.
func (e *Envoy) Close() { e.cc.Close() }

func (e *Envoy) changed() {
	close(e.notify)
	e.notify = make(chan struct{})
}

func (e *Envoy) loop(ctx context.Context) {
	for ctx.Err() == nil {
		err := e.stream(ctx)
		e.mu.Lock()
		e.err = err
		e.changed()
		e.mu.Unlock()
		if ctx.Err() == nil {
			time.Sleep(50 * time.Millisecond) // the gRPC channel's back-off does the rest
		}
	}
}

// sender sends requests of one stream, delta or SotW.
type sender interface {
	SendMsg(any) error
	RecvMsg(any) error
}

func (e *Envoy) stream(ctx context.Context) error {
	desc := &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}
	method := "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
	if e.Delta {
		method = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
	}
	s, err := e.cc.NewStream(ctx, desc, method, grpc.WaitForReady(true))
	if err != nil {
		return err
	}
	e.mu.Lock()
	e.stats.Streams++
	e.streamN++
	e.got = map[string]bool{}
	// The first request of each type: wildcard types with nothing named; the others with
	// what the client needs now (none on the first stream). After a reconnect, delta
	// requests carry the versions held (initial_resource_versions).
	var first []proto.Message
	for _, t := range envoyTypes {
		names := e.needLocked(t)
		if !wildcardType(t) && len(names) == 0 {
			e.subs[t] = nil
			continue
		}
		e.subs[t] = names
		first = append(first, e.requestLocked(t, names, nil, "", "", true))
	}
	e.mu.Unlock()
	for _, r := range first {
		if err := s.SendMsg(r); err != nil {
			return err
		}
	}
	for {
		var r proto.Message
		if e.Delta {
			r = &discoveryv3.DeltaDiscoveryResponse{}
		} else {
			r = &discoveryv3.DiscoveryResponse{}
		}
		if err := s.RecvMsg(r); err != nil {
			return err
		}
		reqs, err := e.apply(r)
		if err != nil {
			return err
		}
		for _, q := range reqs {
			if err := s.SendMsg(q); err != nil {
				return err
			}
		}
	}
}

// requestLocked builds a request of type t: a subscription change (sub/unsub), an ACK
// (nonce), or a stream's first request (first).
func (e *Envoy) requestLocked(t string, sub, unsub []string, version, nonce string, first bool) proto.Message {
	if e.Delta {
		r := &discoveryv3.DeltaDiscoveryRequest{TypeUrl: t, ResourceNamesSubscribe: sub, ResourceNamesUnsubscribe: unsub, ResponseNonce: nonce}
		if first {
			r.Node = e.node
			if len(e.res[t]) > 0 {
				r.InitialResourceVersions = map[string]string{}
				for n, h := range e.res[t] {
					r.InitialResourceVersions[n] = h.Version
				}
			}
		}
		return r
	}
	r := &discoveryv3.DiscoveryRequest{TypeUrl: t, ResourceNames: e.subs[t], VersionInfo: version, ResponseNonce: nonce}
	if first {
		r.Node = e.node
	}
	return r
}

// apply takes a response in: the resources held, the ACK, and requests for the RDS and
// EDS names that changed.
func (e *Envoy) apply(m proto.Message) ([]proto.Message, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	defer e.changed()
	var typ, nonce, version string
	held := e.res
	switch r := m.(type) {
	case *discoveryv3.DeltaDiscoveryResponse:
		typ, nonce, version = r.GetTypeUrl(), r.GetNonce(), r.GetSystemVersionInfo()
		if held[typ] == nil {
			return nil, fmt.Errorf("response of type %s not subscribed", typ)
		}
		for _, res := range r.GetResources() {
			h, err := decode(typ, res.GetResource())
			if err != nil {
				return nil, err
			}
			h.Version = res.GetVersion()
			held[typ][res.GetName()] = h
			e.count(typ, proto.Size(res))
		}
		for _, n := range r.GetRemovedResources() {
			e.stats.Removed = append(e.stats.Removed, typ+" "+n)
			delete(held[typ], n)
		}
	case *discoveryv3.DiscoveryResponse:
		typ, nonce, version = r.GetTypeUrl(), r.GetNonce(), r.GetVersionInfo()
		if held[typ] == nil {
			return nil, fmt.Errorf("response of type %s not subscribed", typ)
		}
		next := map[string]*Held{}
		for _, a := range r.GetResources() {
			h, err := decode(typ, a)
			if err != nil {
				return nil, err
			}
			next[name(h.Msg)] = h
			e.count(typ, proto.Size(a))
		}
		if wildcardType(typ) {
			// SotW LDS, CDS and SRDS: each response is the whole set; what it lacks, Envoy
			// removes (SRDS: source/common/router/scoped_rds.cc, the SotW onConfigUpdate
			// removes every scope not in the update).
			if len(next) < len(held[typ]) {
				e.stats.SotWShort = append(e.stats.SotWShort, fmt.Sprintf("%s %d/%d", typ, len(next), len(held[typ])))
			}
			held[typ] = next
		} else {
			for n, h := range next {
				held[typ][n] = h
			}
		}
	default:
		return nil, fmt.Errorf("unexpected %T", m)
	}
	e.stats.Responses[typ]++
	e.got[typ] = true
	reqs := []proto.Message{e.requestLocked(typ, nil, nil, version, nonce, false)}
	// Follow what the held resources name now: RDS after LDS/SRDS, EDS after CDS.
	for _, t := range []string{resource.RouteType, resource.EndpointType} {
		need := e.needLocked(t)
		// Sets, not slices.Contains: 10,000 models are 50,000 EDS names.
		needSet, have := make(map[string]bool, len(need)), make(map[string]bool, len(e.subs[t]))
		for _, n := range need {
			needSet[n] = true
		}
		for _, n := range e.subs[t] {
			have[n] = true
		}
		var sub, unsub []string
		for _, n := range need {
			if !have[n] {
				sub = append(sub, n)
			}
		}
		for _, n := range e.subs[t] {
			if !needSet[n] {
				unsub = append(unsub, n)
				delete(held[t], n)
			}
		}
		if len(sub) == 0 && len(unsub) == 0 {
			continue
		}
		first := len(e.subs[t]) == 0
		e.subs[t] = need
		if e.Delta {
			reqs = append(reqs, e.requestLocked(t, sub, unsub, "", "", first))
		} else {
			reqs = append(reqs, e.requestLocked(t, nil, nil, "", "", first))
		}
	}
	return reqs, nil
}

func (e *Envoy) count(typ string, n int) {
	e.stats.Bytes += n
	if typ == resource.RouteType {
		e.stats.RouteBytes += n
	}
}

// needLocked is the sorted names of type t the held resources refer to (RDS, EDS).
func (e *Envoy) needLocked(t string) []string {
	set := map[string]bool{}
	switch t {
	case resource.RouteType:
		for _, h := range e.res[resource.ListenerType] {
			for _, hcm := range hcms(h.Msg.(*listenerv3.Listener)) {
				if n := hcm.GetRds().GetRouteConfigName(); n != "" {
					set[n] = true
				}
				for _, s := range hcm.GetScopedRoutes().GetScopedRouteConfigurationsList().GetScopedRouteConfigurations() {
					set[s.GetRouteConfigurationName()] = true
				}
			}
		}
		for _, h := range e.res[resource.ScopedRouteType] {
			if n := h.Msg.(*routev3.ScopedRouteConfiguration).GetRouteConfigurationName(); n != "" {
				set[n] = true
			}
		}
	case resource.EndpointType:
		for n, h := range e.res[resource.ClusterType] {
			c := h.Msg.(*clusterv3.Cluster)
			if c.GetType() == clusterv3.Cluster_EDS {
				if sn := c.GetEdsClusterConfig().GetServiceName(); sn != "" {
					n = sn
				}
				set[n] = true
			}
		}
	default:
		return nil
	}
	out := make([]string, 0, len(set))
	for n := range set {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

func hcms(l *listenerv3.Listener) []*hcmv3.HttpConnectionManager {
	var out []*hcmv3.HttpConnectionManager
	chains := append([]*listenerv3.FilterChain{l.GetDefaultFilterChain()}, l.GetFilterChains()...)
	for _, fc := range chains {
		for _, f := range fc.GetFilters() {
			var h hcmv3.HttpConnectionManager
			if f.GetTypedConfig().MessageIs(&h) && f.GetTypedConfig().UnmarshalTo(&h) == nil {
				out = append(out, &h)
			}
		}
	}
	return out
}

func decode(typ string, a *anypb.Any) (*Held, error) {
	var m proto.Message
	switch typ {
	case resource.ListenerType:
		m = &listenerv3.Listener{}
	case resource.ClusterType:
		m = &clusterv3.Cluster{}
	case resource.RouteType:
		m = &routev3.RouteConfiguration{}
	case resource.ScopedRouteType:
		m = &routev3.ScopedRouteConfiguration{}
	case resource.EndpointType:
		m = &endpointv3.ClusterLoadAssignment{}
	default:
		return nil, fmt.Errorf("type %s not modelled", typ)
	}
	if a.GetTypeUrl() != typ {
		return nil, fmt.Errorf("resource of type %s in a %s response", a.GetTypeUrl(), typ)
	}
	if err := proto.Unmarshal(a.GetValue(), m); err != nil {
		return nil, err
	}
	// Keep of clusters and endpoints only what the client follows (the EDS name): a
	// thousand clients holding every decoded cluster would be the load generator's memory.
	switch r := m.(type) {
	case *clusterv3.Cluster:
		m = &clusterv3.Cluster{Name: r.GetName(), ClusterDiscoveryType: r.GetClusterDiscoveryType(), EdsClusterConfig: r.GetEdsClusterConfig()}
	case *endpointv3.ClusterLoadAssignment:
		m = &endpointv3.ClusterLoadAssignment{ClusterName: r.GetClusterName()}
	}
	return &Held{Raw: a.GetValue(), Msg: m}, nil
}

func name(m proto.Message) string {
	switch r := m.(type) {
	case *listenerv3.Listener:
		return r.GetName()
	case *clusterv3.Cluster:
		return r.GetName()
	case *routev3.RouteConfiguration:
		return r.GetName()
	case *routev3.ScopedRouteConfiguration:
		return r.GetName()
	case *endpointv3.ClusterLoadAssignment:
		return r.GetClusterName()
	}
	return ""
}

// Snapshot is a copy of what the client holds and has counted.
type Snapshot struct {
	Res   map[string]map[string]*Held
	Got   map[string]bool
	Stats Stats
	Err   error
}

// Snap copies the client's state (the Held values are shared, never modified).
func (e *Envoy) Snap() Snapshot {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.snapLocked()
}

// viewLocked is the client's state without copying (valid while e.mu is held).
func (e *Envoy) viewLocked() Snapshot {
	return Snapshot{Res: e.res, Got: e.got, Err: e.err, Stats: e.stats}
}

func (e *Envoy) snapLocked() Snapshot {
	s := Snapshot{Res: map[string]map[string]*Held{}, Got: map[string]bool{}, Err: e.err, Stats: e.stats}
	s.Stats.Responses = map[string]int{}
	for k, v := range e.stats.Responses {
		s.Stats.Responses[k] = v
	}
	s.Stats.Removed = slices.Clone(e.stats.Removed)
	s.Stats.SotWShort = slices.Clone(e.stats.SotWShort)
	for t, m := range e.res {
		s.Res[t] = map[string]*Held{}
		for n, h := range m {
			s.Res[t][n] = h
		}
	}
	for t, v := range e.got {
		s.Got[t] = v
	}
	return s
}

// Wait blocks until ok holds on the client's state (checked at every change, with the
// client's lock held: ok must not call the client) or ctx ends.
func (e *Envoy) Wait(ctx context.Context, ok func(Snapshot) bool) (Snapshot, error) {
	for {
		// ok runs on the live state under the lock (no copy per change: at 10,000 models
		// the state is ~180,000 resources); only the answer is copied.
		e.mu.Lock()
		ch := e.notify
		if ok(e.viewLocked()) {
			s := e.snapLocked()
			e.mu.Unlock()
			return s, nil
		}
		e.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			s := e.Snap()
			return s, fmt.Errorf("%w (last stream error: %v)", ctx.Err(), s.Err)
		}
	}
}

// Complete: the client holds a full config on its current stream: LDS and CDS answered,
// SRDS answered when a listener uses scoped RDS, and every RDS and EDS name the held
// resources refer to is held.
func (s Snapshot) Complete() bool {
	if !s.Got[resource.ListenerType] || !s.Got[resource.ClusterType] || len(s.Res[resource.ListenerType]) == 0 {
		return false
	}
	scoped := false
	for _, h := range s.Res[resource.ListenerType] {
		for _, hcm := range hcms(h.Msg.(*listenerv3.Listener)) {
			scoped = scoped || hcm.GetScopedRoutes().GetScopedRds() != nil
		}
	}
	if scoped && (!s.Got[resource.ScopedRouteType] || len(s.Res[resource.ScopedRouteType]) == 0) {
		return false
	}
	e := &Envoy{res: s.Res}
	for _, t := range []string{resource.RouteType, resource.EndpointType} {
		for _, n := range e.needLocked(t) {
			if s.Res[t][n] == nil {
				return false
			}
		}
	}
	return true
}

// RouteFor is the RouteConfiguration a request is routed by, and the scope lookups it
// took: with scoped routes, the scope key built as the HCM's scope_key_builder says
// (envoy source/common/router/scoped_config_impl.cc: HeaderValueExtractorImpl splits the
// header value by element_separator and takes the element at index; a missing element
// makes a null fragment and a key with a null fragment matches no scope) from the
// x-patchbay-route-key header the HCM's early header mutation sets to
// "%REQ(:path)%/%REQ(x-patchbay-model)%/" (a missing header formats as ""), then one hash
// lookup of that key; without scopes, the HCM's RDS name and no lookup.
func (s Snapshot) RouteFor(req Request) (*routev3.RouteConfiguration, int, error) {
	for _, h := range s.Res[resource.ListenerType] {
		for _, hcm := range hcms(h.Msg.(*listenerv3.Listener)) {
			if n := hcm.GetRds().GetRouteConfigName(); n != "" {
				rc, ok := s.Res[resource.RouteType][n]
				if !ok {
					return nil, 0, fmt.Errorf("route config %q not held", n)
				}
				return rc.Msg.(*routev3.RouteConfiguration), 0, nil
			}
			sr := hcm.GetScopedRoutes()
			if sr == nil {
				continue
			}
			var key []string
			for _, f := range sr.GetScopeKeyBuilder().GetFragments() {
				x := f.GetHeaderValueExtractor()
				if x == nil {
					return nil, 1, fmt.Errorf("scope key fragment %v not modelled", f)
				}
				v, ok := req.Headers[strings.ToLower(x.GetName())]
				if strings.EqualFold(x.GetName(), translate.RouteKeyHeader) {
					v, ok = req.Path+"/"+req.Headers["x-patchbay-model"]+"/", true
				}
				parts := strings.Split(v, x.GetElementSeparator())
				idx := int(x.GetIndex())
				if !ok || idx >= len(parts) {
					return nil, 1, nil // null fragment: no scope
				}
				key = append(key, parts[idx])
			}
			for _, h := range s.Res[resource.ScopedRouteType] {
				sc := h.Msg.(*routev3.ScopedRouteConfiguration)
				var k []string
				for _, f := range sc.GetKey().GetFragments() {
					k = append(k, f.GetStringKey())
				}
				if slices.Equal(k, key) {
					rc, ok := s.Res[resource.RouteType][sc.GetRouteConfigurationName()]
					if !ok {
						return nil, 1, fmt.Errorf("route config %q of scope %q not held", sc.GetRouteConfigurationName(), sc.GetName())
					}
					return rc.Msg.(*routev3.RouteConfiguration), 1, nil
				}
			}
			return nil, 1, nil
		}
	}
	return nil, 0, fmt.Errorf("no HTTP connection manager with routes")
}

// Matchers is what a request passes through before its route is chosen: scope lookups
// plus the route matchers Walk evaluates in the chosen table, and the matched route.
func (s Snapshot) Matchers(req Request) (int, string, error) {
	rc, lookups, err := s.RouteFor(req)
	if err != nil || rc == nil {
		return lookups, "", err
	}
	n, route, err := Walk(rc, req)
	return lookups + n, route, err
}

// Same reports whether two held resources have the same bytes.
func Same(a, b *Held) bool { return a != nil && b != nil && bytes.Equal(a.Raw, b.Raw) }
