package modelhost

import (
	"net/http"
	"strings"

	"google.golang.org/grpc/codes"
)

// oipMux is a ServeMux whose misses answer OIP JSON errors ({"error":"..."}), not
// net/http's plain text: a path served under other methods answers 405 with an Allow
// header, any other path 404. Each path gets a method-less pattern answering 405, which
// net/http's ServeMux ranks below the method-specific ones and above the "/" catch-all.
type oipMux struct {
	*http.ServeMux
	methods map[string][]string // path pattern → methods served, in registration order
	paths   []string
}

func newOIPMux() *oipMux {
	return &oipMux{ServeMux: http.NewServeMux(), methods: map[string][]string{}}
}

// route serves h for method on path.
func (m *oipMux) route(method, path string, h http.Handler) {
	m.ServeMux.Handle(method+" "+path, h)
	if _, ok := m.methods[path]; !ok {
		m.paths = append(m.paths, path)
	}
	m.methods[path] = append(m.methods[path], method)
}

func (m *oipMux) routeFunc(method, path string, h http.HandlerFunc) { m.route(method, path, h) }

// finish registers the 405 answers of every routed path and notFound for any other
// path; call it once, after the routes.
func (m *oipMux) finish(notFound func(r *http.Request) string) {
	for _, path := range m.paths {
		var allowed []string
		for _, meth := range m.methods[path] {
			allowed = append(allowed, meth)
			if meth == http.MethodGet { // a GET pattern serves HEAD too
				allowed = append(allowed, http.MethodHead)
			}
		}
		allow := strings.Join(allowed, ", ")
		m.ServeMux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Allow", allow)
			writeError(w, &apiError{status: http.StatusMethodNotAllowed, code: codes.Unimplemented, msg: "method " + r.Method + " is not allowed on " + r.URL.Path + " (allowed: " + allow + ")"})
		})
	}
	m.ServeMux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, errNotFound("%s", notFound(r)))
	})
}
