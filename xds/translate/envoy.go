package translate

import (
	"fmt"
	"net"
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
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/patchbay-io/patchbay/api/headers"
	"github.com/patchbay-io/patchbay/xds/rollout"
)

// Envoy builds the resources for an Envoy node of the given role: one listener (HCM with
// an early header mutation stripping client routing headers, then ext_proc -> router, routes over RDS), the route table, one EDS cluster
// per model version, and its endpoints.
func Envoy(in *Input, opts Options, role Role) (Resources, error) {
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
		resource.ListenerType: {lis},
		resource.RouteType:    {envoyRoutes(in)},
	}
	if secrets := envoySecrets(in.Set, opts, role); len(secrets) > 0 {
		res[resource.SecretType] = secrets
	}
	for _, r := range in.Set.Rollouts {
		for _, v := range r.Versions {
			res[resource.ClusterType] = append(res[resource.ClusterType], envoyCluster(r, v, opts))
			res[resource.EndpointType] = append(res[resource.EndpointType], loadAssignment(in, r, v))
		}
	}
	return res, nil
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
	strip := make([]*mutationv3.HeaderMutation, 0, len(headers.Stripped))
	for _, h := range headers.Stripped {
		strip = append(strip, &mutationv3.HeaderMutation{Action: &mutationv3.HeaderMutation_Remove{Remove: h}})
	}
	extproc := &extprocv3.ExternalProcessor{
		GrpcService: &corev3.GrpcService{
			TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: ExtprocCluster}},
			Timeout:         durationpb.New(timeout),
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
		StatPrefix: name,
		CodecType:  hcmv3.HttpConnectionManager_AUTO,
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{
			RouteConfigName: RouteConfigName,
			ConfigSource:    adsSource(),
		}},
		// Client-sent routing headers are removed by an early header mutation: it runs
		// before route selection and before any filter, so a client cannot pick its
		// variant even when ext_proc is unreachable (an HTTP header_mutation filter would
		// run after Envoy has already picked the route with the forged headers).
		EarlyHeaderMutationExtensions: []*corev3.TypedExtensionConfig{{
			Name:        "envoy.http.early_header_mutation.header_mutation",
			TypedConfig: mustAny(&earlymutationv3.HeaderMutation{Mutations: strip}),
		}},
		HttpFilters:                  filters,
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

// envoyRoutes builds the one route table every Envoy node uses. Only the OIP inference
// surface reaches a model cluster: REST POST .../infer, GET metadata and GET .../ready (and
// the server-level GETs chosen by x-patchbay-model) for models served over REST; the six
// inference methods of inference.GRPCInferenceService (with x-patchbay-model) for models
// served over gRPC. Everything else — the repository extension, other methods and verbs,
// the other protocol of a model — gets a direct_response from Envoy.
//
// A direct_response to a gRPC request (content-type application/grpc or application/grpc+…)
// is not sent as HTTP: the router hands it to sendLocalReply (envoy
// source/common/router/router.cc, Filter::decodeHeaders), which answers gRPC requests
// trailers-only with :status 200, content-type application/grpc, grpc-status from
// Grpc::Utility::httpToGrpcStatus(status) and the body, percent-encoded, as grpc-message
// (source/common/http/utility.cc, Utility::prepareLocalReply; source/common/grpc/status.cc:
// 403 -> PERMISSION_DENIED, 404 -> UNIMPLEMENTED; source/common/grpc/common.cc,
// hasGrpcContentType). So the statuses below are chosen for both audiences: a repository
// call is 403 (gRPC PERMISSION_DENIED) on gRPC and 404 on REST, anything else 404 (gRPC
// UNIMPLEMENTED).
func envoyRoutes(in *Input) *routev3.RouteConfiguration {
	routes := []*routev3.Route{
		directRoute("repository-grpc", prefixMatch(grpcRepositoryPrefix), 403, msgRepository),
		directRoute("repository-rest", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_PathSeparatedPrefix{
			PathSeparatedPrefix: restRepositoryPrefix}}, 404, msgRepository),
	}
	for _, r := range in.Set.Rollouts {
		base := restModelsPrefix + r.Model
		if r.Versions[0].Protocol == "grpc" {
			routes = append(routes, modelRoutes(in, r, "grpc", grpcSurfaceMatch(r.Model))...)
			routes = append(routes,
				directRoute(r.Model+"/grpc-other", &routev3.RouteMatch{
					PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: grpcOIPPrefix},
					Headers:       []*routev3.HeaderMatcher{exactHeader(headers.Model, r.Model)},
				}, 404, "method not served through patchbay: the data path carries only "+strings.Join(GRPCMethods, ", ")),
				directRoute(r.Model+"/rest-refused", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_PathSeparatedPrefix{
					PathSeparatedPrefix: base}}, 404, "model "+r.Model+" is served over OIP gRPC only"),
				directRoute(r.Model+"/server-rest-refused", restServerMatch(r.Model), 404, "model "+r.Model+" is served over OIP gRPC only"),
			)
			continue
		}
		// Paths that name a version: honoured when pinning is on, refused otherwise —
		// also when ext_proc is unreachable.
		if r.Pinning {
			for _, v := range r.Versions {
				vbase := base + "/versions/" + v.Name
				for i, m := range []*routev3.RouteMatch{restInferMatch(vbase), restReadMatch(vbase)} {
					routes = append(routes, &routev3.Route{
						Name:                 r.Model + "/pin/" + v.Name + []string{"/infer", "/read"}[i],
						Match:                m,
						Action:               versionAction(r, v.Name),
						ResponseHeadersToAdd: []*corev3.HeaderValueOption{setHeader(headers.ServedBy, r.Model+"/"+v.Name)},
						RequestHeadersToAdd:  []*corev3.HeaderValueOption{setHeader(headers.Version, v.Name)},
					})
				}
			}
		} else {
			routes = append(routes, directRoute(r.Model+"/pin-refused",
				prefixMatch(base+"/versions/"), 403, "model "+r.Model+" does not allow choosing a version"))
		}
		routes = append(routes, modelRoutes(in, r, "infer", restInferMatch(base))...)
		routes = append(routes, modelRoutes(in, r, "read", restReadMatch(base))...)
		routes = append(routes, modelRoutes(in, r, "server", restServerMatch(r.Model))...)
		routes = append(routes,
			directRoute(r.Model+"/rest-other", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_PathSeparatedPrefix{
				PathSeparatedPrefix: base}}, 404, "not served through patchbay: the data path carries only POST "+base+"/infer, GET "+base+" and GET "+base+"/ready"),
			directRoute(r.Model+"/grpc-refused", &routev3.RouteMatch{
				PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: grpcOIPPrefix},
				Headers:       []*routev3.HeaderMatcher{exactHeader(headers.Model, r.Model)},
			}, 404, "model "+r.Model+" is served over OIP REST only"),
		)
	}
	routes = append(routes,
		directRoute("unknown-model", prefixMatch(restModelsPrefix), 404, "unknown model"),
		directRoute("server-needs-model", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_SafeRegex{
			SafeRegex: &matcherv3.RegexMatcher{Regex: serverSurfaceRegex}}},
			404, "server-level calls need "+headers.Model+" naming a known model"),
		directRoute("unknown-grpc-model", prefixMatch(grpcOIPPrefix),
			404, "unknown model: set "+headers.Model+" to a known model"),
		directRoute("not-inference", prefixMatch("/"), 404, "not found: patchbay's data path carries only the OIP inference surface"),
	)
	return &routev3.RouteConfiguration{
		Name: RouteConfigName,
		VirtualHosts: []*routev3.VirtualHost{{
			Name:    "patchbay",
			Domains: []string{"*"},
			Routes:  routes,
			// Echo the exposures ext_proc decided on the response, for logging and analysis.
			ResponseHeadersToAdd: []*corev3.HeaderValueOption{{
				Header:       &corev3.HeaderValue{Key: headers.Experiments, Value: "%REQ(" + headers.Experiments + ")%"},
				AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
			}},
		}},
		ValidateClusters: wrapperspb.Bool(false),
	}
}

// modelRoutes are, for one match of a model's inference surface, its version routes (a
// header-matched x-patchbay-version) and then its split.
func modelRoutes(in *Input, r *rollout.Rollout, kind string, match *routev3.RouteMatch) []*routev3.Route {
	var out []*routev3.Route
	for _, v := range r.Versions {
		m := proto.Clone(match).(*routev3.RouteMatch)
		m.Headers = append(m.Headers, exactHeader(headers.Version, v.Name))
		out = append(out, &routev3.Route{
			Name:                 r.Model + "/" + kind + "/version/" + v.Name,
			Match:                m,
			Action:               versionAction(r, v.Name),
			ResponseHeadersToAdd: []*corev3.HeaderValueOption{setHeader(headers.ServedBy, r.Model+"/"+v.Name)},
		})
	}
	return append(out, &routev3.Route{
		Name:   r.Model + "/" + kind + "/split",
		Match:  match,
		Action: splitAction(r, in.slotMap(r)),
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

func versionAction(r *rollout.Rollout, version string) *routev3.Route_Route {
	a := baseAction(r)
	a.ClusterSpecifier = &routev3.RouteAction_Cluster{Cluster: ClusterName(r.Model, version)}
	a.RequestMirrorPolicies = mirrors(r, version)
	return &routev3.Route_Route{Route: a}
}

func splitAction(r *rollout.Rollout, slots SlotMap) *routev3.Route_Route {
	var cws []*routev3.WeightedCluster_ClusterWeight
	for _, run := range slots.Runs() {
		cws = append(cws, &routev3.WeightedCluster_ClusterWeight{
			Name:                 ClusterName(r.Model, run.Version),
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
	a.RequestMirrorPolicies = mirrors(r, "")
	return &routev3.Route_Route{Route: a}
}

// mirrors are the model's shadows, for every route of the model (split, experiment and
// pinned versions alike) except, on a version route, a shadow of that same version.
func mirrors(r *rollout.Rollout, servedVersion string) []*routev3.RouteAction_RequestMirrorPolicy {
	var out []*routev3.RouteAction_RequestMirrorPolicy
	for _, sh := range r.Shadow {
		if sh.Version == servedVersion {
			continue
		}
		out = append(out, &routev3.RouteAction_RequestMirrorPolicy{
			Cluster: ClusterName(r.Model, sh.Version),
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
func envoyCluster(r *rollout.Rollout, v rollout.Version, deploy Options) *clusterv3.Cluster {
	c := edsCluster(ClusterName(r.Model, v.Name))
	if upstreamTLS(v, deploy) {
		envoyUpstreamTLS(c, v, deploy)
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
		Timeout:            durationpb.New(time.Second),
		Interval:           durationpb.New(2 * time.Second),
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
	if v.Protocol == "grpc" {
		opts.UpstreamProtocolOptions = &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}},
		}}
		hc.HealthChecker = &corev3.HealthCheck_GrpcHealthCheck_{GrpcHealthCheck: &corev3.HealthCheck_GrpcHealthCheck{}}
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
// positive locality weight, so every endpoint sits in one named locality of weight 1.
func loadAssignment(in *Input, r *rollout.Rollout, v rollout.Version) *endpointv3.ClusterLoadAssignment {
	var lbs []*endpointv3.LbEndpoint
	for _, hp := range in.endpoints(v) {
		lbs = append(lbs, &endpointv3.LbEndpoint{
			HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
				Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
					Address:       hp.ip,
					PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: hp.port},
				}}},
			}},
			HealthStatus:        corev3.HealthStatus_UNKNOWN,
			LoadBalancingWeight: wrapperspb.UInt32(1),
		})
	}
	cla := &endpointv3.ClusterLoadAssignment{ClusterName: ClusterName(r.Model, v.Name)}
	if len(lbs) > 0 {
		cla.Endpoints = []*endpointv3.LocalityLbEndpoints{{
			Locality:            &corev3.Locality{Region: "patchbay", Zone: r.Model, SubZone: v.Name},
			LbEndpoints:         lbs,
			LoadBalancingWeight: wrapperspb.UInt32(1),
		}}
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
