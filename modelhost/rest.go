package modelhost

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	grpccodes "google.golang.org/grpc/codes"

	"github.com/patchbay-io/patchbay/api/headers"
	"github.com/patchbay-io/patchbay/modelhost/internal/oipjson"
	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

var (
	servedByKey    = http.CanonicalHeaderKey(headers.ServedBy)
	modelKey       = http.CanonicalHeaderKey(headers.Model)
	versionKey     = http.CanonicalHeaderKey(headers.Version)
	requestIDKey   = "X-Request-Id" // Envoy's request id, kept on mirrors
	retryAfterKey  = "Retry-After"
	retryAfter     = []string{"1"}
	contentTypeKey = "Content-Type"
	jsonCT         = []string{"application/json"}
	propagator     = propagation.TraceContext{}
)

// restState is pooled per REST inference request.
type restState struct {
	body    bytes.Buffer
	out     []byte
	req     oipjson.Request
	in      []*tensor.Tensor
	ordered []*tensor.Tensor
}

var restPool = sync.Pool{New: func() any { return new(restState) }}

// Handler returns the REST API (and /metrics when configured).
func (s *Server) Handler() http.Handler { return s.mux }

func (s *Server) routes() *http.ServeMux {
	mux := newOIPMux()
	s.healthRoutes(mux)
	mux.routeFunc("GET", "/v2", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.serverMetadata())
	})
	mux.routeFunc("GET", "/v2/models/{model}", s.handleMetadata)
	mux.routeFunc("GET", "/v2/models/{model}/versions/{version}", s.handleMetadata)
	mux.routeFunc("GET", "/v2/models/{model}/ready", s.handleModelReady)
	mux.routeFunc("GET", "/v2/models/{model}/versions/{version}/ready", s.handleModelReady)
	mux.routeFunc("POST", "/v2/models/{model}/infer", s.handleInfer)
	mux.routeFunc("POST", "/v2/models/{model}/versions/{version}/infer", s.handleInfer)
	// The repository extension (load, unload, index) is served only on the admin listener,
	// behind the bearer token: anything that reaches this port (a client, Envoy's data
	// path) must not be able to unload a model.
	mux.HandleFunc("/v2/repository/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, errRepositoryOffDataPath)
	})
	if s.cfg.MetricsHandler != nil {
		mux.route("GET", "/metrics", s.cfg.MetricsHandler)
	}
	mux.finish(func(r *http.Request) string {
		return r.Method + " " + r.URL.Path + " is not an OIP endpoint (GET /v2, /v2/health/{live,ready}, /v2/models/{model}[/versions/{version}][/ready]; POST /v2/models/{model}[/versions/{version}]/infer)"
	})
	return mux.ServeMux
}

func (s *Server) healthRoutes(mux *oipMux) {
	mux.routeFunc("GET", "/v2/health/live", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]bool{"live": true})
	})
	mux.routeFunc("GET", "/v2/health/ready", func(w http.ResponseWriter, r *http.Request) {
		ok := s.Ready()
		code := http.StatusOK
		if !ok {
			code = http.StatusServiceUnavailable
		}
		writeJSON(w, code, map[string]bool{"ready": ok})
	})
}

// Ready reports whether the repository has been loaded and the server is not stopping.
func (s *Server) Ready() bool { return s.ready.Load() && !s.closing.Load() }

type serverMeta struct {
	Name       string   `json:"name"`
	Version    string   `json:"version"`
	Extensions []string `json:"extensions"`
}

func (s *Server) serverMetadata() serverMeta {
	return serverMeta{Name: s.cfg.ServerName, Version: s.cfg.ServerVersion, Extensions: []string{"model_repository"}}
}

type tensorMeta struct {
	Name     string  `json:"name"`
	Datatype string  `json:"datatype"`
	Shape    []int64 `json:"shape"`
	// Optional (inputs only; patchbay's extension, contract.Tensor's optional): the
	// version fills this input from its features, so a request may leave it out.
	Optional *bool `json:"optional,omitempty"`
}

type modelMeta struct {
	Name     string       `json:"name"`
	Versions []string     `json:"versions"`
	Platform string       `json:"platform"`
	Inputs   []tensorMeta `json:"inputs"`
	Outputs  []tensorMeta `json:"outputs"`
}

func toMeta(ms []tensor.Meta) []tensorMeta {
	out := make([]tensorMeta, len(ms))
	for i, m := range ms {
		out[i] = tensorMeta{Name: m.Name, Datatype: m.Datatype.String(), Shape: m.Shape}
	}
	return out
}

func (s *Server) metadata(name, ver string) (modelMeta, *apiError) {
	m, v, err := s.peek(name, ver)
	if err != nil {
		return modelMeta{}, err
	}
	if !v.ready() {
		return modelMeta{}, errUnavailable("model %q version %q is not ready: %v", name, v.spec.Version, v.err)
	}
	md := modelMeta{Name: name, Versions: m.names, Platform: v.spec.Runtime, Inputs: toMeta(v.spec.Inputs), Outputs: toMeta(v.spec.Outputs)}
	for i, o := range optionalInputs(v.spec) {
		md.Inputs[i].Optional = &o
	}
	if ver != "" {
		md.Versions = []string{ver}
	}
	return md, nil
}

// handleMetadata answers for the version the request is routed to (routedVersion), as infer
// does: behind patchbay, a client asks about the version it would be served.
func (s *Server) handleMetadata(w http.ResponseWriter, r *http.Request) {
	ver, e := routedVersion(r.PathValue("model"), r.PathValue("version"), r.Header)
	if e != nil {
		writeError(w, e)
		return
	}
	md, err := s.metadata(r.PathValue("model"), ver)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, md)
}

// modelReady is the readiness of a model version; reason is set when not ready.
func (s *Server) modelReady(name, ver string) (bool, *apiError) {
	_, v, err := s.peek(name, ver)
	if err != nil {
		if err.status == http.StatusServiceUnavailable {
			return false, nil
		}
		return false, err
	}
	return v.ready(), nil
}

// handleModelReady reports the readiness of the version the request is routed to.
func (s *Server) handleModelReady(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("model")
	ver, e := routedVersion(name, r.PathValue("version"), r.Header)
	if e != nil {
		writeError(w, e)
		return
	}
	ok, err := s.modelReady(name, ver)
	if err != nil {
		writeError(w, err)
		return
	}
	code := http.StatusOK
	if !ok {
		code = http.StatusServiceUnavailable
	}
	writeJSON(w, code, map[string]any{"name": name, "ready": ok})
}

type indexRow struct {
	Name    string `json:"name"`
	Version string `json:"version,omitempty"`
	State   string `json:"state"`
	Reason  string `json:"reason,omitempty"`
}

func (s *Server) handleIndex(w http.ResponseWriter, r *http.Request) {
	var q struct {
		Ready bool `json:"ready"`
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<16))
	if err == nil && len(bytes.TrimSpace(body)) > 0 {
		dec := json.NewDecoder(bytes.NewReader(body))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&q); err != nil {
			writeError(w, errInvalid("repository index request: %v", err))
			return
		}
	}
	rows := []indexRow{}
	for _, e := range s.Index(q.Ready) {
		rows = append(rows, indexRow(e))
	}
	writeJSON(w, http.StatusOK, rows)
}

func (s *Server) loadError(name string, err error) *apiError {
	if errors.Is(err, errNotInRepository) {
		return errNotFound("model %q not found in the repository", name)
	}
	return errInvalid("load model %q: %v", name, err)
}

func (s *Server) handleLoad(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("model")
	if _, err := s.Load(name); err != nil {
		writeError(w, s.loadError(name, err))
		return
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

func (s *Server) handleUnload(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("model")
	if err := s.Unload(name); err != nil {
		writeError(w, errNotFound("%v", err))
		return
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		code, b = http.StatusInternalServerError, oipjson.AppendError(nil, "encode response: "+err.Error())
	}
	w.Header()[contentTypeKey] = jsonCT
	w.WriteHeader(code)
	_, _ = w.Write(b)
}

func writeError(w http.ResponseWriter, e *apiError) {
	w.Header()[contentTypeKey] = jsonCT
	if e.status == http.StatusTooManyRequests {
		w.Header()[retryAfterKey] = retryAfter
	}
	w.WriteHeader(e.status)
	_, _ = w.Write(oipjson.AppendError(nil, e.msg))
}

// startSpan continues the caller's trace when it sent a traceparent.
func (s *Server) startSpan(ctx context.Context, carrier propagation.TextMapCarrier, traced bool, name string) (context.Context, trace.Span) {
	if traced {
		ctx = propagator.Extract(ctx, carrier)
	} else if s.noTracer {
		// What the no-op tracer would give (its span, no parent to carry), without the
		// context it would wrap around it for every request.
		return ctx, noSpan
	}
	return s.tracer.Start(ctx, name, serverSpan...)
}

var (
	// serverSpan is built once: trace.WithSpanKind boxes its option on each call.
	serverSpan = []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindServer)}
	noSpan     = trace.SpanFromContext(context.Background())
)

func (s *Server) handleInfer(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	// Admission first, before anything is read or allocated: the body's declared size (the
	// largest allowed when it is not declared) is charged against the in-flight bounds.
	charge := s.cfg.MaxBodyBytes
	if r.ContentLength >= 0 && r.ContentLength < charge {
		charge = r.ContentLength
	}
	if e := s.limits.acquireSlot(charge); e != nil {
		s.refuseREST(w, r, e)
		return
	}
	defer s.limits.releaseSlot()
	if e := s.limits.acquireBytes(charge); e != nil {
		s.refuseREST(w, r, e)
		return
	}
	defer s.limits.releaseBytes(charge)
	name := r.PathValue("model")
	tr := trafficOfHost(r.Host) // Go puts Host (HTTP/1) and :authority (HTTP/2) here
	ver, verr := routedVersion(name, r.PathValue("version"), r.Header)
	ctx, span := s.startSpan(r.Context(), propagation.HeaderCarrier(r.Header), r.Header.Get("traceparent") != "", "oip.rest.infer")
	defer span.End()
	if verr != nil {
		s.failed(ctx, span, nil, "rest", tr, verr)
		writeError(w, verr)
		return
	}
	v, aerr := s.lookup(name, ver)
	if aerr != nil {
		s.failed(ctx, span, nil, "rest", tr, aerr)
		writeError(w, aerr)
		return
	}
	defer v.release()
	if span.IsRecording() {
		span.SetAttributes(attribute.String("patchbay.model", name), attribute.String("patchbay.version", v.spec.Version))
	}
	st := restPool.Get().(*restState)
	reuse := true
	defer func() {
		if reuse && st.body.Cap() <= 1<<20 && cap(st.out) <= 1<<20 { // large buffers go to the GC
			restPool.Put(st)
		}
	}()
	out, aerr := s.inferREST(ctx, v, r, st, tr, start)
	if ctx.Err() != nil {
		// The caller gave up while its rows may still sit in a batch: the batcher reads
		// st's tensors when that batch runs, so st must not be handed to another request.
		reuse = false
	}
	if aerr != nil {
		s.failed(ctx, span, v, "rest", tr, aerr)
		writeError(w, aerr)
		return
	}
	h := w.Header()
	h[contentTypeKey] = jsonCT
	h[servedByKey] = v.servedBy
	_, _ = w.Write(out)
	s.inst.requests.Add(ctx, 1, v.attrs.rest[tr].add...)
	s.inst.latency.Record(ctx, time.Since(start).Seconds(), v.attrs.rest[tr].rec...)
	if e := s.log.Debug(); e.Enabled() {
		e.Str("model", name).Str("version", v.spec.Version).Stringer("traffic", tr).Dur("took", time.Since(start)).Msg("rest infer")
	}
}

func (s *Server) inferREST(ctx context.Context, v *version, r *http.Request, st *restState, tr traffic, start time.Time) ([]byte, *apiError) {
	limit := s.cfg.MaxBodyBytes
	if r.ContentLength > limit {
		return nil, &apiError{http.StatusRequestEntityTooLarge, grpccodes.ResourceExhausted, "request body of " + strconv.FormatInt(r.ContentLength, 10) + " bytes exceeds the limit of " + strconv.FormatInt(limit, 10)}
	}
	st.body.Reset()
	if r.ContentLength > 0 {
		st.body.Grow(int(r.ContentLength) + 1) // one allocation of the right size, not a doubling series
	}
	if _, err := st.body.ReadFrom(io.LimitReader(r.Body, limit+1)); err != nil {
		return nil, errInvalid("read request body: %v", err)
	}
	if int64(st.body.Len()) > limit {
		return nil, &apiError{http.StatusRequestEntityTooLarge, grpccodes.ResourceExhausted, "request body exceeds the limit of " + strconv.FormatInt(limit, 10) + " bytes"}
	}
	if err := oipjson.Decode(st.body.Bytes(), &st.req, s.cfg.MaxTensorElements); err != nil {
		return nil, errInvalid("%v", err)
	}
	st.in = st.in[:0]
	for i := range st.req.Inputs {
		st.in = append(st.in, &st.req.Inputs[i])
	}
	in, aerr := s.complete(ctx, v, r.Header.Get, st.in)
	if aerr != nil {
		return nil, aerr
	}
	st.in = in
	ordered, aerr := s.prepare(v, st.in, st.ordered, st.req.Outputs)
	st.ordered = ordered
	if aerr != nil {
		return nil, aerr
	}
	outs, err := s.run(ctx, v, ordered, st.req.Outputs, tr)
	if err != nil {
		return nil, asAPIError(err)
	}
	if s.shadow != nil {
		s.shadow.offer(v, r.Header.Get(requestIDKey), tr, outs, start)
	}
	st.out = oipjson.AppendResponse(st.out[:0], &oipjson.Response{Model: v.spec.Model, Version: v.spec.Version, ID: st.req.ID, Outputs: outs})
	return st.out, nil
}

// failed counts and traces a failed request.
func (s *Server) failed(ctx context.Context, span trace.Span, v *version, proto string, tr traffic, e *apiError) {
	model, ver := "_unknown", ""
	if v != nil {
		model, ver = v.spec.Model, v.spec.Version
		opt := v.attrs.rest[tr]
		if proto == "grpc" {
			opt = v.attrs.grpc[tr]
		}
		s.inst.requests.Add(ctx, 1, opt.add...)
	}
	s.inst.errors.Add(ctx, 1, errorAttrs(model, ver, proto, e.code.String(), tr))
	span.SetStatus(codes.Error, e.msg)
	if d := s.log.Debug(); d.Enabled() {
		d.Str("model", model).Str("version", ver).Stringer("traffic", tr).Str("code", e.code.String()).Msg(e.msg)
	}
}

// refuseREST answers a request turned away by the in-flight bounds: 429 with Retry-After,
// before its body is read.
func (s *Server) refuseREST(w http.ResponseWriter, r *http.Request, e *apiError) {
	s.inst.refused.Add(r.Context(), 1, s.inst.refusedREST)
	writeError(w, e)
}

// routedVersion decides the version of a REST model request (infer, metadata, readiness). The router's
// x-patchbay-version (set by ext_proc or Envoy's weighted cluster) wins over a version in
// the path, and a conflict is refused: a client behind patchbay cannot step around the
// split by naming a version in the path (pinning, where allowed, is decided by the router,
// which then sets the header to the pinned version). The x-patchbay-model header, when
// present, must name the path's model.
func routedVersion(model, pathVer string, h http.Header) (string, *apiError) {
	if e := checkRoutedModel(model, h[modelKey]); e != nil {
		return "", e
	}
	vs := h[versionKey]
	switch {
	case len(vs) == 0 || (len(vs) == 1 && vs[0] == ""):
		return pathVer, nil
	case len(vs) > 1:
		return "", errInvalid("%s given %d times; one version per request", headers.Version, len(vs))
	case pathVer != "" && pathVer != vs[0]:
		return "", errInvalid("path names version %q but the router chose %q (%s); leave the version out of the path behind patchbay", pathVer, vs[0], headers.Version)
	}
	return vs[0], nil
}

// checkRoutedModel refuses a request whose x-patchbay-model header (the model the router
// decided) is repeated or names another model than the request itself.
func checkRoutedModel(model string, hdr []string) *apiError {
	switch {
	case len(hdr) == 0:
		return nil
	case len(hdr) > 1:
		return errInvalid("%s given %d times; one model per request", headers.Model, len(hdr))
	case hdr[0] != model:
		return errInvalid("request names model %q but %s names %q", model, headers.Model, hdr[0])
	}
	return nil
}
