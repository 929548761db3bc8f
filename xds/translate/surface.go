package translate

import (
	"regexp"
	"strings"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
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
