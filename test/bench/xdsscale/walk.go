package xdsscale

import (
	"fmt"
	"regexp"
	"strings"
	"sync"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
)

// Request is what route matching sees of a request: method, path (no query) and headers
// (lower-case names, one value each).
type Request struct {
	Method, Path string
	Headers      map[string]string
}

// Walk matches req against rc the way Envoy's router does (envoy
// source/common/router/config_impl.cc: the virtual host whose domains match, then its
// routes in order, the first whose RouteMatch matches wins) and returns how many route
// matchers were evaluated until the match (the matching one included) and the matched
// route's name. Matchers this code does not model return an error rather than a guess.
func Walk(rc *routev3.RouteConfiguration, req Request) (int, string, error) {
	n, r, err := WalkRoute(rc, req)
	return n, r.GetName(), err
}

// WalkRoute is Walk returning the matched route itself (nil when none matched).
func WalkRoute(rc *routev3.RouteConfiguration, req Request) (int, *routev3.Route, error) {
	var vh *routev3.VirtualHost
	for _, v := range rc.GetVirtualHosts() {
		for _, d := range v.GetDomains() {
			if d == "*" || d == req.Headers[":authority"] {
				vh = v
			}
		}
		if vh != nil {
			break
		}
	}
	if vh == nil {
		return 0, nil, fmt.Errorf("no virtual host")
	}
	for i, r := range vh.GetRoutes() {
		ok, err := matches(r.GetMatch(), req)
		if err != nil {
			return i + 1, nil, fmt.Errorf("route %q: %w", r.GetName(), err)
		}
		if ok {
			return i + 1, r, nil
		}
	}
	return len(vh.GetRoutes()), nil, nil
}

var regexCache sync.Map // string -> *regexp.Regexp

func matches(m *routev3.RouteMatch, req Request) (bool, error) {
	if m.GetRuntimeFraction() != nil || len(m.GetQueryParameters()) > 0 || m.GetGrpc() != nil || m.GetDynamicMetadata() != nil {
		return false, fmt.Errorf("matcher not modelled")
	}
	if cs := m.GetCaseSensitive(); cs != nil && !cs.GetValue() {
		return false, fmt.Errorf("case-insensitive match not modelled")
	}
	p := req.Path
	switch s := m.GetPathSpecifier().(type) {
	case *routev3.RouteMatch_Prefix:
		if !strings.HasPrefix(p, s.Prefix) {
			return false, nil
		}
	case *routev3.RouteMatch_Path:
		if p != s.Path {
			return false, nil
		}
	case *routev3.RouteMatch_PathSeparatedPrefix:
		if p != s.PathSeparatedPrefix && !strings.HasPrefix(p, s.PathSeparatedPrefix+"/") {
			return false, nil
		}
	case *routev3.RouteMatch_SafeRegex:
		var re *regexp.Regexp
		if v, ok := regexCache.Load(s.SafeRegex.GetRegex()); ok {
			re = v.(*regexp.Regexp)
		} else {
			var err error
			// Envoy's safe_regex on a path is a full match (RE2 FullMatch).
			if re, err = regexp.Compile("^(?:" + s.SafeRegex.GetRegex() + ")$"); err != nil {
				return false, err
			}
			regexCache.Store(s.SafeRegex.GetRegex(), re)
		}
		if !re.MatchString(p) {
			return false, nil
		}
	default:
		return false, fmt.Errorf("path specifier %T not modelled", s)
	}
	for _, h := range m.GetHeaders() {
		ok, err := headerMatches(h, req)
		if err != nil || !ok {
			return false, err
		}
	}
	return true, nil
}

func headerMatches(h *routev3.HeaderMatcher, req Request) (bool, error) {
	v, present := req.Headers[strings.ToLower(h.GetName())]
	if h.GetName() == ":method" {
		v, present = req.Method, true
	}
	var ok bool
	switch s := h.GetHeaderMatchSpecifier().(type) {
	case *routev3.HeaderMatcher_PresentMatch:
		ok = present == s.PresentMatch
	case *routev3.HeaderMatcher_StringMatch:
		if !present {
			return h.GetInvertMatch() && h.GetTreatMissingHeaderAsEmpty(), nil
		}
		switch p := s.StringMatch.GetMatchPattern().(type) {
		case *matcherv3.StringMatcher_Exact:
			ok = v == p.Exact
		case *matcherv3.StringMatcher_Prefix:
			ok = strings.HasPrefix(v, p.Prefix)
		default:
			return false, fmt.Errorf("string matcher %T not modelled", p)
		}
	default:
		return false, fmt.Errorf("header matcher %T not modelled", s)
	}
	return ok != h.GetInvertMatch(), nil
}
