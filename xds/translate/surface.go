package translate

import (
	"regexp"
	"strings"

	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"

	"github.com/patchbay-io/patchbay/api/headers"
)

// The data path carries the OIP inference surface and nothing else (issue 9): every route
// to a model cluster matches one of the calls below exactly (path and method); the model
// repository extension, unknown methods and other verbs are answered by Envoy itself (a
// direct_response) and never reach a model host.

// GRPCMethods are the OIP gRPC methods routed to model hosts.
var GRPCMethods = []string{"ModelInfer", "ModelMetadata", "ModelReady", "ServerLive", "ServerReady", "ServerMetadata"}

const (
	// grpcRepositoryPrefix covers RepositoryModelLoad, RepositoryModelUnload and
	// RepositoryIndex (and any later Repository* method).
	grpcRepositoryPrefix = grpcOIPPrefix + "Repository"
	restRepositoryPrefix = "/v2/repository"
	// msgRepository is the answer to any repository call on the data path.
	msgRepository = "the model repository extension (load, unload, index) is not reachable through patchbay's data path; use the model host's admin listener"
)

// grpcSurfaceRegex matches exactly the routed gRPC methods. Envoy's safe_regex and grpc-go
// both match the whole path; the anchors make that explicit.
var grpcSurfaceRegex = "^" + regexp.QuoteMeta(grpcOIPPrefix) + "(" + strings.Join(GRPCMethods, "|") + ")$"

// serverSurfaceRegex matches the server-level REST calls (no model in the path): GET /v2,
// /v2/health/live and /v2/health/ready. They are routed by x-patchbay-model.
const serverSurfaceRegex = `^/v2(/health/(live|ready))?$`

// restServerMatch is the server-level GETs of one model, chosen by x-patchbay-model.
func restServerMatch(model string) *routev3.RouteMatch {
	return &routev3.RouteMatch{
		PathSpecifier: &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: serverSurfaceRegex}},
		Headers:       []*routev3.HeaderMatcher{exactHeader(":method", "GET"), exactHeader(headers.Model, model)},
	}
}

// grpcSurfaceMatch is the routed gRPC methods; with a model it also needs x-patchbay-model
// (Envoy), without one it is the proxyless listener's own model.
func grpcSurfaceMatch(model string) *routev3.RouteMatch {
	m := &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: grpcSurfaceRegex}}}
	if model != "" {
		m.Headers = []*routev3.HeaderMatcher{exactHeader(headers.Model, model)}
	}
	return m
}

func prefixMatch(p string) *routev3.RouteMatch {
	return &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: p}}
}

// Scoped routes: one route table per model, chosen by a scope key Envoy computes from the
// request before any filter runs, without Lua or ext_proc (so routing still works, and
// fails open, when ext_proc is down).
//
// The early header mutation sets RouteKeyHeader to RouteKeyFormat: the path, then
// x-patchbay-model twice, each followed by "/". Envoy formats a missing header as ""
// (source/common/http/header_mutation.cc, AppendMutation is a Router::HeadersToAddEntry,
// whose formatter omits empty values: source/common/router/header_parser.cc). The scope
// key has two fragments, the elements at index 3 and 4 of that value split by "/"
// (source/common/router/scoped_config_impl.cc, HeaderValueExtractorImpl::computeFragment:
// absl::StrSplit, then elements[index]; an index past the end, or a missing header, is a
// null fragment, and a key with a null fragment selects no scope). Split values:
//
//	REST /v2/models/M[/infer|/ready|/versions/V/...]   "", v2, models, M, [infer|ready|versions|H]  (M, ""|infer|ready|versions|H)
//	gRPC /inference.GRPCInferenceService/Method + H    "", inference..., Method, H, H               (H, H)
//	REST GET /v2 + H                                   "", v2, H, H, ""                             (H, "")
//	REST GET /v2/health/live|ready + H                 "", v2, health, live|ready, H                (live|ready, H)
//	anything with fewer than 3 segments and no H       (e.g. gRPC without H: "", svc, Method, "", "")  ("", "")
//
// (H twice, not once as first planned: with one H, GET /v2 + H gives "", v2, H, "" and a
// null second fragment.) ModelScopes lists the keys that select model M's table; ("", "")
// selects the fallback table; any other key (an unknown model, another path) selects no
// scope and Envoy answers 404 NR, which the HCM's local_reply_config turns into an OIP
// error (noScopeReply).
//
// Limits, by construction: a REST metadata call (GET /v2/models/M) carrying
// x-patchbay-model naming another model, a path with a query string on its 4th or 5th
// segment, and a model named infer, ready, versions or live asked for by the server-level
// health calls, find no scope (404) instead of their model's table.
const RouteKeyFormat = "%REQ(:path)%/%REQ(" + headers.Model + ")%/%REQ(" + headers.Model + ")%/"

// Scope shapes (ScopeName's last element).
const (
	ShapeBase        = "base"
	ShapeInfer       = "infer"
	ShapeReady       = "ready"
	ShapeVersions    = "versions"
	ShapeNamed       = "named"
	ShapeHealthLive  = "health-live"
	ShapeHealthReady = "health-ready"
)

// ScopeKey is one scope of a model: its shape and its two key fragments.
type ScopeKey struct {
	Shape string
	Key   [2]string
}

// ModelScopes are the scope keys that select model m's route table: (m, ""), (m, infer),
// (m, ready), (m, versions), (m, m), (live, m) and (ready, m). Envoy rejects an SRDS update
// holding two scopes of one key, so the named scope is left out for m in {infer, ready,
// versions} (it is then one of m's own keys), and both health scopes for m in {infer,
// ready, versions, live} (they would be a key of model live or ready).
func ModelScopes(m string) []ScopeKey {
	out := []ScopeKey{
		{ShapeBase, [2]string{m, ""}},
		{ShapeInfer, [2]string{m, "infer"}},
		{ShapeReady, [2]string{m, "ready"}},
		{ShapeVersions, [2]string{m, "versions"}},
	}
	switch m {
	case "infer", "ready", "versions":
		return out
	}
	out = append(out, ScopeKey{ShapeNamed, [2]string{m, m}})
	if m == "live" {
		return out
	}
	return append(out,
		ScopeKey{ShapeHealthLive, [2]string{"live", m}},
		ScopeKey{ShapeHealthReady, [2]string{"ready", m}})
}

// scopedRoutes is the HCM's route specifier: scopes over SRDS (ADS), their route tables
// over RDS (ADS), the key read from RouteKeyHeader.
func scopedRoutes() *hcmv3.ScopedRoutes {
	fragment := func(i uint32) *hcmv3.ScopedRoutes_ScopeKeyBuilder_FragmentBuilder {
		return &hcmv3.ScopedRoutes_ScopeKeyBuilder_FragmentBuilder{Type: &hcmv3.ScopedRoutes_ScopeKeyBuilder_FragmentBuilder_HeaderValueExtractor_{
			HeaderValueExtractor: &hcmv3.ScopedRoutes_ScopeKeyBuilder_FragmentBuilder_HeaderValueExtractor{
				Name:             RouteKeyHeader,
				ElementSeparator: "/",
				ExtractType:      &hcmv3.ScopedRoutes_ScopeKeyBuilder_FragmentBuilder_HeaderValueExtractor_Index{Index: i},
			},
		}}
	}
	return &hcmv3.ScopedRoutes{
		Name:            ScopedRoutesName,
		ScopeKeyBuilder: &hcmv3.ScopedRoutes_ScopeKeyBuilder{Fragments: []*hcmv3.ScopedRoutes_ScopeKeyBuilder_FragmentBuilder{fragment(3), fragment(4)}},
		RdsConfigSource: adsSource(),
		ConfigSpecifier: &hcmv3.ScopedRoutes_ScopedRds{ScopedRds: &hcmv3.ScopedRds{ScopedRdsConfigSource: adsSource()}},
	}
}

// scope is one ScopedRouteConfiguration: key (a, b) selects the route table routeName.
func scope(name, routeName, a, b string) *routev3.ScopedRouteConfiguration {
	frag := func(s string) *routev3.ScopedRouteConfiguration_Key_Fragment {
		return &routev3.ScopedRouteConfiguration_Key_Fragment{Type: &routev3.ScopedRouteConfiguration_Key_Fragment_StringKey{StringKey: s}}
	}
	return &routev3.ScopedRouteConfiguration{
		Name:                   name,
		RouteConfigurationName: routeName,
		Key:                    &routev3.ScopedRouteConfiguration_Key{Fragments: []*routev3.ScopedRouteConfiguration_Key_Fragment{frag(a), frag(b)}},
	}
}

// msgNoScope is the answer when no scope matches (an unknown model, a path outside the
// OIP surface): Envoy's router finds no route and sends a 404 local reply flagged NR
// (source/common/router/router.cc, Filter::decodeHeaders: no route -> NoRouteFound, 404).
// It names the refusals a scope-less request may be: an unknown model, a server-level or
// gRPC call without a known x-patchbay-model, another path, the repository extension.
const msgNoScope = "not found: patchbay's data path carries only the OIP inference surface of known models (server-level and gRPC calls need " + headers.Model + " naming one); " + msgRepository

// noScopeReply maps Envoy's NR local reply to an OIP error JSON body. For a gRPC request
// Envoy applies this mapping first and then answers trailers-only, :status 200, grpc-status
// from its HTTP map (404 -> UNIMPLEMENTED) and the body as grpc-message
// (source/common/http/utility.cc, Utility::prepareLocalReply: encode_functions.rewrite_
// before the is_grpc_ conversion; source/common/grpc/status.cc, httpToGrpcStatus).
func noScopeReply() *hcmv3.LocalReplyConfig {
	return &hcmv3.LocalReplyConfig{Mappers: []*hcmv3.ResponseMapper{{
		Filter: &accesslogv3.AccessLogFilter{FilterSpecifier: &accesslogv3.AccessLogFilter_ResponseFlagFilter{
			ResponseFlagFilter: &accesslogv3.ResponseFlagFilter{Flags: []string{"NR"}}}},
		BodyFormatOverride: &corev3.SubstitutionFormatString{
			Format: &corev3.SubstitutionFormatString_TextFormatSource{TextFormatSource: &corev3.DataSource{
				Specifier: &corev3.DataSource_InlineString{InlineString: errorJSON(msgNoScope)}}},
			ContentType: "application/json",
		},
	}}}
}
