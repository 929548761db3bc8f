package translate

import (
	"strconv"
	"strings"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc/codes"

	"github.com/patchbay-io/patchbay/api/headers"
	"github.com/patchbay-io/patchbay/api/oip"
)

func edgeRes(t *testing.T, in *Input) Resources {
	t.Helper()
	res, err := Envoy(in, testOpts, Edge)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// clustersOf lists every cluster a route may send a request to, mirrors included.
func clustersOf(r *routev3.Route) []string {
	a := r.GetRoute()
	var out []string
	if c := a.GetCluster(); c != "" {
		out = append(out, c)
	}
	for _, cw := range a.GetWeightedClusters().GetClusters() {
		out = append(out, cw.GetName())
	}
	for _, m := range a.GetRequestMirrorPolicies() {
		out = append(out, m.GetCluster())
	}
	return out
}

func header(r *routev3.Route, key string) string {
	for _, h := range r.GetResponseHeadersToAdd() {
		if h.GetHeader().GetKey() == key {
			return h.GetHeader().GetValue()
		}
	}
	return ""
}

// TestEachProtocolReachesOnlyItsClusters: a REST request only ever reaches a REST cluster
// (HTTP/1.1, readiness on the version's OIP path) and a gRPC request a gRPC cluster
// (HTTP/2, gRPC health checked on the version's own service name): split, version routes,
// pins and mirrors alike; a protocol a model does not serve is an OIP error from Envoy.
func TestEachProtocolReachesOnlyItsClusters(t *testing.T) {
	in := loadInput(t, "testdata/both.yaml")
	res, err := Envoy(in, testOpts, Edge)
	if err != nil {
		t.Fatal(err)
	}
	clusters := map[string]*clusterv3.Cluster{}
	for _, c := range res[resource.ClusterType] {
		clusters[c.(*clusterv3.Cluster).GetName()] = c.(*clusterv3.Cluster)
	}
	grpcCluster := func(name string) bool {
		c := clusters[name]
		if c == nil {
			t.Fatalf("no cluster %s", name)
		}
		opts := &upstreamhttpv3.HttpProtocolOptions{}
		if err := c.GetTypedExtensionProtocolOptions()["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].UnmarshalTo(opts); err != nil {
			t.Fatal(err)
		}
		h2 := opts.GetExplicitHttpConfig().GetHttp2ProtocolOptions() != nil
		hc := c.GetHealthChecks()[0]
		if h2 != (hc.GetGrpcHealthCheck() != nil) {
			t.Fatalf("cluster %s: HTTP/2 %v but health check %v", name, h2, hc)
		}
		return h2
	}
	for _, tc := range []struct {
		method, path string
		hdr          map[string][]string
		grpc         bool // the caller's protocol
		want         string
	}{
		{"POST", "/v2/models/ranker/infer", nil, false, "ranker_v1 ranker_v1.2"},
		{"GET", "/v2/models/ranker", nil, false, "ranker_v1 ranker_v1.2"},
		{"GET", "/v2/models/ranker/ready", map[string][]string{headers.Version: {"v1.2"}}, false, "ranker_v1.2"},
		{"POST", "/v2/models/ranker/versions/v1/infer", nil, false, "ranker_v1"},
		{"GET", "/v2/health/ready", model("ranker"), false, "ranker_v1 ranker_v1.2"},
		{"POST", oipPrefix + "ModelInfer", model("ranker"), true, "ranker_v1_grpc ranker_v1.2_grpc"},
		{"POST", oipPrefix + "ModelInfer", map[string][]string{headers.Model: {"ranker"}, headers.Version: {"v0"}}, true, "ranker_v0_grpc"},
		{"POST", oipPrefix + "ModelReady", map[string][]string{headers.Model: {"ranker"}, headers.Version: {"v1.2"}}, true, "ranker_v1.2_grpc"},
		{"POST", "/v2/models/recs/infer", nil, false, "recs_v1"},
	} {
		r := envoyRoute(t, edgeRes(t, in), tc.method, tc.path, tc.hdr)
		if r.GetRoute() == nil {
			t.Errorf("%s %s %v: %s, want a cluster", tc.method, tc.path, tc.hdr, outcome(t, r))
			continue
		}
		got := clustersOf(r)
		for _, c := range got {
			if grpcCluster(c) != tc.grpc {
				t.Errorf("%s %s %v: route %s sends to %s, a cluster of the other protocol", tc.method, tc.path, tc.hdr, r.GetName(), c)
			}
		}
		if first := strings.Join(got[:len(strings.Fields(tc.want))], " "); first != tc.want {
			t.Errorf("%s %s %v: route %s to %v, want %s", tc.method, tc.path, tc.hdr, r.GetName(), got, tc.want)
		}
	}
	for name, c := range clusters {
		if hc := c.GetHealthChecks()[0].GetGrpcHealthCheck(); hc != nil {
			model, version, _ := strings.Cut(strings.TrimSuffix(name, "_grpc"), "_")
			if hc.GetServiceName() != oip.HealthService(model, version) {
				t.Errorf("cluster %s checks service %q, want %q", name, hc.GetServiceName(), oip.HealthService(model, version))
			}
		}
	}
	// Protocols a model does not serve, and unknown models: Envoy's own OIP errors.
	for _, tc := range []struct {
		path string
		hdr  map[string][]string
		code codes.Code // gRPC status; 0 for a REST call
		msg  string
	}{
		{oipPrefix + "ModelInfer", model("recs"), codes.Unimplemented, "model recs is not served over OIP gRPC"},
		{oipPrefix + "ModelInfer", nil, codes.NotFound, "unknown model"},
		{oipPrefix + "RepositoryIndex", model("ranker"), codes.PermissionDenied, "repository"},
		{oipPrefix + "ModelStreamInfer", model("ranker"), codes.Unimplemented, "method not served"},
		{"/v2/models/ranker/versions/v0/infer", nil, 0, "version v0 of model ranker is not served over OIP REST"},
		{"/v2/models/ranker/versions/v0", nil, 0, "version v0 of model ranker is not served over OIP REST"},
	} {
		r := envoyRoute(t, edgeRes(t, in), "POST", tc.path, tc.hdr)
		d := r.GetDirectResponse()
		if d == nil || d.GetStatus() != 404 && d.GetStatus() != 403 || !strings.Contains(d.GetBody().GetInlineString(), tc.msg) {
			t.Errorf("%s %v: %s %v, want a direct OIP error naming %q", tc.path, tc.hdr, outcome(t, r), d, tc.msg)
			continue
		}
		if tc.code == 0 {
			if header(r, "grpc-status") != "" || header(r, "content-type") != "application/json" {
				t.Errorf("%s: REST error with headers %v", tc.path, r.GetResponseHeadersToAdd())
			}
		} else if header(r, "grpc-status") != strconv.Itoa(int(tc.code)) {
			t.Errorf("%s %v: grpc-status %q, want %d (%v)", tc.path, tc.hdr, header(r, "grpc-status"), tc.code, tc.code)
		}
	}
	// A gRPC-only model answers REST with a 404 naming the protocol.
	churn := edgeRes(t, loadInput(t, "testdata/split.yaml"))
	r := envoyRoute(t, churn, "POST", "/v2/models/churn/infer", nil)
	if d := r.GetDirectResponse(); d == nil || d.GetStatus() != 404 || !strings.Contains(d.GetBody().GetInlineString(), "not served over OIP REST") {
		t.Errorf("REST call to a gRPC-only model: %s %v", outcome(t, r), d)
	}
}

// TestVersionedPathsAndMirrors: a REST request routed to a named version of host kind oip
// (an unmodified OIP server) reaches it on that version's OIP path (prefix_rewrite on the
// version routes; pinned paths already are) and, since Envoy copies the shadow from the
// rewritten headers, those routes carry no REST mirror; a version of host kind patchbay
// (the default) keeps the unversioned path and its mirrors on every version route, as
// before versioned paths, so experiment arms on patchbay hosts are still shadowed. The
// split, the server-level calls and gRPC routes keep their mirrors whatever the host.
func TestVersionedPathsAndMirrors(t *testing.T) {
	routes := edgeRes(t, loadInput(t, "testdata/hosts.yaml"))
	for _, tc := range []struct {
		version string
		oip     bool
	}{{"v1", false}, {"v2", true}, {"v3", false}} {
		for _, k := range restKinds {
			path := "/v2/models/ranker" + k.suffix
			r := envoyRoute(t, routes, k.method, path, map[string][]string{headers.Version: {tc.version}})
			a := r.GetRoute()
			if a == nil || a.GetCluster() != ClusterName("ranker", tc.version) {
				t.Fatalf("%s %s as %s: route %s %v", k.method, path, tc.version, r.GetName(), a)
			}
			versioned := "/v2/models/ranker/versions/" + tc.version + k.suffix
			wantMirror := ""
			if tc.version != "v3" {
				wantMirror = "ranker_v3"
			}
			if tc.oip {
				if a.GetPrefixRewrite() != versioned || len(a.GetRequestMirrorPolicies()) != 0 {
					t.Errorf("%s %s as oip-host %s: rewrite %q mirrors %v, want %s and no mirror", k.method, path, tc.version, a.GetPrefixRewrite(), a.GetRequestMirrorPolicies(), versioned)
				}
			} else {
				m := a.GetRequestMirrorPolicies()
				if a.GetPrefixRewrite() != "" || (wantMirror == "") != (len(m) == 0) || len(m) > 0 && m[0].GetCluster() != wantMirror {
					t.Errorf("%s %s as patchbay-host %s: rewrite %q mirrors %v, want no rewrite and mirror %q", k.method, path, tc.version, a.GetPrefixRewrite(), m, wantMirror)
				}
			}
			pin := envoyRoute(t, routes, k.method, versioned, nil)
			if a := pin.GetRoute(); a == nil || a.GetPrefixRewrite() != "" || a.GetCluster() != ClusterName("ranker", tc.version) || len(a.GetRequestMirrorPolicies()) != 0 {
				t.Errorf("pinned %s %s: route %s %v", k.method, versioned, pin.GetName(), pin.GetRoute())
			}
		}
		// Server-level calls and gRPC never rewrite, and keep their mirrors.
		for _, tc2 := range []struct{ method, path, mirror string }{
			{"GET", "/v2/health/ready", "ranker_v3"},
			{"POST", oipPrefix + "ModelInfer", "ranker_v3_grpc"},
		} {
			r := envoyRoute(t, routes, tc2.method, tc2.path, map[string][]string{headers.Model: {"ranker"}, headers.Version: {tc.version}})
			m := r.GetRoute().GetRequestMirrorPolicies()
			if r.GetRoute().GetPrefixRewrite() != "" || tc.version != "v3" && (len(m) != 1 || m[0].GetCluster() != tc2.mirror) {
				t.Errorf("%s as %s: route %s %v, want no rewrite and mirror %s", tc2.path, tc.version, r.GetName(), r.GetRoute(), tc2.mirror)
			}
		}
	}
	split := envoyRoute(t, routes, "POST", "/v2/models/ranker/infer", nil)
	if a := split.GetRoute(); a.GetPrefixRewrite() != "" || len(a.GetRequestMirrorPolicies()) != 1 || a.GetRequestMirrorPolicies()[0].GetCluster() != "ranker_v3" {
		t.Errorf("REST split: %v, want no rewrite and the REST mirror of v3", a)
	}
}

// TestStatTagKeepsTheWholeVersion applies Envoy's default cluster_name tag extraction to
// the stat prefix Envoy builds for each cluster ("cluster.<alt_stat_name or name>.", envoy
// source/common/upstream/upstream_impl.cc; the tag is the first dot-separated token after
// "cluster.", source/common/config/well_known_names.cc addTokenized(CLUSTER_NAME,
// "cluster.$.**")): every cluster keeps a tag of its own.
func TestStatTagKeepsTheWholeVersion(t *testing.T) {
	res, err := Envoy(loadInput(t, "testdata/both.yaml"), testOpts, Edge)
	if err != nil {
		t.Fatal(err)
	}
	tags := map[string]string{}
	for _, r := range res[resource.ClusterType] {
		c := r.(*clusterv3.Cluster)
		stat := c.GetAltStatName()
		if stat == "" {
			stat = c.GetName()
		}
		prefix := "cluster." + stat + ".upstream_rq_total"
		tag := strings.Split(strings.TrimPrefix(prefix, "cluster."), ".")[0]
		if other, ok := tags[tag]; ok {
			t.Errorf("clusters %s and %s share the stat tag %q", other, c.GetName(), tag)
		}
		tags[tag] = c.GetName()
		if tag != StatName(c.GetName()) {
			t.Errorf("cluster %s: stat tag %q, want %q", c.GetName(), tag, StatName(c.GetName()))
		}
	}
	if tags["ranker_v1__2"] != "ranker_v1.2" {
		t.Errorf("tags %v: want ranker_v1__2 for ranker_v1.2", tags)
	}
}

// TestEnvoyBehaviourOfHeadersAndExtproc: the echoed x-patchbay-experiments first removes
// any upstream copy (Envoy skips an add that formats empty), and the ext_proc stream is
// bounded by message_timeout, not by grpc_service.timeout, which Envoy does not apply to
// ext_proc streams.
func TestEnvoyBehaviourOfHeadersAndExtproc(t *testing.T) {
	res, err := Envoy(loadInput(t, "testdata/both.yaml"), testOpts, Edge)
	if err != nil {
		t.Fatal(err)
	}
	vh := res[resource.RouteType][1].(*routev3.RouteConfiguration).GetVirtualHosts()[0]
	if rm := vh.GetResponseHeadersToRemove(); len(rm) != 1 || rm[0] != headers.Experiments {
		t.Errorf("virtual host removes %v, want the upstream's %s", rm, headers.Experiments)
	}
	hcm := &hcmv3.HttpConnectionManager{}
	l := res[resource.ListenerType][0].(*listenerv3.Listener)
	if err := l.GetFilterChains()[0].GetFilters()[0].GetTypedConfig().UnmarshalTo(hcm); err != nil {
		t.Fatal(err)
	}
	ep := &extprocv3.ExternalProcessor{}
	if err := hcm.GetHttpFilters()[0].GetTypedConfig().UnmarshalTo(ep); err != nil {
		t.Fatal(err)
	}
	if ep.GetGrpcService().GetTimeout() != nil || ep.GetMessageTimeout().AsDuration() != DefaultTimeout {
		t.Errorf("ext_proc grpc_service.timeout %v, message_timeout %v: want none and %v", ep.GetGrpcService().GetTimeout(), ep.GetMessageTimeout(), DefaultTimeout)
	}
}

// TestProxylessUsesTheGRPCClusters: grpc-go's flavour routes to the versions' gRPC
// clusters only, and a model without gRPC endpoints has no listener.
func TestProxylessUsesTheGRPCClusters(t *testing.T) {
	res := GRPC(loadInput(t, "testdata/both.yaml"))
	if ls := res[resource.ListenerType]; len(ls) != 1 || ls[0].(*listenerv3.Listener).GetName() != "ranker" {
		t.Fatalf("listeners %v, want ranker only (recs serves no gRPC)", ls)
	}
	var names []string
	for _, c := range res[resource.ClusterType] {
		names = append(names, c.(*clusterv3.Cluster).GetName())
	}
	if strings.Join(names, " ") != "ranker_v1_grpc ranker_v1.2_grpc ranker_v0_grpc" {
		t.Fatalf("proxyless clusters %v", names)
	}
}
