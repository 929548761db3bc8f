package translate

import (
	"regexp"
	"strconv"
	"strings"
	"testing"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	faultv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc/codes"
)

// firstRoute picks a route as Envoy's router does for the match kinds the translation
// emits: routes in order, first match wins; a header present more than once is matched
// on its values joined with ',' (envoy source/common/http/header_utility.cc,
// HeaderUtility::getAllOfHeaderAsString). Pseudo-header :method is a header like any other.
func firstRoute(t *testing.T, routes []*routev3.Route, method, path string, hdr map[string][]string) *routev3.Route {
	t.Helper()
	for _, r := range routes {
		m := r.GetMatch()
		var ok bool
		switch {
		case m.GetPath() != "":
			ok = path == m.GetPath()
		case m.GetSafeRegex() != nil:
			ok = regexp.MustCompile(m.GetSafeRegex().GetRegex()).MatchString(path)
		case m.GetPathSeparatedPrefix() != "":
			p := m.GetPathSeparatedPrefix()
			ok = path == p || strings.HasPrefix(path, p+"/")
		case m.GetPrefix() != "":
			ok = strings.HasPrefix(path, m.GetPrefix())
		default:
			t.Fatalf("route %s: match kind not handled by this test: %v", r.GetName(), m)
		}
		for _, hm := range m.GetHeaders() {
			vs := hdr[hm.GetName()]
			if hm.GetName() == ":method" {
				vs = []string{method}
			}
			if hm.GetStringMatch().GetExact() == "" {
				t.Fatalf("route %s: header matcher not handled by this test: %v", r.GetName(), hm)
			}
			if len(vs) == 0 || strings.Join(vs, ",") != hm.GetStringMatch().GetExact() {
				ok = false
			}
		}
		if ok {
			return r
		}
	}
	return nil
}

// outcome names where a request goes: "cluster" for any model cluster, "direct <status>"
// for an answer from Envoy itself, "abort <code>" for a proxyless fault abort.
func outcome(t *testing.T, r *routev3.Route) string {
	t.Helper()
	switch {
	case r == nil:
		return "NR 404" // no scope (or no route): Envoy's 404 with the local_reply_config body
	case r.GetDirectResponse() != nil:
		return "direct " + strconv.Itoa(int(r.GetDirectResponse().GetStatus()))
	case r.GetTypedPerFilterConfig()[faultFilter] != nil:
		f := &faultv3.HTTPFault{}
		if err := r.GetTypedPerFilterConfig()[faultFilter].UnmarshalTo(f); err != nil {
			t.Fatal(err)
		}
		if f.GetAbort().GetPercentage().GetNumerator() != 100 || f.GetAbort().GetPercentage().GetDenominator() != 0 {
			t.Fatalf("route %s aborts only part of its RPCs: %v", r.GetName(), f)
		}
		return "abort " + codes.Code(f.GetAbort().GetGrpcStatus()).String()
	case r.GetRoute() != nil:
		return "cluster"
	}
	t.Fatalf("route %s: unknown action", r.GetName())
	return ""
}

type surfaceCase struct {
	method, path string
	hdr          map[string][]string
	want         string
}

func model(m string) map[string][]string { return map[string][]string{"x-patchbay-model": {m}} }

const oipPrefix = "/inference.GRPCInferenceService/"

// TestOnlyInferenceReachesClusters: through Envoy (edge and sidecar share the table) only
// the OIP inference surface reaches a model cluster; the repository extension, other
// methods, verbs and paths are answered by Envoy itself: a direct response of the scoped
// route table, or, when the request's scope key selects no table (an unknown model, a
// path outside the surface), Envoy's 404 NR, whose body the HCM's local_reply_config makes
// an OIP error (TestNoScopeReply).
func TestOnlyInferenceReachesClusters(t *testing.T) {
	for _, tc := range []struct {
		file  string
		cases []surfaceCase
	}{
		{"testdata/split.yaml", []surfaceCase{ // ranker: REST; churn: gRPC
			{"POST", "/v2/models/ranker/infer", nil, "cluster"},
			{"GET", "/v2/models/ranker", nil, "cluster"},
			{"GET", "/v2/models/ranker/ready", nil, "cluster"},
			{"GET", "/v2/health/live", model("ranker"), "cluster"},
			{"GET", "/v2/health/ready", model("ranker"), "cluster"},
			{"GET", "/v2", model("ranker"), "cluster"},
			{"POST", "/v2/models/ranker/infer", map[string][]string{"x-patchbay-version": {"v8"}}, "cluster"},
			{"GET", "/v2/health/ready", nil, "NR 404"},
			{"GET", "/v2", nil, "direct 404"},
			{"GET", "/v2/health/ready", model("nosuch"), "NR 404"},
			{"POST", "/v2/repository/models/ranker/unload", nil, "NR 404"},
			{"POST", "/v2/repository/models/ranker/load", model("ranker"), "NR 404"},
			{"POST", "/v2/repository/index", nil, "NR 404"},
			{"GET", "/v2/models/ranker/infer", nil, "direct 404"},
			{"PUT", "/v2/models/ranker/infer", nil, "direct 404"},
			{"POST", "/v2/models/ranker/ready", nil, "direct 404"},
			{"DELETE", "/v2/models/ranker", nil, "direct 404"},
			{"POST", "/v2/models/ranker/explain", nil, "NR 404"},
			{"POST", "/v2/models/ranker/infer/x", nil, "direct 404"},
			{"POST", "/v2/models/ranker/versions/v7/infer", nil, "direct 403"},
			{"POST", "/v2/models/rankerx/infer", nil, "NR 404"},
			{"GET", "/metrics", nil, "direct 404"},
			{"POST", oipPrefix + "ModelInfer", model("ranker"), "direct 404"}, // REST-only model
			{"POST", "/v2/models/churn/infer", nil, "direct 404"},             // gRPC-only model
			{"GET", "/v2/health/ready", model("churn"), "direct 404"},
			{"POST", oipPrefix + "ModelInfer", model("churn"), "cluster"},
			{"POST", oipPrefix + "ModelMetadata", model("churn"), "cluster"},
			{"POST", oipPrefix + "ModelReady", model("churn"), "cluster"},
			{"POST", oipPrefix + "ServerLive", model("churn"), "cluster"},
			{"POST", oipPrefix + "ServerReady", model("churn"), "cluster"},
			{"POST", oipPrefix + "ServerMetadata", model("churn"), "cluster"},
			{"POST", oipPrefix + "ModelInfer", map[string][]string{"x-patchbay-model": {"churn"}, "x-patchbay-version": {"v1"}}, "cluster"},
			{"POST", oipPrefix + "RepositoryModelUnload", model("churn"), "direct 403"},
			{"POST", oipPrefix + "RepositoryModelLoad", model("churn"), "direct 403"},
			{"POST", oipPrefix + "RepositoryIndex", nil, "direct 403"},
			{"POST", oipPrefix + "ModelStreamInfer", model("churn"), "direct 404"},
			{"POST", oipPrefix + "ModelInferX", model("churn"), "direct 404"},
			{"POST", oipPrefix + "ModelInfer", nil, "direct 404"},
			{"POST", oipPrefix + "ModelInfer", map[string][]string{"x-patchbay-model": {"churn", "churn"}}, "direct 404"},
			{"POST", "/grpc.health.v1.Health/Check", model("churn"), "direct 404"},
		}},
		{"testdata/pinning-rest.yaml", []surfaceCase{
			{"POST", "/v2/models/scorer/versions/v1/infer", nil, "cluster"},
			{"GET", "/v2/models/scorer/versions/v2", nil, "cluster"},
			{"GET", "/v2/models/scorer/versions/v2/ready", nil, "cluster"},
			{"POST", "/v2/models/scorer/versions/v3/infer", nil, "direct 404"},
			{"DELETE", "/v2/models/scorer/versions/v1", nil, "direct 404"},
			{"POST", "/v2/models/scorer/versions/v1/ready", nil, "direct 404"},
			{"POST", "/v2/repository/models/scorer/unload", nil, "NR 404"},
		}},
	} {
		in := loadInput(t, tc.file)
		for _, role := range []Role{Edge, Sidecar} {
			res, err := Envoy(in, testOpts, role)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range tc.cases {
				r := envoyRoute(t, res, c.method, c.path, c.hdr)
				if got := outcome(t, r); got != c.want {
					t.Errorf("%s role %d: %s %s %v: %s (route %s), want %s", tc.file, role, c.method, c.path, c.hdr, got, r.GetName(), c.want)
				}
				if r.GetDirectResponse() != nil {
					body := r.GetDirectResponse().GetBody().GetInlineString()
					if !strings.HasPrefix(body, `{"error":"`) || !hasJSONContentType(r) {
						t.Errorf("%s %s: direct response %q is not an OIP error", c.method, c.path, body)
					}
				}
			}
		}
	}
}

func hasJSONContentType(r *routev3.Route) bool {
	for _, h := range r.GetResponseHeadersToAdd() {
		if h.GetHeader().GetKey() == "content-type" && h.GetHeader().GetValue() == "application/json" {
			return true
		}
	}
	return false
}

// TestProxylessOnlyInference: a proxyless client's route table sends only the six OIP
// inference methods to a cluster; the repository extension is refused at the client with
// PERMISSION_DENIED and everything else with UNIMPLEMENTED.
func TestProxylessOnlyInference(t *testing.T) {
	in := loadInput(t, "testdata/pinning.yaml")
	l := GRPC(in)[resource.ListenerType][0].(*listenerv3.Listener)
	hcm := &hcmv3.HttpConnectionManager{}
	if err := l.GetApiListener().GetApiListener().UnmarshalTo(hcm); err != nil {
		t.Fatal(err)
	}
	routes := hcm.GetRouteConfig().GetVirtualHosts()[0].GetRoutes()
	for _, c := range []surfaceCase{
		{"POST", oipPrefix + "ModelInfer", nil, "cluster"},
		{"POST", oipPrefix + "ModelMetadata", nil, "cluster"},
		{"POST", oipPrefix + "ModelReady", nil, "cluster"},
		{"POST", oipPrefix + "ServerLive", nil, "cluster"},
		{"POST", oipPrefix + "ServerReady", nil, "cluster"},
		{"POST", oipPrefix + "ServerMetadata", nil, "cluster"},
		{"POST", oipPrefix + "ModelInfer", map[string][]string{"x-patchbay-version": {"v2"}}, "cluster"},
		{"POST", oipPrefix + "RepositoryModelUnload", nil, "abort PermissionDenied"},
		{"POST", oipPrefix + "RepositoryModelLoad", map[string][]string{"x-patchbay-version": {"v2"}}, "abort PermissionDenied"},
		{"POST", oipPrefix + "RepositoryIndex", nil, "abort PermissionDenied"},
		{"POST", oipPrefix + "ModelStreamInfer", nil, "abort Unimplemented"},
		{"POST", "/grpc.health.v1.Health/Check", nil, "abort Unimplemented"},
	} {
		r := firstRoute(t, routes, c.method, c.path, c.hdr)
		if got := outcome(t, r); got != c.want {
			t.Errorf("%s %v: %s (route %s), want %s", c.path, c.hdr, got, r.GetName(), c.want)
		}
	}
}
