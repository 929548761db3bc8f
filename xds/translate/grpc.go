package translate

import (
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	faultv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/patchbay-io/patchbay/api/headers"
	"github.com/patchbay-io/patchbay/xds/rollout"
)

// GRPC builds the proxyless flavour: for each model served over OIP gRPC (see
// rollout.Rollout.Serves) an api_listener named after it (a client dials xds:///<model>)
// with its route table inline — Snapshot.Consistent() does not follow
// an api_listener's RDS reference, and inlining removes a round trip — plus EDS clusters.
//
// gRPC picks weighted clusters per RPC at random (it has no header_name random value), so
// the proxyless split is exact in aggregate but not sticky per user; header-matched version
// routes work as on Envoy. Weights are summed per version rather than emitted as slot runs.
// The clusters are the versions' gRPC clusters (GRPCClusterName, gRPC endpoints only), the
// same names Envoy's gRPC routes use. A model not served over gRPC has no listener: grpc-go
// fails RPCs to xds:///<model> as it does for any name the control plane does not know.
func GRPC(in *Input) Resources { return GRPCWith(in, Options{}) }

// GRPCWith is GRPC with the deployment options: clusters of versions with upstream TLS
// carry the proxyless UpstreamTlsContext (grpcUpstreamTLS).
func GRPCWith(in *Input, opts Options) Resources {
	res := Resources{}
	for _, r := range in.Set.Rollouts {
		res.add(GRPCModel(in, r, opts))
	}
	return res
}

// GRPCModel is the proxyless resources of model r: its api_listener, and a cluster and
// ClusterLoadAssignment per version serving gRPC. Empty for a model not served over gRPC.
func GRPCModel(in *Input, r *rollout.Rollout, opts Options) Resources {
	res := Resources{}
	if !r.Serves(rollout.GRPC) {
		return res
	}
	res[resource.ListenerType] = append(res[resource.ListenerType], grpcListener(in, r))
	for _, v := range r.Versions {
		if !v.Serves(rollout.GRPC) {
			continue
		}
		c := edsCluster(GRPCClusterName(r.Model, v.Name))
		if upstreamTLS(v, opts) {
			grpcUpstreamTLS(c)
		}
		res[resource.ClusterType] = append(res[resource.ClusterType], c)
		res[resource.EndpointType] = append(res[resource.EndpointType], loadAssignment(in, r, v, rollout.GRPC))
	}
	return res
}

// grpcListener is one model's api_listener. Only the six OIP inference methods are routed;
// grpc-go cannot send a direct_response (it fails any non-forwarding route, and an RPC that
// matches no route, with UNAVAILABLE: grpc-go internal/xds/resolver/serviceconfig.go), so
// the repository methods and every other method match routes whose fault filter override
// aborts every RPC at the client with a clear status (PERMISSION_DENIED for the repository
// extension, UNIMPLEMENTED otherwise) before any cluster is picked (grpc-go
// internal/xds/httpfilter/fault). Those routes name the model's first gRPC cluster only
// because a route action must name one; no RPC is ever sent to it.
func grpcListener(in *Input, r *rollout.Rollout) *listenerv3.Listener {
	routes := []*routev3.Route{grpcAbortRoute(r, "/repository-refused", prefixMatch(grpcRepositoryPrefix), codes.PermissionDenied)}
	// Version routes stay for unhealthy versions: in the proxyless flavour there is no
	// ext_proc, so x-patchbay-version is only ever the caller's own pin (pins are kept), and
	// a route naming the cluster keeps it in grpc-go's cluster manager — one dropped from
	// every route and named again on recovery fails RPCs picked in between with "unknown
	// cluster selected for RPC" (seen in TestUnhealthyVersionLeavesTheSplit).
	// A rolled-back version's route refuses the caller's pin (FAILED_PRECONDITION, aborted
	// at the client: nothing is sent) but still names the version's cluster, for the same
	// reason: a release names it again without "unknown cluster" failures in between.
	down := in.down(r)
	for _, v := range r.Versions {
		if !v.Serves(rollout.GRPC) {
			continue
		}
		m := grpcSurfaceMatch("")
		m.Headers = []*routev3.HeaderMatcher{exactHeader(headers.Version, v.Name)}
		if r.Closed[v.Name] {
			rt := grpcAbortRoute(r, "/version/"+v.Name+"/rolled-back-refused", m, codes.FailedPrecondition)
			rt.GetRoute().ClusterSpecifier = &routev3.RouteAction_Cluster{Cluster: GRPCClusterName(r.Model, v.Name)}
			routes = append(routes, rt)
			continue
		}
		routes = append(routes, &routev3.Route{
			Name:  r.Model + "/version/" + v.Name,
			Match: m,
			Action: &routev3.Route_Route{Route: grpcAction(r, &routev3.RouteAction{
				ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: GRPCClusterName(r.Model, v.Name)},
			})},
		})
	}
	// The weights are the traffic, with an unhealthy version's share lent as in the Envoy
	// split (Input.ServingSlots): grpc-go picks a weighted cluster at random, not by slot.
	weights := map[string]int{}
	if down == nil {
		weights = r.Traffic
	} else {
		for _, v := range in.ServingSlots(r) {
			weights[v]++
		}
	}
	var cws []*routev3.WeightedCluster_ClusterWeight
	for _, v := range r.Versions {
		if w := weights[v.Name]; w > 0 {
			cws = append(cws, &routev3.WeightedCluster_ClusterWeight{
				Name:   GRPCClusterName(r.Model, v.Name),
				Weight: wrapperspb.UInt32(uint32(w)),
			})
		}
	}
	routes = append(routes,
		&routev3.Route{
			Name:  r.Model + "/split",
			Match: grpcSurfaceMatch(""),
			Action: &routev3.Route_Route{Route: grpcAction(r, &routev3.RouteAction{
				ClusterSpecifier: &routev3.RouteAction_WeightedClusters{WeightedClusters: &routev3.WeightedCluster{Clusters: cws}},
			})},
		},
		grpcAbortRoute(r, "/not-inference", prefixMatch("/"), codes.Unimplemented),
	)
	hcm := &hcmv3.HttpConnectionManager{
		StatPrefix: r.Model,
		RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
			Name: r.Model,
			VirtualHosts: []*routev3.VirtualHost{{
				Name:    r.Model,
				Domains: []string{"*"},
				Routes:  routes,
			}},
		}},
		HttpFilters: []*hcmv3.HttpFilter{
			// No fault at the listener level: only the refusing routes override it.
			httpFilter(faultFilter, &faultv3.HTTPFault{}),
			httpFilter("envoy.filters.http.router", &routerv3.Router{}),
		},
	}
	return &listenerv3.Listener{
		Name:        r.Model,
		ApiListener: &listenerv3.ApiListener{ApiListener: mustAny(hcm)},
	}
}

const faultFilter = "envoy.filters.http.fault"

// grpcAbortRoute refuses every RPC it matches at the client with code.
func grpcAbortRoute(r *rollout.Rollout, name string, m *routev3.RouteMatch, code codes.Code) *routev3.Route {
	return &routev3.Route{
		Name:  r.Model + name,
		Match: m,
		Action: &routev3.Route_Route{Route: &routev3.RouteAction{
			ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: GRPCClusterName(r.Model, firstGRPCVersion(r))},
		}},
		TypedPerFilterConfig: map[string]*anypb.Any{faultFilter: mustAny(&faultv3.HTTPFault{
			Abort: &faultv3.FaultAbort{
				ErrorType:  &faultv3.FaultAbort_GrpcStatus{GrpcStatus: uint32(code)},
				Percentage: &typev3.FractionalPercent{Numerator: 100, Denominator: typev3.FractionalPercent_HUNDRED},
			},
		})},
	}
}

// grpcAction adds what gRPC honours of the per-model policy: the timeout as
// max_stream_duration, and retries on UNAVAILABLE.
func grpcAction(r *rollout.Rollout, a *routev3.RouteAction) *routev3.RouteAction {
	if r.Timeout.Duration > 0 {
		a.MaxStreamDuration = &routev3.RouteAction_MaxStreamDuration{MaxStreamDuration: durationpb.New(r.Timeout.Duration)}
	}
	if r.Retries != nil && *r.Retries > 0 {
		a.RetryPolicy = &routev3.RetryPolicy{
			RetryOn:    "unavailable",
			NumRetries: wrapperspb.UInt32(uint32(*r.Retries)),
		}
	}
	return a
}

// firstGRPCVersion is the first version with gRPC endpoints (a model served over gRPC has one).
func firstGRPCVersion(r *rollout.Rollout) string {
	for _, v := range r.Versions {
		if v.Serves(rollout.GRPC) {
			return v.Name
		}
	}
	return r.Versions[0].Name
}
