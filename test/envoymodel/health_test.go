package envoymodel

import (
	"context"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
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
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	grpchealth "google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/patchbay-io/patchbay/api/oip"
)

// xdsFixture serves hand-made resources to a model over a real ADS stream; set replaces them.
type xdsFixture struct {
	t     *testing.T
	cache cachev3.SnapshotCache
	n     int
	proxy *Proxy
	addr  string                     // the model's listener
	vh    func(*routev3.VirtualHost) // optional: adjusts the virtual host set serves
}

func newXDSFixture(t *testing.T) *xdsFixture {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	f := &xdsFixture{t: t, cache: cachev3.NewSnapshotCache(true, cachev3.IDHash{}, nil)}
	gs := grpc.NewServer()
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(gs, serverv3.NewServer(ctx, f.cache, nil))
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
	f.proxy, f.addr = p, pl.Addr().String()
	return f
}

// set serves the clusters (with their endpoints) and routes, and waits until the model has them.
func (f *xdsFixture) set(clusters []*clusterv3.Cluster, eps []*endpointv3.ClusterLoadAssignment, routes ...*routev3.Route) {
	f.t.Helper()
	f.n++
	hcm := &hcmv3.HttpConnectionManager{
		StatPrefix:     "l",
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{RouteConfigName: "r", ConfigSource: adsConfig()}},
		HttpFilters:    []*hcmv3.HttpFilter{{Name: "envoy.filters.http.router", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(f.t, &routerv3.Router{})}}},
	}
	lis := &listenerv3.Listener{Name: "l", FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{{
		Name: "envoy.filters.network.http_connection_manager", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(f.t, hcm)}}}}}}
	vh := &routev3.VirtualHost{Name: "v", Domains: []string{"*"}, Routes: routes}
	if f.vh != nil {
		f.vh(vh)
	}
	rc := &routev3.RouteConfiguration{Name: "r", VirtualHosts: []*routev3.VirtualHost{vh}}
	res := map[resource.Type][]types.Resource{resource.ListenerType: {lis}, resource.RouteType: {rc}}
	for _, c := range clusters {
		res[resource.ClusterType] = append(res[resource.ClusterType], c)
	}
	for _, e := range eps {
		res[resource.EndpointType] = append(res[resource.EndpointType], e)
	}
	version := strconv.Itoa(f.n)
	snap, err := cachev3.NewSnapshot(version, res)
	if err != nil {
		f.t.Fatal(err)
	}
	if err := f.cache.SetSnapshot(context.Background(), "envoymodel", snap); err != nil {
		f.t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		s := f.proxy.state.Load()
		if s.version == version && s.routes != nil && s.routes.GetVirtualHosts()[0].GetRoutes()[0].GetName() == routes[0].GetName() && len(s.endpoints) == len(eps) && len(s.clusters) == len(clusters) {
			return
		}
		if time.Now().After(deadline) {
			f.t.Fatal("model never got the config")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func adsConfig() *corev3.ConfigSource {
	return &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}}
}

// testCluster is an EDS cluster of the given protocol with hc as its health check (may be nil).
func testCluster(t *testing.T, name string, h2 bool, hc *corev3.HealthCheck, addrs ...string) (*clusterv3.Cluster, *endpointv3.ClusterLoadAssignment) {
	t.Helper()
	opts := &upstreamhttpv3.HttpProtocolOptions{UpstreamProtocolOptions: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_{
		ExplicitHttpConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions{HttpProtocolOptions: &corev3.Http1ProtocolOptions{}}}}}
	if h2 {
		opts.GetExplicitHttpConfig().ProtocolConfig = &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}}
	}
	c := &clusterv3.Cluster{
		Name:                          name,
		ClusterDiscoveryType:          &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		EdsClusterConfig:              &clusterv3.Cluster_EdsClusterConfig{EdsConfig: adsConfig()},
		TypedExtensionProtocolOptions: map[string]*anypb.Any{httpOptionsKey: mustAny(t, opts)},
	}
	if hc != nil {
		c.HealthChecks = []*corev3.HealthCheck{hc}
	}
	var lbs []*endpointv3.LbEndpoint
	for _, a := range addrs {
		host, port, _ := net.SplitHostPort(a)
		n, _ := strconv.Atoi(port)
		lbs = append(lbs, &endpointv3.LbEndpoint{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
			Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
				Address: host, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(n)}}}}}}})
	}
	return c, &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{LbEndpoints: lbs}}}
}

// fastHC is a health check every 50 ms (also without traffic), timeout 1 s, thresholds 1 and 2.
func fastHC(checker any) *corev3.HealthCheck {
	hc := &corev3.HealthCheck{Timeout: durationpb.New(time.Second), Interval: durationpb.New(50 * time.Millisecond),
		NoTrafficInterval: durationpb.New(50 * time.Millisecond), UnhealthyThreshold: wrapperspb.UInt32(2), HealthyThreshold: wrapperspb.UInt32(1)}
	switch c := checker.(type) {
	case *corev3.HealthCheck_GrpcHealthCheck:
		hc.HealthChecker = &corev3.HealthCheck_GrpcHealthCheck_{GrpcHealthCheck: c}
	case *corev3.HealthCheck_HttpHealthCheck:
		hc.HealthChecker = &corev3.HealthCheck_HttpHealthCheck_{HttpHealthCheck: c}
	}
	return hc
}

func toCluster(name, cluster string, path string) *routev3.Route {
	return &routev3.Route{Name: name,
		Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: path}},
		Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster}}}}
}

// grpcBackend is a gRPC OIP server with a health service whose statuses the test sets.
type grpcBackend struct {
	oip.UnimplementedGRPCInferenceServiceServer
	addr   string
	health *grpchealth.Server
	infers atomic.Int64
}

func (b *grpcBackend) ModelInfer(context.Context, *oip.ModelInferRequest) (*oip.ModelInferResponse, error) {
	b.infers.Add(1)
	return &oip.ModelInferResponse{ModelName: "m"}, nil
}

func startGRPCBackend(t *testing.T) *grpcBackend {
	t.Helper()
	b := &grpcBackend{health: grpchealth.NewServer()}
	gs := grpc.NewServer()
	oip.RegisterGRPCInferenceServiceServer(gs, b)
	healthpb.RegisterHealthServer(gs, b.health)
	l := listen(t)
	go gs.Serve(l)
	t.Cleanup(gs.Stop)
	b.addr = l.Addr().String()
	return b
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestGRPCHealthChecksAsEnvoy: a gRPC cluster's hosts are checked with grpc.health.v1 Check
// on the configured service_name; a host answering NOT_SERVING leaves load balancing; a
// cluster whose only host is unhealthy still gets traffic (Envoy's panic threshold, 50%
// by default) unless the threshold is 0, when the router answers "no healthy upstream"; a
// gRPC check on an HTTP/1.1 cluster is refused as Envoy refuses it.
func TestGRPCHealthChecksAsEnvoy(t *testing.T) {
	a, b := startGRPCBackend(t), startGRPCBackend(t)
	for _, be := range []*grpcBackend{a, b} {
		be.health.SetServingStatus("svc/v1", healthpb.HealthCheckResponse_SERVING)
	}
	f := newXDSFixture(t)
	hc := fastHC(&corev3.HealthCheck_GrpcHealthCheck{ServiceName: "svc/v1"})
	c, e := testCluster(t, "g", true, hc, a.addr, b.addr)
	bad, badE := testCluster(t, "bad", false, hc, a.addr)
	f.set([]*clusterv3.Cluster{c, bad}, []*endpointv3.ClusterLoadAssignment{e, badE},
		toCluster("bad", "bad", "/bad/"), toCluster("g", "g", "/"))
	waitFor(t, "both hosts healthy", func() bool { return f.proxy.HostHealthy("g", a.addr) && f.proxy.HostHealthy("g", b.addr) })
	if err := f.proxy.ClusterError("bad"); err == nil || !strings.Contains(err.Error(), "bad cluster must support HTTP/2 for gRPC healthchecking") {
		t.Errorf("gRPC health check on an HTTP/1.1 cluster: %v", err)
	}

	conn, err := grpc.NewClient(f.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := oip.NewGRPCInferenceServiceClient(conn)
	infer := func(n int) error {
		for range n {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, err := client.ModelInfer(ctx, &oip.ModelInferRequest{})
			cancel()
			if err != nil {
				return err
			}
		}
		return nil
	}
	if err := infer(10); err != nil || a.infers.Load() == 0 || b.infers.Load() == 0 {
		t.Fatalf("both healthy: %v, a %d b %d", err, a.infers.Load(), b.infers.Load())
	}
	// b's version goes NOT_SERVING (an active failure: unhealthy at once): 50% healthy is
	// not below the panic threshold, so only a serves.
	b.health.SetServingStatus("svc/v1", healthpb.HealthCheckResponse_NOT_SERVING)
	waitFor(t, "b unhealthy", func() bool { return !f.proxy.HostHealthy("g", b.addr) })
	before := b.infers.Load()
	if err := infer(10); err != nil || b.infers.Load() != before {
		t.Fatalf("b NOT_SERVING: %v, b got %d more", err, b.infers.Load()-before)
	}
	// a's health server shuts down: NOT_SERVING for every service.
	a.health.Shutdown()
	waitFor(t, "a unhealthy", func() bool { return !f.proxy.HostHealthy("g", a.addr) })
	// No healthy host: 0% < 50%, panic, every host gets traffic again.
	beforeA, beforeB := a.infers.Load(), b.infers.Load()
	if err := infer(10); err != nil || a.infers.Load() == beforeA || b.infers.Load() == beforeB {
		t.Fatalf("panic mode should balance over unhealthy hosts: %v, a +%d b +%d", err, a.infers.Load()-beforeA, b.infers.Load()-beforeB)
	}
	// Panic disabled: no healthy upstream, a 503 local reply (gRPC UNAVAILABLE).
	c.CommonLbConfig = &clusterv3.Cluster_CommonLbConfig{HealthyPanicThreshold: &typev3.Percent{Value: 0}}
	f.set([]*clusterv3.Cluster{c, bad}, []*endpointv3.ClusterLoadAssignment{e, badE},
		toCluster("bad", "bad", "/bad/"), toCluster("g", "g", "/"))
	waitFor(t, "hosts checked again", func() bool { return f.proxy.ClusterError("g") == nil })
	time.Sleep(200 * time.Millisecond) // a few check rounds: both stay unhealthy
	beforeA, beforeB = a.infers.Load(), b.infers.Load()
	err = infer(1)
	if st := status.Convert(err); st.Code() != codes.Unavailable || st.Message() != "no healthy upstream" {
		t.Fatalf("no healthy host, panic off: %v, want UNAVAILABLE no healthy upstream", err)
	}
	if a.infers.Load() != beforeA || b.infers.Load() != beforeB {
		t.Fatal("a request reached an unhealthy host with panic off")
	}
	// Recovery: the first successful check of a failed host makes it healthy.
	b.health.SetServingStatus("svc/v1", healthpb.HealthCheckResponse_SERVING)
	waitFor(t, "b healthy again", func() bool { return f.proxy.HostHealthy("g", b.addr) })
	if err := infer(3); err != nil {
		t.Fatalf("after recovery: %v", err)
	}
}

// TestHTTPHealthChecksAndRESTToGRPC: an HTTP cluster's hosts are checked with GET path over
// HTTP/1.1 with Host set to the cluster name, 200 being healthy; and a REST request routed
// to an HTTP/2 cluster of grpc-go gets grpc-go's HTTP 415, as through Envoy.
func TestHTTPHealthChecksAndRESTToGRPC(t *testing.T) {
	var ready atomic.Bool
	ready.Store(true)
	var mu sync.Mutex
	var hosts []string
	var served atomic.Int64
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v2/models/m/versions/v1/ready", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		hosts = append(hosts, r.Host+" "+r.Proto+" "+r.Header.Get("User-Agent"))
		mu.Unlock()
		if !ready.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	})
	mux.HandleFunc("POST /", func(w http.ResponseWriter, r *http.Request) { served.Add(1) })
	hl := listen(t)
	hs := &http.Server{Handler: mux}
	go hs.Serve(hl)
	t.Cleanup(func() { hs.Close() })
	g := startGRPCBackend(t)

	f := newXDSFixture(t)
	c, e := testCluster(t, "rest", false, fastHC(&corev3.HealthCheck_HttpHealthCheck{Path: "/v2/models/m/versions/v1/ready"}), hl.Addr().String())
	c.CommonLbConfig = &clusterv3.Cluster_CommonLbConfig{HealthyPanicThreshold: &typev3.Percent{Value: 0}}
	gc, ge := testCluster(t, "grpc", true, nil, g.addr)
	f.set([]*clusterv3.Cluster{c, gc}, []*endpointv3.ClusterLoadAssignment{e, ge},
		toCluster("grpc", "grpc", "/grpc/"), toCluster("rest", "rest", "/"))
	waitFor(t, "rest host healthy", func() bool { return f.proxy.HostHealthy("rest", hl.Addr().String()) })
	mu.Lock()
	if len(hosts) == 0 || hosts[0] != "rest HTTP/1.1 Envoy/HC" {
		t.Errorf("health check request: %q, want Host rest over HTTP/1.1 from Envoy/HC", hosts)
	}
	mu.Unlock()
	post := func(path string) (int, string) {
		resp, err := http.Post("http://"+f.addr+path, "application/json", strings.NewReader(`{}`))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, _ := post("/v2/models/m/infer"); code != 200 || served.Load() != 1 {
		t.Fatalf("healthy REST host: %d, served %d", code, served.Load())
	}
	ready.Store(false)
	waitFor(t, "rest host unhealthy", func() bool { return !f.proxy.HostHealthy("rest", hl.Addr().String()) })
	if code, body := post("/v2/models/m/infer"); code != 503 || body != "no healthy upstream" || served.Load() != 1 {
		t.Fatalf("unhealthy REST host, panic off: %d %q, served %d", code, body, served.Load())
	}
	// REST (application/json) to grpc-go over h2c: grpc-go answers 415 Unsupported Media Type.
	if code, _ := post("/grpc/v2/models/m/infer"); code != http.StatusUnsupportedMediaType {
		t.Fatalf("REST to a gRPC cluster: %d, want 415", code)
	}
	if g.infers.Load() != 0 {
		t.Fatal("REST request ran a gRPC method")
	}
}

// TestExtprocAppendFlag: ext_proc set_headers follow the append flag (default false:
// overwrite), whatever append_action says, as Envoy's ext_proc filter does.
func TestExtprocAppendFlag(t *testing.T) {
	h := http.Header{"X-A": {"client"}, "X-B": {"client"}}
	applyMutation(h, &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{
		{Header: &corev3.HeaderValue{Key: "x-a", RawValue: []byte("ext")}, AppendAction: corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD},
		{Header: &corev3.HeaderValue{Key: "x-b", RawValue: []byte("ext")}, Append: wrapperspb.Bool(true), AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD},
	}})
	if got := h.Values("X-A"); len(got) != 1 || got[0] != "ext" {
		t.Errorf("append unset: %q, want overwritten", got)
	}
	if got := h.Values("X-B"); len(got) != 2 {
		t.Errorf("append true: %q, want appended", got)
	}
}

// TestPathRewriteAsEnvoy: prefix_rewrite replaces the matched prefix, regex_rewrite every
// match in the path (query kept), x-envoy-original-path carries the original, and a mirror
// gets the rewritten path too (shadow headers are copied after the route finalised them).
func TestPathRewriteAsEnvoy(t *testing.T) {
	type seen struct{ path, orig, host string }
	got := make(chan seen, 16)
	hl := listen(t)
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got <- seen{r.URL.RequestURI(), r.Header.Get("X-Envoy-Original-Path"), r.Host}
	})}
	go hs.Serve(hl)
	t.Cleanup(func() { hs.Close() })
	f := newXDSFixture(t)
	c, e := testCluster(t, "up", false, nil, hl.Addr().String())
	m, me := testCluster(t, "mirror", false, nil, hl.Addr().String())
	pre := toCluster("pre", "up", "/v2/models/m/")
	pre.GetRoute().PrefixRewrite = "/v2/models/m/versions/v7/"
	rx := toCluster("rx", "up", "/")
	rx.Match = &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: `/x/[a-z]+/(infer|ready)`}}}
	rx.GetRoute().RegexRewrite = &matcherv3.RegexMatchAndSubstitute{
		Pattern: &matcherv3.RegexMatcher{Regex: `^/x/([a-z]+)/(infer|ready)$`}, Substitution: `/v2/models/\1/versions/v8/\2`}
	rx.GetRoute().RequestMirrorPolicies = []*routev3.RouteAction_RequestMirrorPolicy{{Cluster: "mirror",
		RuntimeFraction: &corev3.RuntimeFractionalPercent{DefaultValue: &typev3.FractionalPercent{Numerator: 100}}}}
	f.set([]*clusterv3.Cluster{c, m}, []*endpointv3.ClusterLoadAssignment{e, me}, pre, rx)
	do := func(path string) {
		resp, err := http.Post("http://"+f.addr+path, "application/json", strings.NewReader(`{}`))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	next := func() seen {
		select {
		case s := <-got:
			return s
		case <-time.After(5 * time.Second):
			t.Fatal("no request reached the upstream")
		}
		return seen{}
	}
	do("/v2/models/m/infer?trace=1")
	if s := next(); s.path != "/v2/models/m/versions/v7/infer?trace=1" || s.orig != "/v2/models/m/infer?trace=1" {
		t.Errorf("prefix_rewrite: %+v", s)
	}
	do("/x/ranker/infer?q=1")
	a, b := next(), next()
	if a.host != b.host && strings.Contains(a.host, "-shadow") {
		a, b = b, a
	}
	for _, s := range []seen{a, b} {
		if s.path != "/v2/models/ranker/versions/v8/infer?q=1" || s.orig != "/x/ranker/infer?q=1" {
			t.Errorf("regex_rewrite (primary and mirror): %+v", s)
		}
	}
	// Envoy puts the suffix before the port (shadow_writer_impl.cc, shadowAppendedHost).
	if want := strings.Replace(a.host, ":", "-shadow:", 1); b.host != want || strings.Contains(a.host, "-shadow") {
		t.Errorf("one primary and one shadow: %q %q, want the shadow's host %q", a.host, b.host, want)
	}
}

// TestResponseHeadersRemovedBeforeEcho: a virtual host that removes x-patchbay-experiments
// and echoes it from the request (%REQ()%, skipped when empty, as Envoy skips an empty
// formatted value) lets no upstream copy through; with an exposure the echo wins.
func TestResponseHeadersRemovedBeforeEcho(t *testing.T) {
	hl := listen(t)
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Patchbay-Experiments", "upstream=forged")
		w.Header().Set("X-Other", "kept")
	})}
	go hs.Serve(hl)
	t.Cleanup(func() { hs.Close() })
	f := newXDSFixture(t)
	f.vh = func(vh *routev3.VirtualHost) {
		vh.ResponseHeadersToRemove = []string{"x-patchbay-experiments"}
		vh.ResponseHeadersToAdd = []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: "x-patchbay-experiments", Value: "%REQ(x-patchbay-experiments)%"},
			AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD}}
	}
	c, e := testCluster(t, "up", false, nil, hl.Addr().String())
	f.set([]*clusterv3.Cluster{c}, []*endpointv3.ClusterLoadAssignment{e}, toCluster("all", "up", "/"))
	get := func(exp string) http.Header {
		req, _ := http.NewRequest("GET", "http://"+f.addr+"/x", nil)
		if exp != "" {
			req.Header.Set("x-patchbay-experiments", exp)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.Header
	}
	if h := get(""); h.Values("X-Patchbay-Experiments") != nil || h.Get("X-Other") != "kept" {
		t.Errorf("no exposure: %v, want no x-patchbay-experiments and x-other kept", h)
	}
	if h := get("e=arm"); len(h.Values("X-Patchbay-Experiments")) != 1 || h.Get("X-Patchbay-Experiments") != "e=arm" {
		t.Errorf("exposure: %q, want the echo only", h.Values("X-Patchbay-Experiments"))
	}
}
