// Package envoymodel is a TEST MODEL of Envoy's documented HTTP routing behaviour, driven by
// the real xDS resources of patchbay's control plane and calling the real ext_proc server.
// It is not Envoy and is never used outside tests; see README.md for what it models.
package envoymodel

import (
	"bytes"
	"context"
	"errors"

	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	headermutationv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/header_mutation/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	earlymutationv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/http/early_header_mutation/header_mutation/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/anypb"
)

// Config configures the model proxy.
type Config struct {
	XDSAddr     string // the control plane's ADS address
	ExtprocAddr string // the address behind the ext_proc filter's cluster (patchbay_extproc)
	NodeID      string

	// ExtprocCluster is the bootstrap's patchbay_extproc cluster: its gRPC health check,
	// outlier detection and panic threshold decide when the stream fails at once
	// (extproc_cluster.go). Nil: ext_proc is always called.
	ExtprocCluster *clusterv3.Cluster
}

// Proxy is the running model. Handler serves HTTP as the edge listener would.
type Proxy struct {
	cfg     Config
	state   atomic.Pointer[state]
	extproc *grpc.ClientConn
	epHost  *extprocHost // nil without Config.ExtprocCluster
	client  *http.Client // HTTP/1.1 clusters (Envoy's default upstream protocol)
	h2c     *http.Client // clusters with http2_protocol_options, plaintext
	rr      atomic.Uint64
	mirrors sync.WaitGroup
	ctx     context.Context
	health  healthState

	// Counters tests may read.
	ExtprocFailures atomic.Int64 // ext_proc calls that failed open
}

// state is one consistent view of the received resources.
type state struct {
	version  string
	listener *listenerv3.Listener
	hcm      *hcmv3.HttpConnectionManager
	routes   *routev3.RouteConfiguration // the HCM's rds route table (one table)
	// Scoped routes (scoped.go): the SRDS scopes by name and the route tables they name.
	scopes    map[string]*routev3.ScopedRouteConfiguration
	tables    map[string]*routev3.RouteConfiguration
	clusters  map[string]*clusterv3.Cluster
	endpoints map[string]*endpointv3.ClusterLoadAssignment
	secrets   map[string]*tlsv3.Secret
}

// Start connects to the control plane and to ext_proc and keeps the resources current
// until ctx is done.
func Start(ctx context.Context, cfg Config) (*Proxy, error) {
	if cfg.NodeID == "" {
		cfg.NodeID = "envoymodel"
	}
	ep, err := grpc.NewClient(cfg.ExtprocAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	p := &Proxy{
		cfg:     cfg,
		ctx:     ctx,
		extproc: ep,
		client:  upstreamClient(func(p *http.Protocols) { p.SetHTTP1(true) }),
		h2c:     upstreamClient(func(p *http.Protocols) { p.SetUnencryptedHTTP2(true) }),
	}
	p.state.Store(&state{clusters: map[string]*clusterv3.Cluster{}, endpoints: map[string]*endpointv3.ClusterLoadAssignment{}})
	if p.epHost, err = newExtprocHost(ctx, cfg.ExtprocCluster, cfg.ExtprocAddr); err != nil {
		ep.Close()
		return nil, err
	}
	go p.xdsLoop(ctx)
	go func() { <-ctx.Done(); ep.Close(); p.mirrors.Wait() }()
	return p, nil
}

// Version is the config version of the last complete set of resources applied: the
// config version the last response's version_info names. Envoy keeps version_info as it
// comes; patchbay's control plane labels it "pb-<n>/<config version>" (per-type counters
// of its linear caches, then the config version being served), so the part after the
// slash is compared with the control plane's /status.
func (p *Proxy) Version() string {
	v := p.state.Load().version
	if i := strings.LastIndexByte(v, '/'); i >= 0 {
		return v[i+1:]
	}
	return v
}

// Endpoints counts the endpoints the model has for a cluster.
func (p *Proxy) Endpoints(cluster string) int {
	n := 0
	for _, le := range p.state.Load().endpoints[cluster].GetEndpoints() {
		n += len(le.GetLbEndpoints())
	}
	return n
}

// Ready reports whether a listener and its routes have arrived.
func (p *Proxy) Ready() bool {
	s := p.state.Load()
	return s.hcm != nil && s.hasRoutes()
}

// xdsLoop keeps an ADS stream open, reconnecting as Envoy does, and keeps the last
// resources while the control plane is away.
func (p *Proxy) xdsLoop(ctx context.Context) {
	for ctx.Err() == nil {
		err := p.xdsStream(ctx)
		if ctx.Err() != nil {
			return
		}
		_ = err
		select {
		case <-ctx.Done():
			return
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (p *Proxy) xdsStream(ctx context.Context) error {
	conn, err := grpc.NewClient(p.cfg.XDSAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		return err
	}
	node := &corev3.Node{Id: p.cfg.NodeID, Cluster: "patchbay-edge", UserAgentName: "envoy"}
	send := func(typ, version, nonce string, names []string) error {
		return s.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: typ, VersionInfo: version, ResponseNonce: nonce, ResourceNames: names})
	}
	for _, typ := range []string{resource.ClusterType, resource.ListenerType} {
		if err := send(typ, "", "", nil); err != nil {
			return err
		}
	}
	subscribedRoutes, subscribedEDS, subscribedSDS := "", "", ""
	subscribedSRDS := false
	for {
		r, err := s.Recv()
		if err != nil {
			return err
		}
		cur := p.state.Load()
		next := *cur
		switch r.GetTypeUrl() {
		case resource.ClusterType:
			next.clusters = map[string]*clusterv3.Cluster{}
			var names []string
			for _, a := range r.GetResources() {
				c := &clusterv3.Cluster{}
				if err := a.UnmarshalTo(c); err != nil {
					return err
				}
				next.clusters[c.GetName()] = c
				names = append(names, c.GetName())
			}
			if key := strings.Join(names, ","); key != subscribedEDS {
				subscribedEDS = key
				if err := send(resource.EndpointType, "", "", names); err != nil {
					return err
				}
			}
		case resource.EndpointType:
			// A SotW EDS, RDS or SDS response may carry only the resources that changed:
			// Envoy updates the watches of the names it carries and leaves the others as they
			// are (envoy source/extensions/config_subscription/grpc/grpc_mux_impl.cc,
			// GrpcMuxImpl::onDiscoveryResponse: "onConfigUpdate should be called only on
			// watches(clusters/routes) that have updates in the message for EDS/RDS"). What is
			// kept is what is still subscribed.
			next.endpoints = keepSubscribed(next.endpoints, subscribedEDS)
			for _, a := range r.GetResources() {
				c := &endpointv3.ClusterLoadAssignment{}
				if err := a.UnmarshalTo(c); err != nil {
					return err
				}
				next.endpoints[c.GetClusterName()] = c
			}
		case resource.ListenerType:
			for _, a := range r.GetResources() {
				l := &listenerv3.Listener{}
				if err := a.UnmarshalTo(l); err != nil {
					return err
				}
				hcm := &hcmv3.HttpConnectionManager{}
				if err := l.GetFilterChains()[0].GetFilters()[0].GetTypedConfig().UnmarshalTo(hcm); err != nil {
					return err
				}
				next.listener, next.hcm = l, hcm
				// Scoped routes: a wildcard SRDS subscription (Envoy's ScopedRdsConfigSubscription
				// asks for every scope: source/common/router/scoped_rds.cc), then RDS for each
				// scope's route_configuration_name, below.
				if hcm.GetScopedRoutes() != nil && !subscribedSRDS {
					subscribedSRDS = true
					if err := send(resource.ScopedRouteType, "", "", nil); err != nil {
						return err
					}
				}
				if rn := hcm.GetRds().GetRouteConfigName(); rn != "" && rn != subscribedRoutes {
					subscribedRoutes = rn
					if err := send(resource.RouteType, "", "", []string{rn}); err != nil {
						return err
					}
				}
			}
		case resource.ScopedRouteType:
			// SotW SRDS is the whole set: Envoy removes every scope the update does not
			// carry, and takes an empty update as a failed one, keeping what it has (envoy
			// source/common/router/scoped_rds.cc, ScopedRdsConfigSubscription::onConfigUpdate
			// for a resource list: scoped_routes_to_remove starts as every known scope;
			// update_empty). A control plane that sends only the changed scopes makes Envoy
			// drop the others: the model does the same.
			if len(r.GetResources()) == 0 {
				break
			}
			next.scopes = map[string]*routev3.ScopedRouteConfiguration{}
			for _, a := range r.GetResources() {
				sc := &routev3.ScopedRouteConfiguration{}
				if err := a.UnmarshalTo(sc); err != nil {
					return err
				}
				next.scopes[sc.GetName()] = sc
			}
			if names := strings.Join(scopeTables(&next), ","); names != subscribedRoutes {
				subscribedRoutes = names
				if err := send(resource.RouteType, "", "", scopeTables(&next)); err != nil {
					return err
				}
			}
		case resource.RouteType:
			next.tables = keepSubscribed(next.tables, subscribedRoutes)
			for _, a := range r.GetResources() {
				rc := &routev3.RouteConfiguration{}
				if err := a.UnmarshalTo(rc); err != nil {
					return err
				}
				next.routes = rc
				next.tables[rc.GetName()] = rc
			}
		case resource.SecretType:
			next.secrets = keepSubscribed(next.secrets, subscribedSDS)
			for _, a := range r.GetResources() {
				sec := &tlsv3.Secret{}
				if err := a.UnmarshalTo(sec); err != nil {
					return err
				}
				next.secrets[sec.GetName()] = sec
			}
		}
		// SDS: subscribe to the secrets the clusters and the listener name.
		if t := r.GetTypeUrl(); t == resource.ClusterType || t == resource.ListenerType {
			if names := secretNames(&next); strings.Join(names, ",") != subscribedSDS {
				subscribedSDS = strings.Join(names, ",")
				if err := send(resource.SecretType, "", "", names); err != nil {
					return err
				}
			}
		}
		next.version = r.GetVersionInfo()
		p.state.Store(&next)
		p.syncHealth(p.ctx, &next)
		// ACK.
		var names []string
		switch r.GetTypeUrl() {
		case resource.RouteType:
			names = strings.Split(subscribedRoutes, ",")
		case resource.EndpointType:
			names = strings.Split(subscribedEDS, ",")
		case resource.SecretType:
			names = strings.Split(subscribedSDS, ",")
		}
		if err := send(r.GetTypeUrl(), r.GetVersionInfo(), r.GetNonce(), names); err != nil {
			return err
		}
	}
}

// ServeHTTP handles one downstream request as Envoy's HCM would.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	s := p.state.Load()
	if s.hcm == nil || !s.hasRoutes() {
		localReply(w, req, http.StatusServiceUnavailable, "no listener config yet", nil, -1)
		return
	}
	body, err := io.ReadAll(io.LimitReader(req.Body, 1<<20+1))
	if err != nil || len(body) > 1<<20 {
		localReply(w, req, http.StatusRequestEntityTooLarge, "request body too large", nil, -1)
		return
	}
	h := req.Header.Clone()
	// Early header mutations run before route selection and before any filter.
	for _, e := range s.hcm.GetEarlyHeaderMutationExtensions() {
		em := &earlymutationv3.HeaderMutation{}
		if err := e.GetTypedConfig().UnmarshalTo(em); err != nil {
			localReply(w, req, 500, err.Error(), nil, -1)
			return
		}
		for _, m := range em.GetMutations() {
			if r := m.GetRemove(); r != "" {
				h.Del(r)
			}
			if a := m.GetAppend(); a != nil {
				applyFormatted(h, a, func(name string) string { return firstRequestHeader(req, h, name) })
			}
		}
	}
	for _, f := range s.hcm.GetHttpFilters() {
		switch f.GetName() {
		case "envoy.filters.http.header_mutation":
			hm := &headermutationv3.HeaderMutation{}
			if err := f.GetTypedConfig().UnmarshalTo(hm); err != nil {
				localReply(w, req, 500, err.Error(), nil, -1)
				return
			}
			for _, m := range hm.GetMutations().GetRequestMutations() {
				if r := m.GetRemove(); r != "" {
					h.Del(r)
				}
				if a := m.GetAppend(); a != nil {
					applyHeaderOption(h, a, h)
				}
			}
		case "envoy.filters.http.ext_proc":
			cfg := &extprocfilterv3.ExternalProcessor{}
			if err := f.GetTypedConfig().UnmarshalTo(cfg); err != nil {
				localReply(w, req, 500, err.Error(), nil, -1)
				return
			}
			imm, err := p.extprocCall(req.Context(), cfg, req, h, &body)
			if err != nil {
				if !cfg.GetFailureModeAllow() {
					localReply(w, req, http.StatusInternalServerError, "ext_proc failed", nil, -1)
					return
				}
				p.ExtprocFailures.Add(1)
				continue
			}
			if imm != nil {
				// ext_proc's ImmediateResponse is a local reply with the response's
				// grpc_status when set (envoy source/extensions/filters/http/ext_proc/
				// ext_proc.cc, Filter::sendImmediateResponse; default status 200).
				hdrs := http.Header{}
				for _, o := range imm.GetHeaders().GetSetHeaders() {
					hdrs.Set(o.GetHeader().GetKey(), headerValue(o.GetHeader()))
				}
				code := int(imm.GetStatus().GetCode())
				if code == 0 {
					code = 200
				}
				gs := -1
				if imm.GetGrpcStatus() != nil {
					gs = int(imm.GetGrpcStatus().GetStatus())
				}
				localReply(w, req, code, string(imm.GetBody()), hdrs, gs)
				return
			}
		case "envoy.filters.http.router":
			p.route(w, req, h, body, s)
			return
		}
	}
	localReply(w, req, http.StatusInternalServerError, "no router filter", nil, -1)
}

// callExtproc speaks Envoy's ext_proc sequence for request headers (and a buffered body
// when the server asks for it through mode_override). It applies header mutations to h
// and returns an ImmediateResponse if the server sent one.
func (p *Proxy) callExtproc(ctx context.Context, cfg *extprocfilterv3.ExternalProcessor, req *http.Request, h http.Header, body *[]byte) (*extprocv3.ImmediateResponse, error) {
	timeout := cfg.GetMessageTimeout().AsDuration()
	if timeout <= 0 {
		timeout = 200 * time.Millisecond
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	stream, err := extprocv3.NewExternalProcessorClient(p.extproc).Process(ctx)
	if err != nil {
		return nil, err
	}
	defer stream.CloseSend()
	hm := &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
		{Key: ":method", RawValue: []byte(req.Method)},
		{Key: ":path", RawValue: []byte(req.URL.RequestURI())},
		{Key: ":authority", RawValue: []byte(req.Host)},
		{Key: ":scheme", RawValue: []byte("http")},
	}}
	for k, vs := range h {
		for _, v := range vs {
			hm.Headers = append(hm.Headers, &corev3.HeaderValue{Key: strings.ToLower(k), RawValue: []byte(v)})
		}
	}
	if err := stream.Send(&extprocv3.ProcessingRequest{
		Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{Headers: hm, EndOfStream: len(*body) == 0}},
	}); err != nil {
		return nil, err
	}
	resp, err := stream.Recv()
	if err != nil {
		return nil, err
	}
	if imm := resp.GetImmediateResponse(); imm != nil {
		return imm, nil
	}
	rh := resp.GetRequestHeaders()
	if rh == nil {
		return nil, fmt.Errorf("ext_proc answered request headers with %T", resp.GetResponse())
	}
	applyMutation(h, rh.GetResponse().GetHeaderMutation())
	if mo := resp.GetModeOverride(); mo != nil && cfg.GetAllowModeOverride() && mo.GetRequestBodyMode() == extprocfilterv3.ProcessingMode_BUFFERED && len(*body) > 0 {
		if err := stream.Send(&extprocv3.ProcessingRequest{
			Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: *body, EndOfStream: true}},
		}); err != nil {
			return nil, err
		}
		br, err := stream.Recv()
		if err != nil {
			return nil, err
		}
		if imm := br.GetImmediateResponse(); imm != nil {
			return imm, nil
		}
		if br.GetRequestBody() == nil {
			return nil, fmt.Errorf("ext_proc answered the request body with %T", br.GetResponse())
		}
		applyMutation(h, br.GetRequestBody().GetResponse().GetHeaderMutation())
	}
	return nil, nil
}

// applyMutation applies an ext_proc header mutation as Envoy's ext_proc filter does: set_headers
// read the deprecated append flag (default false: overwrite), never append_action
// (envoy source/extensions/filters/http/ext_proc/mutation_utils.cc,
// MutationUtils::applyHeaderMutations).
func applyMutation(h http.Header, m *extprocv3.HeaderMutation) {
	for _, r := range m.GetRemoveHeaders() {
		h.Del(r)
	}
	for _, o := range m.GetSetHeaders() {
		if o.GetHeader() == nil {
			continue
		}
		k, v := o.GetHeader().GetKey(), headerValue(o.GetHeader())
		if o.GetAppend().GetValue() {
			h.Add(k, v)
		} else {
			h.Set(k, v)
		}
	}
}

// headerValue reads a HeaderValue as Envoy does for ext_proc mutations: raw_value when set.
func headerValue(hv *corev3.HeaderValue) string {
	if len(hv.GetRawValue()) > 0 {
		return string(hv.GetRawValue())
	}
	return hv.GetValue()
}

// applyHeaderOption applies one HeaderValueOption to dst, expanding %REQ(h)% from reqHeaders.
func applyHeaderOption(dst http.Header, o *corev3.HeaderValueOption, reqHeaders http.Header) {
	k, v := o.GetHeader().GetKey(), headerValue(o.GetHeader())
	if strings.HasPrefix(v, "%REQ(") && strings.HasSuffix(v, ")%") {
		v = reqHeaders.Get(v[5 : len(v)-2])
		if v == "" && !o.GetKeepEmptyValue() {
			return
		}
	}
	switch o.GetAppendAction() {
	case corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD:
		dst.Set(k, v)
	case corev3.HeaderValueOption_ADD_IF_ABSENT:
		if dst.Get(k) == "" {
			dst.Set(k, v)
		}
	case corev3.HeaderValueOption_OVERWRITE_IF_EXISTS:
		if dst.Get(k) != "" {
			dst.Set(k, v)
		}
	default:
		dst.Add(k, v)
	}
}

func (p *Proxy) route(w http.ResponseWriter, req *http.Request, h http.Header, body []byte, s *state) {
	rc := s.routeTable(h)
	if rc == nil {
		noRoute(w, req, s.hcm)
		return
	}
	vh := rc.GetVirtualHosts()[0]
	var rt *routev3.Route
	for _, r := range vh.GetRoutes() {
		ok, err := matches(r.GetMatch(), req, h)
		if err != nil {
			localReply(w, req, http.StatusInternalServerError, "envoymodel: route "+r.GetName()+": "+err.Error(), nil, -1)
			return
		}
		if ok {
			rt = r
			break
		}
	}
	if rt == nil {
		noRoute(w, req, s.hcm)
		return
	}
	// Response header mutations per level — weighted cluster, route, virtual host — each
	// level removing its response_headers_to_remove before adding (envoy
	// source/common/router/header_parser.cc, HeaderParser::evaluateHeaders: remove before add),
	// applied to the upstream's headers (or the local reply's).
	type respLevel struct {
		remove []string
		add    []*corev3.HeaderValueOption
	}
	var levels []respLevel
	finalize := func(dst http.Header) {
		for _, l := range levels {
			for _, r := range l.remove {
				dst.Del(r)
			}
			for _, o := range l.add {
				applyHeaderOption(dst, o, h)
			}
		}
	}
	if dr := rt.GetDirectResponse(); dr != nil {
		// A direct response is a local reply: for a gRPC request it becomes a gRPC status
		// (envoy source/common/router/router.cc, Filter::decodeHeaders).
		levels = append(levels, respLevel{rt.GetResponseHeadersToRemove(), rt.GetResponseHeadersToAdd()},
			respLevel{vh.GetResponseHeadersToRemove(), vh.GetResponseHeadersToAdd()})
		respHeaders := http.Header{}
		finalize(respHeaders)
		localReply(w, req, int(dr.GetStatus()), dr.GetBody().GetInlineString(), respHeaders, -1)
		return
	}
	a := rt.GetRoute()
	cluster := a.GetCluster()
	upHeaders := h.Clone()
	for _, k := range rc.GetRequestHeadersToRemove() {
		upHeaders.Del(k)
	}
	upReq, err := rewritePath(rt, req, upHeaders)
	if err != nil {
		localReply(w, req, http.StatusInternalServerError, "envoymodel: route "+rt.GetName()+": "+err.Error(), nil, -1)
		return
	}
	if wc := a.GetWeightedClusters(); wc != nil {
		cw := pickWeighted(wc, h)
		cluster = cw.GetName()
		for _, o := range cw.GetRequestHeadersToAdd() {
			applyHeaderOption(upHeaders, o, h)
		}
		levels = append(levels, respLevel{cw.GetResponseHeadersToRemove(), cw.GetResponseHeadersToAdd()})
	}
	for _, o := range rt.GetRequestHeadersToAdd() {
		applyHeaderOption(upHeaders, o, h)
	}
	levels = append(levels, respLevel{rt.GetResponseHeadersToRemove(), rt.GetResponseHeadersToAdd()},
		respLevel{vh.GetResponseHeadersToRemove(), vh.GetResponseHeadersToAdd()})
	// Shadows copy the request headers after the route finalised them (path rewrite and
	// request_headers_to_add included), then go through the shadow cluster's own upstream
	// filters (envoy source/common/router/router.cc, Filter::decodeHeaders: shadow_headers_
	// is made after finalizeRequestHeaders).
	for _, m := range a.GetRequestMirrorPolicies() {
		if fractionHit(m.GetRuntimeFraction().GetDefaultValue()) {
			p.mirror(m.GetCluster(), upReq, upHeaders.Clone(), body, s, !m.GetDisableShadowHostSuffixAppend())
		}
	}
	tries := 1 + int(a.GetRetryPolicy().GetNumRetries().GetValue())
	timeout := a.GetTimeout().AsDuration()
	if a.GetTimeout() == nil {
		timeout = 15 * time.Second // Envoy's default route timeout
	}
	var resp *http.Response
	for i := 0; i < tries; i++ {
		resp, err = p.forward(req.Context(), timeout, cluster, upReq, upHeaders, body, s)
		if err == nil && !retriable(a.GetRetryPolicy(), resp.StatusCode) {
			break
		}
		if i < tries-1 && resp != nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}
	if errors.Is(err, errNoHealthyUpstream) {
		localReply(w, req, http.StatusServiceUnavailable, "no healthy upstream", nil, -1)
		return
	}
	if err != nil {
		localReply(w, req, http.StatusServiceUnavailable, "upstream connect error or disconnect/reset before headers: "+err.Error(), nil, -1)
		return
	}
	defer resp.Body.Close()
	copyHeaders(w.Header(), resp.Header)
	finalize(w.Header())
	w.WriteHeader(resp.StatusCode)
	io.Copy(w, resp.Body)
	// Trailers (gRPC's grpc-status and grpc-message) are read once the body ends and are
	// passed on as trailers.
	for k, vs := range resp.Trailer {
		for _, v := range vs {
			w.Header().Add(http.TrailerPrefix+k, v)
		}
	}
}

// retriable follows retry_on as patchbay emits it: connection failures and resets always
// (err != nil before this is called), and the listed retriable_status_codes; "5xx" and
// "gateway-error" when present.
func retriable(rp *routev3.RetryPolicy, status int) bool {
	if rp == nil {
		return false
	}
	on := rp.GetRetryOn()
	switch {
	case strings.Contains(on, "5xx") && status >= 500:
		return true
	case strings.Contains(on, "gateway-error") && status >= 502 && status <= 504:
		return true
	case strings.Contains(on, "retriable-status-codes"):
		for _, c := range rp.GetRetriableStatusCodes() {
			if int(c) == status {
				return true
			}
		}
	}
	return false
}

func copyHeaders(dst, src http.Header) {
	for k, vs := range src {
		dst[k] = append([]string(nil), vs...)
	}
}

// pickWeighted follows Envoy: the random value is header_name's value parsed as uint64
// when present and valid, else random; value % total_weight selects walking in order.
func pickWeighted(wc *routev3.WeightedCluster, h http.Header) *routev3.WeightedCluster_ClusterWeight {
	var total uint64
	for _, c := range wc.GetClusters() {
		total += uint64(c.GetWeight().GetValue())
	}
	v := rand.Uint64()
	if hn := wc.GetHeaderName(); hn != "" {
		// Only a single-valued header counts (envoy source/common/router/config_impl.cc,
		// RouteEntryImplBase::pickWeightedCluster).
		if vs := h.Values(hn); len(vs) == 1 {
			if n, err := strconv.ParseUint(vs[0], 10, 64); err == nil {
				v = n
			}
		}
	}
	v %= total
	var sum uint64
	for _, c := range wc.GetClusters() {
		sum += uint64(c.GetWeight().GetValue())
		if v < sum {
			return c
		}
	}
	return wc.GetClusters()[len(wc.GetClusters())-1]
}

func fractionHit(f *typev3.FractionalPercent) bool {
	den := uint32(100)
	switch f.GetDenominator() {
	case typev3.FractionalPercent_TEN_THOUSAND:
		den = 10000
	case typev3.FractionalPercent_MILLION:
		den = 1000000
	}
	return rand.Uint32N(den) < f.GetNumerator()
}

func matches(m *routev3.RouteMatch, req *http.Request, h http.Header) (bool, error) {
	path := req.URL.Path
	switch {
	case m.GetPathSeparatedPrefix() != "":
		pre := m.GetPathSeparatedPrefix()
		if path != pre && !strings.HasPrefix(path, pre+"/") {
			return false, nil
		}
	case m.GetPath() != "":
		// path: exact, the query string removed.
		if path != m.GetPath() {
			return false, nil
		}
	case m.GetSafeRegex() != nil:
		// safe_regex: RE2 matched against the whole path (Go's regexp is RE2 syntax).
		re, err := compileAnchored(m.GetSafeRegex().GetRegex())
		if err != nil {
			return false, err
		}
		if !re.MatchString(path) {
			return false, nil
		}
	case m.GetPrefix() != "":
		if !strings.HasPrefix(path, m.GetPrefix()) {
			return false, nil
		}
	case m.GetPathSpecifier() != nil:
		if _, ok := m.GetPathSpecifier().(*routev3.RouteMatch_Prefix); !ok {
			return false, fmt.Errorf("path specifier %T is not modelled", m.GetPathSpecifier())
		}
	}
	if m.GetCaseSensitive() != nil && !m.GetCaseSensitive().GetValue() {
		return false, fmt.Errorf("case_sensitive false is not modelled")
	}
	for _, hm := range m.GetHeaders() {
		// A header present more than once is matched on its values joined with ','
		// (envoy source/common/http/header_utility.cc, HeaderUtility::matchHeaders and
		// getAllOfHeaderAsString).
		v, present := requestHeader(req, h, hm.GetName())
		var hit bool
		switch {
		case hm.GetStringMatch() != nil:
			sm := hm.GetStringMatch()
			switch {
			case sm.GetSafeRegex() != nil:
				re, err := compileAnchored(sm.GetSafeRegex().GetRegex())
				if err != nil {
					return false, err
				}
				hit = present && re.MatchString(v)
			case sm.GetIgnoreCase():
				return false, fmt.Errorf("header %s: ignore_case is not modelled", hm.GetName())
			case sm.GetMatchPattern() == nil:
				return false, fmt.Errorf("header %s: empty string_match is not modelled", hm.GetName())
			default:
				em, ok := sm.GetMatchPattern().(*matcherv3.StringMatcher_Exact)
				if !ok {
					return false, fmt.Errorf("header %s: %T is not modelled", hm.GetName(), sm.GetMatchPattern())
				}
				hit = present && v == em.Exact
			}
		case hm.GetPresentMatch():
			hit = present
		case hm.GetHeaderMatchSpecifier() == nil:
			hit = present
		default:
			return false, fmt.Errorf("header %s: %T is not modelled", hm.GetName(), hm.GetHeaderMatchSpecifier())
		}
		if hit == hm.GetInvertMatch() {
			return false, nil
		}
	}
	return true, nil
}

// requestHeader is a request header as Envoy's matchers see it: pseudo-headers from the
// request line, others with every value joined by ','.
func requestHeader(req *http.Request, h http.Header, name string) (string, bool) {
	switch name {
	case ":method":
		return req.Method, true
	case ":path":
		return req.URL.RequestURI(), true
	case ":authority":
		return req.Host, true
	case ":scheme":
		return "http", true
	}
	vs, ok := h[http.CanonicalHeaderKey(name)]
	if !ok || len(vs) == 0 {
		return "", false
	}
	return strings.Join(vs, ","), true
}

var regexCache sync.Map // string -> *regexp.Regexp

func compileAnchored(expr string) (*regexp.Regexp, error) {
	if re, ok := regexCache.Load(expr); ok {
		return re.(*regexp.Regexp), nil
	}
	re, err := regexp.Compile(`^(?:` + expr + `)$`)
	if err != nil {
		return nil, fmt.Errorf("safe_regex %q: %w", expr, err)
	}
	regexCache.Store(expr, re)
	return re, nil
}

const httpOptionsKey = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

func upstreamClient(protos func(*http.Protocols)) *http.Client {
	ps := new(http.Protocols)
	protos(ps)
	return &http.Client{Transport: &http.Transport{
		MaxIdleConnsPerHost: 256,
		DialContext:         (&net.Dialer{Timeout: time.Second}).DialContext,
		Protocols:           ps,
	}}
}

// upstreamFor picks the cluster's upstream protocol as Envoy does, whatever the downstream
// protocol: HTTP/2 only with explicit http2_protocol_options (in the cluster's
// HttpProtocolOptions, or the deprecated cluster field), otherwise HTTP/1.1 (envoy
// source/extensions/upstreams/http/config.cc, ProtocolOptionsConfigImpl; api
// envoy/extensions/upstreams/http/v3/http_protocol_options.proto: "If this is not set,
// HTTP/1.1 is used"). So a gRPC request sent to an HTTP/1.1 cluster goes out as HTTP/1.1,
// and a gRPC server there drops the connection: a 503 local reply, gRPC UNAVAILABLE.
// Options the model does not know fail the request rather than guess.
func (p *Proxy) upstreamFor(c *clusterv3.Cluster) (*http.Client, error) {
	h2 := c.GetHttp2ProtocolOptions() != nil
	if a, ok := c.GetTypedExtensionProtocolOptions()[httpOptionsKey]; ok {
		opts := &upstreamhttpv3.HttpProtocolOptions{}
		if err := a.UnmarshalTo(opts); err != nil {
			return nil, fmt.Errorf("cluster %q: %w", c.GetName(), err)
		}
		switch {
		case opts.GetExplicitHttpConfig().GetHttp2ProtocolOptions() != nil:
			h2 = true
		case opts.GetExplicitHttpConfig().GetHttpProtocolOptions() != nil, opts.GetUpstreamProtocolOptions() == nil:
			h2 = false
		default:
			return nil, fmt.Errorf("cluster %q: upstream protocol options %T are not modelled", c.GetName(), opts.GetUpstreamProtocolOptions())
		}
	}
	if ts := c.GetTransportSocket(); ts != nil {
		cfg, err := p.upstreamTLSConfig(c)
		if err != nil {
			return nil, err
		}
		ps := new(http.Protocols)
		if h2 {
			ps.SetHTTP2(true)
		} else {
			ps.SetHTTP1(true)
		}
		// A fresh transport per attempt: the files are read for every connection, as
		// Envoy re-reads them when they change (rotation).
		return &http.Client{Transport: &http.Transport{
			TLSClientConfig:   cfg,
			Protocols:         ps,
			DisableKeepAlives: true,
			DialContext:       (&net.Dialer{Timeout: time.Second}).DialContext,
		}}, nil
	}
	if h2 {
		return p.h2c, nil
	}
	return p.client, nil
}

// forward sends one attempt to a round-robin endpoint of the cluster, through the
// cluster's upstream header_mutation filter, in the cluster's protocol.
func (p *Proxy) forward(ctx context.Context, timeout time.Duration, cluster string, req *http.Request, h http.Header, body []byte, s *state) (*http.Response, error) {
	for _, le := range s.endpoints[cluster].GetEndpoints() {
		if le.GetPriority() != 0 {
			return nil, fmt.Errorf("cluster %q: endpoint priorities are not modelled", cluster)
		}
	}
	addrs := clusterAddrs(s, cluster)
	up := h.Clone()
	c := s.clusters[cluster]
	if c == nil {
		return nil, fmt.Errorf("unknown cluster %q", cluster)
	}
	addr, err := p.pickHost(c, addrs)
	if err != nil {
		return nil, err
	}
	if a, ok := c.GetTypedExtensionProtocolOptions()[httpOptionsKey]; ok {
		applyUpstreamFilters(a, up)
	}
	client, err := p.upstreamFor(c)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	scheme := "http://"
	if c.GetTransportSocket() != nil {
		scheme = "https://"
	}
	out, err := http.NewRequestWithContext(ctx, req.Method, scheme+addr+req.URL.RequestURI(), bytes.NewReader(body))
	if err != nil {
		cancel()
		return nil, err
	}
	out.Header = up
	out.Host = req.Host
	resp, err := client.Do(out)
	if c.GetTransportSocket() != nil {
		client.CloseIdleConnections()
	}
	if err != nil {
		cancel()
		return nil, err
	}
	resp.Body = &cancelBody{ReadCloser: resp.Body, cancel: cancel}
	return resp, nil
}

type cancelBody struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (c *cancelBody) Close() error { err := c.ReadCloser.Close(); c.cancel(); return err }

func applyUpstreamFilters(a *anypb.Any, h http.Header) {
	opts := &upstreamhttpv3.HttpProtocolOptions{}
	if err := a.UnmarshalTo(opts); err != nil {
		return
	}
	for _, f := range opts.GetHttpFilters() {
		if f.GetName() != "envoy.filters.http.header_mutation" {
			continue
		}
		hm := &headermutationv3.HeaderMutation{}
		if err := f.GetTypedConfig().UnmarshalTo(hm); err != nil {
			continue
		}
		for _, m := range hm.GetMutations().GetRequestMutations() {
			if r := m.GetRemove(); r != "" {
				h.Del(r)
			}
			if ap := m.GetAppend(); ap != nil {
				applyHeaderOption(h, ap, h)
			}
		}
	}
}

// mirror sends a fire-and-forget copy, as Envoy's shadowing does: the host gets "-shadow"
// before any port ("ranker:8000" becomes "ranker-shadow:8000") unless the policy sets
// disable_shadow_host_suffix_append (envoy source/common/router/shadow_writer_impl.cc,
// shadowAppendedHost and getClusterAndPreprocessHeadersAndOptions).
func (p *Proxy) mirror(cluster string, req *http.Request, h http.Header, body []byte, s *state, suffix bool) {
	p.mirrors.Add(1)
	go func() {
		defer p.mirrors.Done()
		shadow := req.Clone(context.Background())
		if suffix {
			shadow.Host = shadowHost(req.Host)
		}
		resp, err := p.forward(context.Background(), 5*time.Second, cluster, shadow, h, body, s)
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}()
}

// shadowHost appends "-shadow" to the host part of host[:port] as Envoy's
// shadowAppendedHost does (the port, after the last ':' outside an IPv6 literal, stays).
func shadowHost(host string) string {
	i := strings.LastIndexByte(host, ':')
	if i < 0 || (strings.HasPrefix(host, "[") && i < strings.LastIndexByte(host, ']')) ||
		(!strings.HasPrefix(host, "[") && strings.Count(host, ":") > 1) {
		return host + "-shadow"
	}
	return host[:i] + "-shadow" + host[i:]
}

// keepSubscribed copies m without the names that are no longer in subscribed (a
// comma-joined list).
func keepSubscribed[V any](m map[string]V, subscribed string) map[string]V {
	want := map[string]bool{}
	for _, n := range strings.Split(subscribed, ",") {
		want[n] = true
	}
	out := make(map[string]V, len(m))
	for k, v := range m {
		if want[k] {
			out[k] = v
		}
	}
	return out
}
