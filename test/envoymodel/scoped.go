package envoymodel

import (
	"net/http"
	"regexp"
	"slices"
	"strings"

	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
)

// Scoped routes (the HCM's scoped_routes over SRDS) as Envoy runs them.

// hasRoutes reports whether the routes the HCM needs have arrived: its rds table, or (scoped
// routes) the scopes and at least one table. A scope whose table has not arrived yet
// selects no routes (routeTable): Envoy answers with its NullConfigImpl, a 404 NR
// (source/common/http/conn_manager_impl.cc, snapScopedRouteConfig: "if a RDS subscription
// hasn't got a RouteConfiguration back, a Router::NullConfigImpl is returned").
func (s *state) hasRoutes() bool {
	if s.hcm.GetScopedRoutes() == nil {
		return s.routes != nil
	}
	return len(s.scopes) > 0 && len(s.tables) > 0
}

// scopeTables lists, sorted, the route tables the scopes name: the RDS subscription.
func scopeTables(s *state) []string {
	var out []string
	for _, sc := range s.scopes {
		if n := sc.GetRouteConfigurationName(); !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out
}

// routeTable is the route table of a request: the rds one, or the table of the scope
// whose key equals the key built from the request headers (nil: no scope). It is computed
// from the headers as they are when the router runs: Envoy snaps the scope in
// decodeHeaders and snaps it again whenever a filter clears the route cache (ext_proc
// does when it mutates headers): source/common/http/conn_manager_impl.cc,
// ActiveStream::refreshCachedRoute -> snapScopedRouteConfig ("re-select scope as well in
// case the scope key header has been changed by a filter").
func (s *state) routeTable(h http.Header) *routev3.RouteConfiguration {
	sr := s.hcm.GetScopedRoutes()
	if sr == nil {
		return s.routes
	}
	key, ok := scopeKey(sr.GetScopeKeyBuilder(), h)
	if !ok {
		return nil
	}
	for _, sc := range s.scopes {
		var k []string
		for _, f := range sc.GetKey().GetFragments() {
			k = append(k, f.GetStringKey())
		}
		if slices.Equal(k, key) {
			return s.tables[sc.GetRouteConfigurationName()]
		}
	}
	return nil
}

// scopeKey is Envoy's ScopeKeyBuilderImpl::computeScopeKey with header_value_extractor
// fragments (source/common/router/scoped_config_impl.cc): per fragment, the header's first
// value split by element_separator (whole when it is empty), the element at index; a
// missing header or an index past the end is a null fragment and the request has no key.
// Element extraction (element{key, separator}) is not modelled: ok is false.
func scopeKey(b *hcmv3.ScopedRoutes_ScopeKeyBuilder, h http.Header) (key []string, ok bool) {
	for _, f := range b.GetFragments() {
		x := f.GetHeaderValueExtractor()
		if x == nil || x.GetElement() != nil {
			return nil, false
		}
		vs := h.Values(x.GetName())
		if len(vs) == 0 {
			return nil, false
		}
		els := []string{vs[0]}
		if sep := x.GetElementSeparator(); sep != "" {
			els = strings.Split(vs[0], sep)
		}
		if int(x.GetIndex()) >= len(els) {
			return nil, false
		}
		key = append(key, els[x.GetIndex()])
	}
	return key, true
}

// noRoute is the router's 404 when no route (or no scope) matches: an empty body flagged NR
// (source/common/router/router.cc, Filter::decodeHeaders), passed through the HCM's
// local_reply_config first (source/common/http/utility.cc, Utility::prepareLocalReply:
// the rewrite runs before a gRPC request's trailers-only conversion). Only mappers whose
// filter is a response_flag_filter and whose body_format_override is a text format
// without command operators are modelled; any other mapper fails the request (500).
func noRoute(w http.ResponseWriter, req *http.Request, hcm *hcmv3.HttpConnectionManager) {
	body, hdrs := "", http.Header{}
	for _, m := range hcm.GetLocalReplyConfig().GetMappers() {
		ff, ok := m.GetFilter().GetFilterSpecifier().(*accesslogv3.AccessLogFilter_ResponseFlagFilter)
		if !ok {
			localReply(w, req, http.StatusInternalServerError, "envoymodel: local_reply_config filter not modelled", nil, -1)
			return
		}
		if flags := ff.ResponseFlagFilter.GetFlags(); len(flags) > 0 && !slices.Contains(flags, "NR") {
			continue
		}
		f := m.GetBodyFormatOverride()
		text := f.GetTextFormatSource().GetInlineString()
		if f != nil && (f.GetTextFormatSource() == nil || strings.Contains(text, "%")) || m.GetStatusCode() != nil || len(m.GetHeadersToAdd()) > 0 {
			localReply(w, req, http.StatusInternalServerError, "envoymodel: local_reply_config mapper not modelled", nil, -1)
			return
		}
		if f != nil {
			body = text
			if ct := f.GetContentType(); ct != "" {
				hdrs.Set("Content-Type", ct)
			}
		}
		break // the first matching mapper wins (source/common/local_reply/local_reply.cc)
	}
	localReply(w, req, http.StatusNotFound, body, hdrs, -1)
}

var reqOperator = regexp.MustCompile(`%REQ\(([^)%]+)\)%`)

// applyFormatted is applyHeaderOption with Envoy's header formatter over a value mixing
// literals and %REQ(h)% operators (pseudo-headers included): each operator formats as the
// header's first value, "" when absent, and a value that formats empty is not added unless
// keep_empty_value (source/common/router/header_parser.cc and
// source/common/http/header_mutation.cc). Other operators are left as written.
func applyFormatted(dst http.Header, o *corev3.HeaderValueOption, get func(string) string) {
	v := reqOperator.ReplaceAllStringFunc(headerValue(o.GetHeader()), func(op string) string {
		return get(reqOperator.FindStringSubmatch(op)[1])
	})
	if v == "" && !o.GetKeepEmptyValue() {
		return
	}
	lit := &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: o.GetHeader().GetKey(), Value: v}, AppendAction: o.GetAppendAction(), KeepEmptyValue: true}
	applyHeaderOption(dst, lit, nil)
}

// firstRequestHeader is a request header's first value as Envoy's %REQ(h)% formats it
// (pseudo-headers from the request line).
func firstRequestHeader(req *http.Request, h http.Header, name string) string {
	if strings.HasPrefix(name, ":") {
		v, _ := requestHeader(req, h, name)
		return v
	}
	return h.Get(name)
}
