package translate

import (
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/patchbay-io/patchbay/api/headers"
	"github.com/patchbay-io/patchbay/xds/rollout"
)

// GRPC builds the proxyless flavour: for each model an api_listener named after it (a client
// dials xds:///<model>) with its route table inline — Snapshot.Consistent() does not follow
// an api_listener's RDS reference, and inlining removes a round trip — plus EDS clusters.
//
// gRPC picks weighted clusters per RPC at random (it has no header_name random value), so
// the proxyless split is exact in aggregate but not sticky per user; header-matched version
// routes work as on Envoy. Weights are summed per version rather than emitted as slot runs.
func GRPC(in *Input) Resources {
	res := Resources{}
	for _, r := range in.Set.Rollouts {
		res[resource.ListenerType] = append(res[resource.ListenerType], grpcListener(r))
		for _, v := range r.Versions {
			res[resource.ClusterType] = append(res[resource.ClusterType], edsCluster(ClusterName(r.Model, v.Name)))
			res[resource.EndpointType] = append(res[resource.EndpointType], loadAssignment(in, r, v))
		}
	}
	return res
}

func grpcListener(r *rollout.Rollout) *listenerv3.Listener {
	var routes []*routev3.Route
	for _, v := range r.Versions {
		routes = append(routes, &routev3.Route{
			Name: r.Model + "/version/" + v.Name,
			Match: &routev3.RouteMatch{
				PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"},
				Headers:       []*routev3.HeaderMatcher{exactHeader(headers.Version, v.Name)},
			},
			Action: &routev3.Route_Route{Route: grpcAction(r, &routev3.RouteAction{
				ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: ClusterName(r.Model, v.Name)},
			})},
		})
	}
	var cws []*routev3.WeightedCluster_ClusterWeight
	for _, v := range r.Versions {
		if w := r.Traffic[v.Name]; w > 0 {
			cws = append(cws, &routev3.WeightedCluster_ClusterWeight{
				Name:   ClusterName(r.Model, v.Name),
				Weight: wrapperspb.UInt32(uint32(w)),
			})
		}
	}
	routes = append(routes, &routev3.Route{
		Name:  r.Model + "/split",
		Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
		Action: &routev3.Route_Route{Route: grpcAction(r, &routev3.RouteAction{
			ClusterSpecifier: &routev3.RouteAction_WeightedClusters{WeightedClusters: &routev3.WeightedCluster{Clusters: cws}},
		})},
	})
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
		HttpFilters: []*hcmv3.HttpFilter{httpFilter("envoy.filters.http.router", &routerv3.Router{})},
	}
	return &listenerv3.Listener{
		Name:        r.Model,
		ApiListener: &listenerv3.ApiListener{ApiListener: mustAny(hcm)},
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
