package translate

import (
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	mutationv3 "github.com/envoyproxy/go-control-plane/envoy/config/common/mutation_rules/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	streamv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	headermutationv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/header_mutation/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	upstreamcodecv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/upstream_codec/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	earlymutationv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/http/early_header_mutation/header_mutation/v3"
	previoushostsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/retry/host/previous_hosts/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/patchbay-io/patchbay/api/headers"
	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/xds/rollout"
)

// Envoy builds the resources for an Envoy node of the given role: EnvoyShared (the
// listener, its secrets, the fallback route table and scope) and EnvoyModel of every model
// (its route table, scopes, clusters and endpoints), in rollout order.
func Envoy(in *Input, opts Options, role Role) (Resources, error) {
	res, err := EnvoyShared(in, opts, role)
	if err != nil {
		return nil, err
	}
	for _, r := range in.Set.Rollouts {
		res.add(EnvoyModel(in, r, opts, role))
	}
	return res, nil
}

// add appends every resource of o to res, type by type.
func (res Resources) add(o Resources) {
	for t, rs := range o {
		res[t] = append(res[t], rs...)
	}
}

// EnvoyShared is the part of an Envoy node's resources that belongs to no model: one
// listener (HCM with an early header mutation stripping client routing headers and setting
// the route key, then ext_proc -> router, routes by Scoped RDS), the SDS secrets it and the
// clusters refer to, and the fallback RouteConfiguration (FallbackRouteName) with its scope
// ("", ""): requests that name no model.
func EnvoyShared(in *Input, opts Options, role Role) (Resources, error) {
	if err := checkTLS(in.Set, opts); err != nil {
		return nil, err
	}
	name, addr := EdgeListener, opts.EdgeAddress
	if role == Sidecar {
		name, addr = SidecarListener, opts.SidecarAddress
	}
	lis, err := envoyListener(name, addr, opts, role)
	if err != nil {
		return nil, err
	}
	res := Resources{
		resource.ListenerType:    {lis},
		resource.RouteType:       {routeConfig(FallbackRouteName, globalRoutes())},
		resource.ScopedRouteType: {scope(FallbackScopeName, FallbackRouteName, "", "")},
	}
	if secrets := envoySecrets(in.Set, opts, role); len(secrets) > 0 {
		res[resource.SecretType] = secrets
	}
	return res, nil
}

// EnvoyModel is everything of model r for an Envoy node of the given role: its
// RouteConfiguration (ModelRouteName), the scopes whose keys select it (ModelScopes), one
// EDS cluster per version and protocol it serves (ClusterName for OIP REST,
// GRPCClusterName for OIP gRPC) and their endpoints. It depends only on r,
// in.Slots[r.Model], in.Resolved and in.Zones for r's hosts, in.Unhealthy[r.Model] and
// opts; role changes nothing today.
func EnvoyModel(in *Input, r *rollout.Rollout, opts Options, role Role) Resources {
	res := Resources{resource.RouteType: {modelRouteConfig(in, r)}}
	for _, k := range ModelScopes(r.Model) {
		res[resource.ScopedRouteType] = append(res[resource.ScopedRouteType],
			scope(ScopeName(r.Model, k.Shape), ModelRouteName(r.Model), k.Key[0], k.Key[1]))
	}
	for _, v := range r.Versions {
		for _, p := range []string{rollout.REST, rollout.GRPC} {
			if !v.Serves(p) {
				continue
			}
			res[resource.ClusterType] = append(res[resource.ClusterType], envoyCluster(r, v, p, opts))
			res[resource.EndpointType] = append(res[resource.EndpointType], loadAssignment(in, r, v, p))
		}
	}
	return res
}

func envoyListener(name, addr string, opts Options, role Role) (*listenerv3.Listener, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("listener %s address %q: %w", name, addr, err)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return nil, fmt.Errorf("listener %s address %q: bad port", name, addr)
	}
	timeout := opts.ExtprocTimeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	strip := make([]*mutationv3.HeaderMutation, 0, len(headers.Stripped)+2)
	for _, h := range headers.Stripped {
		strip = append(strip, &mutationv3.HeaderMutation{Action: &mutationv3.HeaderMutation_Remove{Remove: h}})
	}
	// The route key: a client's own value is removed first, then set from the path and
	// x-patchbay-model (see RouteKeyFormat).
	strip = append(strip,
		&mutationv3.HeaderMutation{Action: &mutationv3.HeaderMutation_Remove{Remove: RouteKeyHeader}},
		&mutationv3.HeaderMutation{Action: &mutationv3.HeaderMutation_Append{Append: setHeader(RouteKeyHeader, RouteKeyFormat)}})
	extproc := &extprocv3.ExternalProcessor{
		// No grpc_service.timeout: Envoy opens the ext_proc stream with AsyncClient::start
		// and StreamOptions that carry no timeout (envoy
		// source/extensions/filters/http/ext_proc/client_impl.cc,
		// ExternalProcessorStreamImpl::startStream); grpc_service.timeout only bounds unary
		// calls. What bounds each ext_proc exchange is message_timeout below (the per-message
		// timer of source/extensions/filters/http/ext_proc/ext_proc.cc), after which the
		// request fails open.
		GrpcService: &corev3.GrpcService{
			TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: ExtprocCluster}},
		},
		// Fail open: if ext_proc is down or slow, the request keeps its stripped headers
		// and takes the baseline split (random bucket) instead of failing.
		FailureModeAllow: true,
		ProcessingMode: &extprocv3.ProcessingMode{
			RequestHeaderMode:   extprocv3.ProcessingMode_SEND,
			ResponseHeaderMode:  extprocv3.ProcessingMode_SKIP,
			RequestBodyMode:     extprocv3.ProcessingMode_NONE,
			ResponseBodyMode:    extprocv3.ProcessingMode_NONE,
			RequestTrailerMode:  extprocv3.ProcessingMode_SKIP,
			ResponseTrailerMode: extprocv3.ProcessingMode_SKIP,
		},
		MessageTimeout: durationpb.New(timeout),
		StatPrefix:     "patchbay",
		// Body mode (per model) is asked for by ext_proc through mode_override.
		AllowModeOverride: true,
	}
	filters := []*hcmv3.HttpFilter{
		httpFilter("envoy.filters.http.ext_proc", extproc),
		httpFilter("envoy.filters.http.router", &routerv3.Router{}),
	}
	hcm := &hcmv3.HttpConnectionManager{
		StatPrefix:     name,
		CodecType:      hcmv3.HttpConnectionManager_AUTO,
		RouteSpecifier: &hcmv3.HttpConnectionManager_ScopedRoutes{ScopedRoutes: scopedRoutes()},
		// Client-sent routing headers are removed by an early header mutation: it runs
		// before route selection and before any filter, so a client cannot pick its
		// variant even when ext_proc is unreachable (an HTTP header_mutation filter would
		// run after Envoy has already picked the route with the forged headers). The same
		// mutation sets the route key the scope is chosen by (envoy
		// source/common/http/conn_manager_impl.cc, ActiveStream::decodeHeaders runs the
		// early header mutations before snapScopedRouteConfig / refreshCachedRoute).
		EarlyHeaderMutationExtensions: []*corev3.TypedExtensionConfig{{
			Name:        "envoy.http.early_header_mutation.header_mutation",
			TypedConfig: mustAny(&earlymutationv3.HeaderMutation{Mutations: strip}),
		}},
		HttpFilters:                  filters,
		LocalReplyConfig:             noScopeReply(),
		NormalizePath:                wrapperspb.Bool(true),
		MergeSlashes:                 true,
		PathWithEscapedSlashesAction: hcmv3.HttpConnectionManager_UNESCAPE_AND_REDIRECT,
		UseRemoteAddress:             wrapperspb.Bool(role == Edge),
		RequestTimeout:               durationpb.New(60 * time.Second),
		StreamIdleTimeout:            durationpb.New(5 * time.Minute),
	}
	if opts.AccessLog {
		hcm.AccessLog = []*accesslogv3.AccessLog{accessLog()}
	}
	chain := &listenerv3.FilterChain{
		Filters: []*listenerv3.Filter{{
			Name:       "envoy.filters.network.http_connection_manager",
			ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(hcm)},
		}},
	}
	if role == Edge && opts.EdgeTLS.Cert != "" {
		chain.TransportSocket = edgeDownstreamTLS(opts)
	}
	return &listenerv3.Listener{
		Name: name,
		Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address:       host,
			PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(port)},
		}}},
		FilterChains:                  []*listenerv3.FilterChain{chain},
		PerConnectionBufferLimitBytes: wrapperspb.UInt32(1 << 20),
	}, nil
}

// accessLog writes one JSON line per request with the routing decision.
func accessLog() *accesslogv3.AccessLog {
	fields := map[string]any{
		"start":       "%START_TIME%",
		"method":      "%REQ(:METHOD)%",
		"path":        "%REQ(:PATH)%",
		"status":      "%RESPONSE_CODE%",
		"flags":       "%RESPONSE_FLAGS%",
		"duration_ms": "%DURATION%",
		"model":       "%REQ(" + headers.Model + ")%",
		"bucket":      "%REQ(" + headers.Bucket + ")%",
		"version":     "%REQ(" + headers.Version + ")%",
		"experiments": "%REQ(" + headers.Experiments + ")%",
		"served_by":   "%RESP(" + headers.ServedBy + ")%",
		"cluster":     "%UPSTREAM_CLUSTER%",
		"upstream":    "%UPSTREAM_HOST%",
	}
	st, err := structpb.NewStruct(fields)
	if err != nil {
		panic(err) // static input: a failure is a programming error
	}
	return &accesslogv3.AccessLog{
		Name: "envoy.access_loggers.stdout",
		ConfigType: &accesslogv3.AccessLog_TypedConfig{TypedConfig: mustAny(&streamv3.StdoutAccessLog{
			AccessLogFormat: &streamv3.StdoutAccessLog_LogFormat{LogFormat: &corev3.SubstitutionFormatString{
				Format: &corev3.SubstitutionFormatString_JsonFormat{JsonFormat: st},
			}},
		})},
	}
}

// modelRouteConfig builds model r's route table (ModelRouteName): the global refusals
// (globalRoutes) around the model's own routes. Only the OIP inference
// surface reaches a model cluster: REST POST .../infer, GET metadata and GET .../ready (and
// the server-level GETs chosen by x-patchbay-model) for models served over REST; the six
// inference methods of inference.GRPCInferenceService (with x-patchbay-model) for models
// served over gRPC. A model serves a protocol when every version with a share serves it
// (rollout.Rollout.Serves); REST routes only name REST clusters (ClusterName), gRPC routes
// only gRPC clusters (GRPCClusterName). Everything else — the repository extension, other
// methods and verbs, a protocol the model does not serve — gets a direct_response from
// Envoy, an OIP error naming the reason.
//
// A direct_response to a gRPC request (content-type application/grpc or application/grpc+…)
// is not sent as HTTP: the router hands it to sendLocalReply (envoy
// source/common/router/router.cc, Filter::decodeHeaders), which answers gRPC requests
// trailers-only with :status 200, content-type application/grpc and the body,
// percent-encoded, as grpc-message (source/common/http/utility.cc,
// Utility::prepareLocalReply). Its grpc-status is Grpc::Utility::httpToGrpcStatus(status)
// (source/common/grpc/status.cc: 403 -> PERMISSION_DENIED, 404 -> UNIMPLEMENTED) only when
// the headers have none yet: prepareLocalReply runs modify_headers (the route's
// response_headers_to_add, via finalizeResponseHeaders) first and then sets grpc-status
// only if getGrpcStatusValue() is empty. So every direct response on a gRPC path also sets
// grpc-status itself (grpcDirectRoute): an unknown gRPC model is NOT_FOUND, as ext_proc
// answers it (extproc/handle.go, immediateError), whichever of the two sees it first.
func modelRouteConfig(in *Input, r *rollout.Rollout) *routev3.RouteConfiguration {
	routes := globalRoutes()
	head, tail := routes[:2:2], routes[2:]
	routes = head
	base := restModelsPrefix + r.Model
	if r.Serves(rollout.REST) {
		routes = append(routes, restModelRoutes(in, r)...)
		routes = append(routes, directRoute(r.Model+"/rest-other", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_PathSeparatedPrefix{
			PathSeparatedPrefix: base}}, 404, "not served through patchbay: the data path carries only POST "+base+"/infer, GET "+base+" and GET "+base+"/ready"))
	} else {
		msg := "model " + r.Model + " is not served over OIP REST (it is served over OIP gRPC)"
		routes = append(routes,
			directRoute(r.Model+"/rest-refused", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_PathSeparatedPrefix{
				PathSeparatedPrefix: base}}, 404, msg),
			directRoute(r.Model+"/server-rest-refused", restServerMatch(r.Model), 404, msg),
		)
	}
	grpcModel := &routev3.RouteMatch{
		PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: grpcOIPPrefix},
		Headers:       []*routev3.HeaderMatcher{exactHeader(headers.Model, r.Model)},
	}
	if r.Serves(rollout.GRPC) {
		routes = append(routes, modelRoutes(in, r, rollout.GRPC, "grpc", grpcSurfaceMatch(r.Model))...)
		routes = append(routes, grpcDirectRoute(r.Model+"/grpc-other", grpcModel, 404, codes.Unimplemented,
			"method not served through patchbay: the data path carries only "+strings.Join(GRPCMethods, ", ")))
	} else {
		routes = append(routes, grpcDirectRoute(r.Model+"/grpc-refused", grpcModel, 404, codes.Unimplemented,
			"model "+r.Model+" is not served over OIP gRPC (it is served over OIP REST)"))
	}
	return routeConfig(ModelRouteName(r.Model), append(routes, tail...))
}

// globalRoutes are the refusals every route table holds: the repository extension first
// (so that a model named like a path segment still refuses it), then, after a model's own
// routes, what no model serves. Alone they are the fallback route table (scope ("", ""):
// requests naming no model).
func globalRoutes() []*routev3.Route {
	return []*routev3.Route{
		grpcDirectRoute("repository-grpc", prefixMatch(grpcRepositoryPrefix), 403, codes.PermissionDenied, msgRepository),
		directRoute("repository-rest", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_PathSeparatedPrefix{
			PathSeparatedPrefix: restRepositoryPrefix}}, 404, msgRepository),
		directRoute("unknown-model", prefixMatch(restModelsPrefix), 404, "unknown model"),
		directRoute("server-needs-model", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_SafeRegex{
			SafeRegex: &matcherv3.RegexMatcher{Regex: serverSurfaceRegex}}},
			404, "server-level calls need "+headers.Model+" naming a known model"),
		grpcDirectRoute("unknown-grpc-model", prefixMatch(grpcOIPPrefix), 404, codes.NotFound,
			"unknown model: set "+headers.Model+" to a known model"),
		directRoute("not-inference", prefixMatch("/"), 404, "not found: patchbay's data path carries only the OIP inference surface"),
	}
}

// routeConfig is one route table: one virtual host for every domain. The route key is
// removed before the upstream: it is Envoy's own routing input, not the host's.
func routeConfig(name string, routes []*routev3.Route) *routev3.RouteConfiguration {
	return &routev3.RouteConfiguration{
		Name: name,
		VirtualHosts: []*routev3.VirtualHost{{
			Name:    "patchbay",
			Domains: []string{"*"},
			Routes:  routes,
			// Echo the exposures ext_proc decided on the response, for logging and analysis.
			// Envoy skips a header_to_add whose value formats empty (no exposure, or ext_proc
			// down), which would let an upstream's own x-patchbay-experiments through: remove
			// it first. At one level, removals run before additions (envoy
			// source/common/router/header_parser.cc, HeaderParser::evaluateHeaders: "Removing
			// headers in the headers_to_remove_ list first makes remove-before-add the default").
			ResponseHeadersToRemove: []string{headers.Experiments},
			ResponseHeadersToAdd: []*corev3.HeaderValueOption{{
				Header:       &corev3.HeaderValue{Key: headers.Experiments, Value: "%REQ(" + headers.Experiments + ")%"},
				AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
			}},
		}},
		RequestHeadersToRemove: []string{RouteKeyHeader},
		ValidateClusters:       wrapperspb.Bool(false),
	}
}

// restKind is one model-level OIP REST call: its path below /v2/models/<m> (or
// /v2/models/<m>/versions/<v>) and method.
type restKind struct{ name, suffix, method string }

var restKinds = []restKind{{"infer", "/infer", "POST"}, {"metadata", "", "GET"}, {"ready", "/ready", "GET"}}

func (k restKind) match(base string) *routev3.RouteMatch {
	return &routev3.RouteMatch{
		PathSpecifier: &routev3.RouteMatch_Path{Path: base + k.suffix},
		Headers:       []*routev3.HeaderMatcher{exactHeader(":method", k.method)},
	}
}

// restModelRoutes are a REST model's routes: pinned paths, then per call its version
// routes and split, then the server-level calls.
//
// A request routed by name (x-patchbay-version, set by ext_proc for experiment arms) to a
// version of host kind oip (an unmodified OIP server) reaches it on that version's OIP
// path (/v2/models/<m>/versions/<v>/...), so that a server holding several versions
// answers with the routed one: its version routes rewrite the path (prefix_rewrite of the
// exact path); pinned paths already name it. A version of host kind patchbay (the default)
// reads x-patchbay-version, so its version routes keep the unversioned path. The baseline
// split cannot rewrite: Envoy has no per-cluster path rewrite (WeightedCluster.ClusterWeight
// has none; header mutations refuse ':'-prefixed headers: source/common/router/header_parser.cc,
// isModifiableHeader), so split requests keep the unversioned path and carry the version in
// x-patchbay-version only.
//
// Mirrors: Envoy copies the shadow request from the request headers after the route's
// finalizeRequestHeaders, which applied the rewrite (source/common/router/router.cc,
// Filter::decodeHeaders: finalizeRequestHeaders, then shadow_headers_ =
// createHeaderMap(*downstream_headers_)), and a mirror cannot rewrite :path (same header
// rule), so a mirror of a rewritten or pinned request would ask the shadow's host for the
// served version. REST shadows are therefore mirrored from the split, the server-level
// calls and the version routes of patchbay-host versions (unversioned path, the shadow
// cluster's upstream filter naming its version), never from the rewritten version routes
// of oip-host versions nor from pinned paths.
func restModelRoutes(in *Input, r *rollout.Rollout) []*routev3.Route {
	var routes []*routev3.Route
	base := restModelsPrefix + r.Model
	// Paths that name a version: honoured when pinning is on, refused otherwise — also
	// when ext_proc is unreachable.
	if r.Pinning {
		for _, v := range r.Versions {
			vbase := base + "/versions/" + v.Name
			if r.Closed[v.Name] {
				routes = append(routes, directRoute(r.Model+"/pin/"+v.Name+"/rolled-back", prefixMatch(vbase+"/"), 404,
					"version "+v.Name+" of model "+r.Model+" is rolled back"),
					directRoute(r.Model+"/pin/"+v.Name+"/rolled-back-metadata", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Path{Path: vbase}}, 404,
						"version "+v.Name+" of model "+r.Model+" is rolled back"))
				continue
			}
			if !v.Serves(rollout.REST) {
				routes = append(routes, directRoute(r.Model+"/pin/"+v.Name+"/not-rest", prefixMatch(vbase+"/"), 404,
					"version "+v.Name+" of model "+r.Model+" is not served over OIP REST"),
					directRoute(r.Model+"/pin/"+v.Name+"/not-rest-metadata", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Path{Path: vbase}}, 404,
						"version "+v.Name+" of model "+r.Model+" is not served over OIP REST"))
				continue
			}
			for _, k := range restKinds {
				a := versionAction(r, v.Name, rollout.REST)
				routes = append(routes, &routev3.Route{
					Name:                 r.Model + "/pin/" + v.Name + "/" + k.name,
					Match:                k.match(vbase),
					Action:               &routev3.Route_Route{Route: a},
					ResponseHeadersToAdd: []*corev3.HeaderValueOption{setHeader(headers.ServedBy, r.Model+"/"+v.Name)},
					RequestHeadersToAdd:  []*corev3.HeaderValueOption{setHeader(headers.Version, v.Name)},
				})
			}
		}
	} else {
		routes = append(routes, directRoute(r.Model+"/pin-refused",
			prefixMatch(base+"/versions/"), 403, "model "+r.Model+" does not allow choosing a version"))
	}
	down := in.down(r)
	for _, k := range restKinds {
		for _, v := range r.Versions {
			// An unhealthy version's requests by name fall through to the split, and so do
			// a rolled-back version's.
			if !v.Serves(rollout.REST) || down[v.Name] || r.Closed[v.Name] {
				continue
			}
			m := k.match(base)
			m.Headers = append(m.Headers, exactHeader(headers.Version, v.Name))
			a := versionAction(r, v.Name, rollout.REST)
			if v.OIPHost() {
				a.PrefixRewrite = base + "/versions/" + v.Name + k.suffix
			} else {
				a.RequestMirrorPolicies = mirrors(r, v.Name, rollout.REST)
			}
			routes = append(routes, &routev3.Route{
				Name:                 r.Model + "/" + k.name + "/version/" + v.Name,
				Match:                m,
				Action:               &routev3.Route_Route{Route: a},
				ResponseHeadersToAdd: []*corev3.HeaderValueOption{setHeader(headers.ServedBy, r.Model+"/"+v.Name)},
			})
		}
		routes = append(routes, &routev3.Route{
			Name:   r.Model + "/" + k.name + "/split",
			Match:  k.match(base),
			Action: splitAction(r, in.ServingSlots(r), rollout.REST),
		})
	}
	return append(routes, modelRoutes(in, r, rollout.REST, "server", restServerMatch(r.Model))...)
}

// modelRoutes are, for one match of a model's surface in one protocol, its version routes
// (a header-matched x-patchbay-version, for each version serving the protocol) and then
// its split, all with the model's mirrors of that protocol.
func modelRoutes(in *Input, r *rollout.Rollout, protocol, kind string, match *routev3.RouteMatch) []*routev3.Route {
	var out []*routev3.Route
	down := in.down(r)
	for _, v := range r.Versions {
		if !v.Serves(protocol) || down[v.Name] || r.Closed[v.Name] {
			continue
		}
		m := proto.Clone(match).(*routev3.RouteMatch)
		m.Headers = append(m.Headers, exactHeader(headers.Version, v.Name))
		a := versionAction(r, v.Name, protocol)
		a.RequestMirrorPolicies = mirrors(r, v.Name, protocol)
		out = append(out, &routev3.Route{
			Name:                 r.Model + "/" + kind + "/version/" + v.Name,
			Match:                m,
			Action:               &routev3.Route_Route{Route: a},
			ResponseHeadersToAdd: []*corev3.HeaderValueOption{setHeader(headers.ServedBy, r.Model+"/"+v.Name)},
		})
	}
	return append(out, &routev3.Route{
		Name:   r.Model + "/" + kind + "/split",
		Match:  match,
		Action: splitAction(r, in.ServingSlots(r), protocol),
	})
}

func directRoute(name string, m *routev3.RouteMatch, status uint32, msg string) *routev3.Route {
	return &routev3.Route{
		Name:  name,
		Match: m,
		Action: &routev3.Route_DirectResponse{DirectResponse: &routev3.DirectResponseAction{
			Status: status,
			Body:   &corev3.DataSource{Specifier: &corev3.DataSource_InlineString{InlineString: errorJSON(msg)}},
		}},
		ResponseHeadersToAdd: []*corev3.HeaderValueOption{setHeader("content-type", "application/json")},
	}
}

// grpcDirectRoute is a direct response on a gRPC path: HTTP status for a non-gRPC caller,
// and its own grpc-status, which Envoy keeps over its HTTP-to-gRPC mapping (see
// modelRouteConfig).
func grpcDirectRoute(name string, m *routev3.RouteMatch, status uint32, code codes.Code, msg string) *routev3.Route {
	r := directRoute(name, m, status, msg)
	r.ResponseHeadersToAdd = append(r.ResponseHeadersToAdd, setHeader("grpc-status", strconv.Itoa(int(code))))
	return r
}

// versionAction routes to one version's cluster of a protocol; no mirrors (see
// restModelRoutes; modelRoutes adds them where they are sound).
func versionAction(r *rollout.Rollout, version, protocol string) *routev3.RouteAction {
	a := baseAction(r)
	a.ClusterSpecifier = &routev3.RouteAction_Cluster{Cluster: ProtocolClusterName(r.Model, version, protocol)}
	return a
}

func splitAction(r *rollout.Rollout, slots SlotMap, protocol string) *routev3.Route_Route {
	var cws []*routev3.WeightedCluster_ClusterWeight
	for _, run := range slots.Runs() {
		cws = append(cws, &routev3.WeightedCluster_ClusterWeight{
			Name:                 ProtocolClusterName(r.Model, run.Version, protocol),
			Weight:               wrapperspb.UInt32(run.Weight),
			RequestHeadersToAdd:  []*corev3.HeaderValueOption{setHeader(headers.Version, run.Version)},
			ResponseHeadersToAdd: []*corev3.HeaderValueOption{setHeader(headers.ServedBy, r.Model+"/"+run.Version)},
		})
	}
	a := baseAction(r)
	a.ClusterSpecifier = &routev3.RouteAction_WeightedClusters{WeightedClusters: &routev3.WeightedCluster{
		Clusters: cws,
		// The sticky random value: ext_proc's salted per-user hash. Without it (ext_proc
		// down) Envoy draws a random value: the split holds, stickiness does not.
		RandomValueSpecifier: &routev3.WeightedCluster_HeaderName{HeaderName: headers.Bucket},
	}}
	a.RequestMirrorPolicies = mirrors(r, "", protocol)
	return &routev3.Route_Route{Route: a}
}

// mirrors are the model's shadows that serve the protocol, to their cluster of that
// protocol, except, on a version route, a shadow of that same version.
func mirrors(r *rollout.Rollout, servedVersion, protocol string) []*routev3.RouteAction_RequestMirrorPolicy {
	var out []*routev3.RouteAction_RequestMirrorPolicy
	for _, sh := range r.Shadow {
		if sh.Version == servedVersion {
			continue
		}
		if v := r.Version(sh.Version); v == nil || !v.Serves(protocol) {
			continue
		}
		out = append(out, &routev3.RouteAction_RequestMirrorPolicy{
			Cluster: ProtocolClusterName(r.Model, sh.Version, protocol),
			RuntimeFraction: &corev3.RuntimeFractionalPercent{DefaultValue: &typev3.FractionalPercent{
				Numerator:   uint32(sh.Percent*10000 + 0.5),
				Denominator: typev3.FractionalPercent_MILLION,
			}},
		})
	}
	return out
}

func baseAction(r *rollout.Rollout) *routev3.RouteAction {
	a := &routev3.RouteAction{}
	if r.Timeout.Duration > 0 {
		a.Timeout = durationpb.New(r.Timeout.Duration)
	}
	retries := uint32(1)
	if r.Retries != nil {
		retries = uint32(*r.Retries)
	}
	if retries > 0 {
		a.RetryPolicy = &routev3.RetryPolicy{
			RetryOn:              defaultRetryOn,
			NumRetries:           wrapperspb.UInt32(retries),
			RetriableStatusCodes: []uint32{503},
			RetryHostPredicate: []*routev3.RetryPolicy_RetryHostPredicate{{
				Name:       "envoy.retry_host_predicates.previous_hosts",
				ConfigType: &routev3.RetryPolicy_RetryHostPredicate_TypedConfig{TypedConfig: mustAny(&previoushostsv3.PreviousHostsPredicate{})},
			}},
			HostSelectionRetryMaxAttempts: 3,
		}
	}
	return a
}

// envoyCluster is one model version: EDS endpoints, active health checks on the OIP
// readiness path, outlier detection, HTTP/2 for gRPC versions, and an upstream filter that
// names the version on every request sent to it (mirrors included).
func envoyCluster(r *rollout.Rollout, v rollout.Version, protocol string, deploy Options) *clusterv3.Cluster {
	c := edsCluster(ProtocolClusterName(r.Model, v.Name, protocol))
	c.AltStatName = StatName(c.Name)
	if upstreamTLS(v, deploy) {
		envoyUpstreamTLS(c, protocol, deploy)
	}
	c.OutlierDetection = &clusterv3.OutlierDetection{
		Consecutive_5Xx:                    wrapperspb.UInt32(5),
		ConsecutiveGatewayFailure:          wrapperspb.UInt32(3),
		EnforcingConsecutiveGatewayFailure: wrapperspb.UInt32(100),
		Interval:                           durationpb.New(5 * time.Second),
		BaseEjectionTime:                   durationpb.New(15 * time.Second),
		MaxEjectionPercent:                 wrapperspb.UInt32(50),
	}
	hc := &corev3.HealthCheck{
		Timeout:            durationpb.New(HealthCheckTimeout),
		Interval:           durationpb.New(HealthCheckInterval),
		UnhealthyThreshold: wrapperspb.UInt32(2),
		HealthyThreshold:   wrapperspb.UInt32(1),
		NoTrafficInterval:  durationpb.New(10 * time.Second),
	}
	setVersion := httpFilter("envoy.filters.http.header_mutation", &headermutationv3.HeaderMutation{
		Mutations: &headermutationv3.Mutations{RequestMutations: []*mutationv3.HeaderMutation{{
			Action: &mutationv3.HeaderMutation_Append{Append: setHeader(headers.Version, v.Name)},
		}}},
	})
	opts := &upstreamhttpv3.HttpProtocolOptions{
		HttpFilters: []*hcmv3.HttpFilter{setVersion, httpFilter("envoy.filters.http.upstream_codec", &upstreamcodecv3.UpstreamCodec{})},
	}
	if protocol == rollout.GRPC {
		opts.UpstreamProtocolOptions = &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}},
		}}
		// The version's own health service name: the host reports each loaded version
		// (api/oip.HealthService), so an unloaded or failing version leaves the split while
		// its server stays up.
		hc.HealthChecker = &corev3.HealthCheck_GrpcHealthCheck_{GrpcHealthCheck: &corev3.HealthCheck_GrpcHealthCheck{
			ServiceName: GRPCHealthService(r.Model, v),
		}}
	} else {
		opts.UpstreamProtocolOptions = &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions{HttpProtocolOptions: &corev3.Http1ProtocolOptions{}},
		}}
		hc.HealthChecker = &corev3.HealthCheck_HttpHealthCheck_{HttpHealthCheck: &corev3.HealthCheck_HttpHealthCheck{
			Path: "/v2/models/" + r.Model + "/versions/" + v.Name + "/ready",
		}}
	}
	c.TypedExtensionProtocolOptions = map[string]*anypb.Any{
		"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": mustAny(opts),
	}
	c.HealthChecks = []*corev3.HealthCheck{hc}
	c.CircuitBreakers = &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{{
		MaxConnections:     wrapperspb.UInt32(4096),
		MaxPendingRequests: wrapperspb.UInt32(4096),
		MaxRequests:        wrapperspb.UInt32(8192),
		MaxRetries:         wrapperspb.UInt32(64),
	}}}
	return c
}

// edsCluster is the part of a cluster both Envoy and gRPC accept.
func edsCluster(name string) *clusterv3.Cluster {
	return &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		EdsClusterConfig:     &clusterv3.Cluster_EdsClusterConfig{EdsConfig: adsSource()},
		ConnectTimeout:       durationpb.New(time.Second),
		LbPolicy:             clusterv3.Cluster_ROUND_ROBIN,
	}
}

// loadAssignment lists a version's endpoints by IP. grpc-go needs a locality and a
// positive locality weight, so endpoints without a known zone sit in one named locality,
// and endpoints with a zone (Input.Zones) in one locality per zone. Each locality is
// weighted by its number of endpoints: localities are picked by weight first, so equal
// weights would load a zone's endpoints more the fewer they are.
func loadAssignment(in *Input, r *rollout.Rollout, v rollout.Version, protocol string) *endpointv3.ClusterLoadAssignment {
	var lbs []*endpointv3.LbEndpoint
	byZone := map[string][]*endpointv3.LbEndpoint{}
	var zones []string
	for _, hp := range in.endpoints(v.Addrs(protocol)) {
		lb := &endpointv3.LbEndpoint{
			HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
				Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
					Address:       hp.ip,
					PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: hp.port},
				}}},
			}},
			HealthStatus:        corev3.HealthStatus_UNKNOWN,
			LoadBalancingWeight: wrapperspb.UInt32(1),
		}
		if z := in.Zones[hp.ip]; z != "" {
			if byZone[z] == nil {
				zones = append(zones, z)
			}
			byZone[z] = append(byZone[z], lb)
			continue
		}
		lbs = append(lbs, lb)
	}
	cla := &endpointv3.ClusterLoadAssignment{ClusterName: ProtocolClusterName(r.Model, v.Name, protocol)}
	if len(lbs) > 0 {
		w := uint32(1) // alone, its weight does not matter
		if len(zones) > 0 {
			w = uint32(len(lbs))
		}
		cla.Endpoints = []*endpointv3.LocalityLbEndpoints{{
			Locality:            &corev3.Locality{Region: "patchbay", Zone: r.Model, SubZone: v.Name},
			LbEndpoints:         lbs,
			LoadBalancingWeight: wrapperspb.UInt32(w),
		}}
	}
	slices.Sort(zones)
	for _, z := range zones {
		cla.Endpoints = append(cla.Endpoints, &endpointv3.LocalityLbEndpoints{
			Locality:            &corev3.Locality{Zone: z, SubZone: r.Model + "/" + v.Name},
			LbEndpoints:         byZone[z],
			LoadBalancingWeight: wrapperspb.UInt32(uint32(len(byZone[z]))),
		})
	}
	return cla
}

func adsSource() *corev3.ConfigSource {
	return &corev3.ConfigSource{
		ResourceApiVersion:    corev3.ApiVersion_V3,
		ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
	}
}

func httpFilter(name string, cfg proto.Message) *hcmv3.HttpFilter {
	return &hcmv3.HttpFilter{Name: name, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(cfg)}}
}

// setHeader is a header value set with raw_value semantics replaced: Envoy's config API
// uses HeaderValue.value for static config; OVERWRITE_IF_EXISTS_OR_ADD replaces any value.
func setHeader(k, v string) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{
		Header:       &corev3.HeaderValue{Key: k, Value: v},
		AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
	}
}

func exactHeader(name, value string) *routev3.HeaderMatcher {
	return &routev3.HeaderMatcher{
		Name: name,
		HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{
			MatchPattern: &matcherv3.StringMatcher_Exact{Exact: value},
		}},
	}
}

// mustAny packs one of our own messages, deterministically so that equal configs give equal
// bytes (and so equal snapshot versions). Marshalling a well-formed generated message cannot
// fail; a failure here is a programming error caught by every translation test.
func mustAny(m proto.Message) *anypb.Any {
	a := &anypb.Any{}
	if err := anypb.MarshalFrom(a, m, proto.MarshalOptions{Deterministic: true}); err != nil {
		panic(fmt.Sprintf("marshal %T: %v", m, err))
	}
	return a
}

var _ types.Resource = (*clusterv3.Cluster)(nil)

// GRPCHealthService is the grpc.health.v1 service a version's gRPC endpoints are checked
// on: the version's own name on a patchbay host (api/oip.HealthService), the server's
// overall health ("") on an unmodified OIP server, which knows no patchbay names.
func GRPCHealthService(model string, v rollout.Version) string {
	if v.OIPHost() {
		return ""
	}
	return oip.HealthService(model, v.Name)
}
