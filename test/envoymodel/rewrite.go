package envoymodel

import (
	"fmt"
	"net/http"
	"regexp"
	"strings"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
)

// rewritePath applies the route's prefix_rewrite or regex_rewrite as Envoy's router does when
// it finalises the request headers (envoy source/common/router/config_impl.cc,
// RouteEntryImplBase::finalizePathHeader and currentUrlPathAfterRewriteWithMatchedPath):
//   - prefix_rewrite replaces the part of the path the route matched — the prefix for prefix
//     and path_separated_prefix routes, the whole path (query excluded) for path and
//     safe_regex routes — and keeps the rest, query included;
//   - regex_rewrite replaces every match of its pattern (not anchored: RE2 GlobalReplace, with
//     \1-style groups in the substitution) in the path without its query, then puts the query
//     back;
//   - the original path goes to x-envoy-original-path.
//
// It returns the request to send upstream (req itself when nothing is rewritten); h gets the
// header. Both rewrites at once, or a path_rewrite_policy, fail as Envoy refuses them / as the
// model does not model them.
func rewritePath(rt *routev3.Route, req *http.Request, h http.Header) (*http.Request, error) {
	a := rt.GetRoute()
	pre, rx := a.GetPrefixRewrite(), a.GetRegexRewrite()
	switch {
	case a.GetPathRewritePolicy() != nil:
		return nil, fmt.Errorf("path_rewrite_policy is not modelled")
	case pre != "" && rx != nil:
		return nil, fmt.Errorf("prefix_rewrite and regex_rewrite together (Envoy refuses the route)")
	case pre == "" && rx == nil:
		return req, nil
	}
	orig := req.URL.RequestURI()
	path, query, hasQuery := strings.Cut(orig, "?")
	var newPath string
	if pre != "" {
		matched := path
		switch m := rt.GetMatch(); {
		case m.GetPrefix() != "":
			matched = m.GetPrefix()
		case m.GetPathSeparatedPrefix() != "":
			matched = m.GetPathSeparatedPrefix()
		}
		if !strings.HasPrefix(path, matched) {
			return nil, fmt.Errorf("prefix_rewrite: path %q does not start with the matched %q", path, matched)
		}
		newPath = pre + path[len(matched):]
	} else {
		re, err := regexp.Compile(rx.GetPattern().GetRegex())
		if err != nil {
			return nil, fmt.Errorf("regex_rewrite %q: %w", rx.GetPattern().GetRegex(), err)
		}
		newPath = re.ReplaceAllString(path, re2Substitution(rx.GetSubstitution()))
	}
	if hasQuery {
		newPath += "?" + query
	}
	out := req.Clone(req.Context())
	u, err := out.URL.Parse(newPath)
	if err != nil {
		return nil, fmt.Errorf("rewritten path %q: %w", newPath, err)
	}
	out.URL = u
	out.RequestURI = ""
	h.Set("X-Envoy-Original-Path", orig)
	return out, nil
}

// re2Substitution turns an RE2 substitution (\0..\9 groups, \\ a backslash) into Go's
// ReplaceAllString template ($ literal as $$).
func re2Substitution(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '$':
			b.WriteString("$$")
		case c == '\\' && i+1 < len(s) && s[i+1] >= '0' && s[i+1] <= '9':
			b.WriteString("${" + string(s[i+1]) + "}")
			i++
		case c == '\\' && i+1 < len(s) && s[i+1] == '\\':
			b.WriteByte('\\')
			i++
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}
