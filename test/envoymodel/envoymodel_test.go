package envoymodel

import (
	"context"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/patchbay-io/patchbay/api/oip"
)

// backend is a real gRPC OIP server that counts what reaches it.
type backend struct {
	oip.UnimplementedGRPCInferenceServiceServer
	infers, unloads atomic.Int64
}

func (b *backend) ModelInfer(context.Context, *oip.ModelInferRequest) (*oip.ModelInferResponse, error) {
	b.infers.Add(1)
	return &oip.ModelInferResponse{ModelName: "m"}, nil
}

func (b *backend) RepositoryModelUnload(context.Context, *oip.RepositoryModelUnloadRequest) (*oip.RepositoryModelUnloadResponse, error) {
	b.unloads.Add(1)
	return &oip.RepositoryModelUnloadResponse{}, nil
}

func listen(t *testing.T) net.Listener {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return lis
}

func mustAny(t *testing.T, m proto.Message) *anypb.Any {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func exact(name, v string) *routev3.HeaderMatcher {
	return &routev3.HeaderMatcher{Name: name, HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{
		StringMatch: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: v}}}}
}

func direct(name, prefix string, code uint32, body string, hdrs ...*corev3.HeaderValueOption) *routev3.Route {
	return &routev3.Route{
		Name:  name,
		Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: prefix}},
		Action: &routev3.Route_DirectResponse{DirectResponse: &routev3.DirectResponseAction{
			Status: code, Body: &corev3.DataSource{Specifier: &corev3.DataSource_InlineString{InlineString: body}}}},
		ResponseHeadersToAdd: hdrs,
	}
}

func setHdr(k, v string) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: k, Value: v}, AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD}
}

// startModel serves a hand-made config from an in-process go-control-plane ADS server:
// two clusters to the same gRPC backend, one HTTP/2 and one HTTP/1.1, and direct responses.
func startModel(t *testing.T, backendAddr string) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	host, port, _ := net.SplitHostPort(backendAddr)
	var portN uint32
	for _, c := range port {
		portN = portN*10 + uint32(c-'0')
	}
	cluster := func(name string, h2 bool) (*clusterv3.Cluster, *endpointv3.ClusterLoadAssignment) {
		opts := &upstreamhttpv3.HttpProtocolOptions{UpstreamProtocolOptions: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_{
			ExplicitHttpConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions{HttpProtocolOptions: &corev3.Http1ProtocolOptions{}}}}}
		if h2 {
			opts.GetExplicitHttpConfig().ProtocolConfig = &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}}
		}
		c := &clusterv3.Cluster{
			Name:                          name,
			ClusterDiscoveryType:          &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
			EdsClusterConfig:              &clusterv3.Cluster_EdsClusterConfig{EdsConfig: &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}}},
			TypedExtensionProtocolOptions: map[string]*anypb.Any{httpOptionsKey: mustAny(t, opts)},
		}
		cla := &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{
			LbEndpoints: []*endpointv3.LbEndpoint{{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
				Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
					Address: host, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: portN}}}}}}}},
		}}}
		return c, cla
	}
	c2, e2 := cluster("h2", true)
	c1, e1 := cluster("h1", false)
	infer := func(model, cluster string) *routev3.Route {
		return &routev3.Route{
			Name: model,
			Match: &routev3.RouteMatch{
				PathSpecifier: &routev3.RouteMatch_Path{Path: "/inference.GRPCInferenceService/ModelInfer"},
				Headers:       []*routev3.HeaderMatcher{exact("x-model", model)},
			},
			Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster}}},
		}
	}
	rc := &routev3.RouteConfiguration{Name: "r", VirtualHosts: []*routev3.VirtualHost{{
		Name: "v", Domains: []string{"*"},
		Routes: []*routev3.Route{
			direct("deny", "/inference.GRPCInferenceService/Repository", 403, `{"error":"no repository"}`, setHdr("content-type", "application/json")),
			infer("h2", "h2"),
			infer("h1", "h1"),
			direct("explicit", "/explicit/", 404, "gone", setHdr("grpc-status", "9")),
		},
	}}}
	hcm := &hcmv3.HttpConnectionManager{
		StatPrefix:     "l",
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{RouteConfigName: "r", ConfigSource: &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}}}},
		HttpFilters:    []*hcmv3.HttpFilter{{Name: "envoy.filters.http.router", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(t, &routerv3.Router{})}}},
	}
	lis := &listenerv3.Listener{Name: "l", FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{{
		Name: "envoy.filters.network.http_connection_manager", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(t, hcm)}}}}}}
	snap, err := cachev3.NewSnapshot("1", map[resource.Type][]types.Resource{
		resource.ClusterType:  {c2, c1},
		resource.EndpointType: {e2, e1},
		resource.ListenerType: {lis},
		resource.RouteType:    {rc},
	})
	if err != nil {
		t.Fatal(err)
	}
	cache := cachev3.NewSnapshotCache(true, cachev3.IDHash{}, nil)
	if err := cache.SetSnapshot(ctx, "envoymodel", snap); err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(gs, serverv3.NewServer(ctx, cache, nil))
	xl := listen(t)
	go gs.Serve(xl)
	t.Cleanup(gs.Stop)

	p, err := Start(ctx, Config{XDSAddr: xl.Addr().String(), ExtprocAddr: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	pl := listen(t)
	srv := p.Server()
	go srv.Serve(pl)
	t.Cleanup(func() { srv.Close() })
	deadline := time.Now().Add(10 * time.Second)
	for p.Endpoints("h1") == 0 || !p.Ready() {
		if time.Now().After(deadline) {
			t.Fatal("model never got its config")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return pl.Addr().String()
}

// TestGRPCAsEnvoy: the model treats gRPC requests as Envoy does — per-cluster upstream
// protocol, direct responses turned into trailers-only gRPC statuses, header matchers on
// repeated headers joined with ','.
func TestGRPCAsEnvoy(t *testing.T) {
	b := &backend{}
	bl := listen(t)
	gs := grpc.NewServer()
	oip.RegisterGRPCInferenceServiceServer(gs, b)
	go gs.Serve(bl)
	t.Cleanup(gs.Stop)
	addr := startModel(t, bl.Addr().String())

	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := oip.NewGRPCInferenceServiceClient(conn)
	call := func(md ...string) error {
		ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), md...), 5*time.Second)
		defer cancel()
		_, err := c.ModelInfer(ctx, &oip.ModelInferRequest{})
		return err
	}

	if err := call("x-model", "h2"); err != nil {
		t.Fatalf("ModelInfer to the HTTP/2 cluster: %v", err)
	}
	if b.infers.Load() != 1 {
		t.Fatalf("backend saw %d infers, want 1", b.infers.Load())
	}
	// HTTP/1.1 cluster: Envoy speaks HTTP/1.1 to the gRPC server, which drops the
	// connection: a 503 local reply, which a gRPC client sees as UNAVAILABLE.
	if err := call("x-model", "h1"); status.Code(err) != codes.Unavailable {
		t.Fatalf("ModelInfer to the HTTP/1.1 cluster: %v, want UNAVAILABLE", err)
	}
	// Repeated header: "h2,h2" matches no route: the router's empty 404 -> UNIMPLEMENTED.
	if err := call("x-model", "h2", "x-model", "h2"); status.Code(err) != codes.Unimplemented || status.Convert(err).Message() != "" {
		t.Fatalf("ModelInfer with x-model twice: %v, want UNIMPLEMENTED with no message", err)
	}
	if b.infers.Load() != 1 {
		t.Fatalf("backend saw %d infers, want still 1", b.infers.Load())
	}
	// Direct response 403 -> PERMISSION_DENIED, body as grpc-message.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = c.RepositoryModelUnload(ctx, &oip.RepositoryModelUnloadRequest{ModelName: "m"})
	if st := status.Convert(err); st.Code() != codes.PermissionDenied || st.Message() != `{"error":"no repository"}` {
		t.Fatalf("RepositoryModelUnload: %v, want PERMISSION_DENIED with the body as message", err)
	}
	if b.unloads.Load() != 0 {
		t.Fatal("the unload reached the backend")
	}
	// A grpc-status among the route's response headers wins over the mapping.
	if err := conn.Invoke(ctx, "/explicit/x", &oip.ModelInferRequest{}, &oip.ModelInferResponse{}); status.Code(err) != codes.FailedPrecondition || status.Convert(err).Message() != "gone" {
		t.Fatalf("direct response with grpc-status 9: %v", err)
	}
	// The same direct response to a REST request is plain HTTP.
	resp, err := http.Post("http://"+addr+"/inference.GRPCInferenceService/RepositoryIndex", "application/json", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 403 || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("REST direct response: %d %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
}
