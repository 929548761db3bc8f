package extproc

import (
	"context"
	"encoding/json"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/patchbay-io/patchbay/api/headers"
	"github.com/patchbay-io/patchbay/extproc/internal/assign"
	"github.com/patchbay-io/patchbay/extproc/internal/policy"
)

// streamState is the per-stream (per HTTP request) state.
type streamState struct {
	protocol *extprocv3.ProtocolConfiguration
	// Body mode: the headers message is kept until the body arrives.
	waiting bool
	st      *state
	hs      []*corev3.HeaderValue
	pending assign.Decision
	body    []byte
	// oneBodyMessage: the body arrives in one (buffered) message.
	oneBodyMessage bool
	// reply holds the answer being sent; back to replies once it is (release).
	reply *reply
}

// replies recycles answers: gRPC has marshalled a message when Send returns, so the
// stream gives its reply back then, and a routed answer allocates nothing. grpc-go
// (stream.go, ServerStream.SendMsg) warns that stats handlers and x/net/trace tracing
// may read a sent message later; Serve installs neither (no grpc.StatsHandler, and
// grpc.EnableTracing is left false). An embedder that wraps Process with either must
// not rely on the message after Send.
var replies = sync.Pool{New: func() any { return new(reply) }}

// release recycles the answer of the message just sent (or not sent).
func (st *streamState) release() {
	if r := st.reply; r != nil {
		st.reply = nil
		*r = reply{}
		replies.Put(r)
	}
}

// bodyOverride asks Envoy for the buffered request body and otherwise keeps the filter's
// configured mode (request headers sent; response headers, bodies and trailers skipped).
var bodyOverride = &filterv3.ProcessingMode{
	RequestHeaderMode:   filterv3.ProcessingMode_SEND,
	ResponseHeaderMode:  filterv3.ProcessingMode_SKIP,
	RequestBodyMode:     filterv3.ProcessingMode_BUFFERED,
	ResponseBodyMode:    filterv3.ProcessingMode_NONE,
	RequestTrailerMode:  filterv3.ProcessingMode_SKIP,
	ResponseTrailerMode: filterv3.ProcessingMode_SKIP,
}

// epoch anchors since: durations between two since() calls need one monotonic clock
// read each, where time.Now reads the wall clock too.
var epoch = time.Now()

func since() time.Duration { return time.Since(epoch) }

// Fixed answers that carry no decision; immutable and shared (concurrent marshalling
// of an unchanging message is safe).
var (
	continueRequestHeaders   = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{}}}
	continueResponseHeaders  = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{ResponseHeaders: &extprocv3.HeadersResponse{}}}
	continueRequestBody      = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{}}}
	continueResponseBody     = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{ResponseBody: &extprocv3.BodyResponse{}}}
	continueRequestTrailers  = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestTrailers{RequestTrailers: &extprocv3.TrailersResponse{}}}
	continueResponseTrailers = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseTrailers{ResponseTrailers: &extprocv3.TrailersResponse{}}}
)

// Bits of headers.Stripped that a decision itself sets (with OVERWRITE), so removing
// them would be redundant, and wrong if Envoy applied removals after sets.
var bucketBit, versionBit, experimentsBit = strippedBit(headers.Bucket), strippedBit(headers.Version), strippedBit(headers.Experiments)

func strippedBit(name string) uint8 {
	for i, s := range headers.Stripped {
		if s == name {
			return 1 << i
		}
	}
	return 0
}

// removeLists[mask] lists the headers.Stripped names whose bits are set in mask.
var removeLists = func() [][]string {
	lists := make([][]string, 1<<len(headers.Stripped))
	for mask := range lists {
		for i, name := range headers.Stripped {
			if mask&(1<<i) != 0 {
				lists[mask] = append(lists[mask], name)
			}
		}
	}
	return lists
}()

// removals lists the client's x-patchbay-* headers to remove, except those in set
// (which the answer overwrites) and x-patchbay-model. Only a request carrying unknown
// x-patchbay-* names makes it allocate.
func removals(d *assign.Decision, set uint8, hs []*corev3.HeaderValue) []string {
	known := removeLists[d.Stripped&^set]
	if !d.OtherPatchbay {
		return known
	}
	out := append([]string(nil), known...)
	for _, h := range hs {
		k := h.GetKey()
		if !strings.HasPrefix(k, headers.Prefix) || k == headers.Model || k == headers.RouteKey || slices.Contains(headers.Stripped, k) || slices.Contains(out, k) {
			continue
		}
		out = append(out, k)
	}
	return out
}

// passThrough[mask] answers a non-model request: nothing changes except that the
// client's forbidden x-patchbay-* headers are removed.
var passThrough = func() []*extprocv3.ProcessingResponse {
	out := make([]*extprocv3.ProcessingResponse, len(removeLists))
	out[0] = continueRequestHeaders
	for mask := 1; mask < len(out); mask++ {
		out[mask] = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{
			RequestHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{
				HeaderMutation: &extprocv3.HeaderMutation{RemoveHeaders: removeLists[mask]},
			}},
		}}
	}
	return out
}()

func (s *Server) handle(ctx context.Context, st *streamState, req *extprocv3.ProcessingRequest) (*extprocv3.ProcessingResponse, error) {
	switch r := req.GetRequest().(type) {
	case *extprocv3.ProcessingRequest_RequestHeaders:
		if req.GetObservabilityMode() {
			return nil, nil
		}
		return s.requestHeaders(ctx, st, r.RequestHeaders), nil
	case *extprocv3.ProcessingRequest_RequestBody:
		if st.waiting && !req.GetObservabilityMode() {
			return s.requestBody(ctx, st, r.RequestBody), nil
		}
		return continueRequestBody, nil
	case *extprocv3.ProcessingRequest_RequestTrailers:
		return continueRequestTrailers, nil
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		return continueResponseHeaders, nil
	case *extprocv3.ProcessingRequest_ResponseBody:
		return continueResponseBody, nil
	case *extprocv3.ProcessingRequest_ResponseTrailers:
		return continueResponseTrailers, nil
	default:
		return nil, errNoMessage
	}
}

// requestHeaders decides a request from its headers.
func (s *Server) requestHeaders(ctx context.Context, st *streamState, h *extprocv3.HttpHeaders) *extprocv3.ProcessingResponse {
	start := since()
	cur := s.state.Load()
	hs := h.GetHeaders().GetHeaders()
	if cur == nil {
		// No policy yet: decide nothing (Envoy's baseline split applies), but still
		// remove the client's x-patchbay-* headers.
		var d assign.Decision
		assign.ScanForbidden(hs, &d)
		return s.answer(ctx, st, nil, &d, hs, false, nil)
	}
	var span trace.Span
	if s.tracer != nil {
		ctx, span = s.tracer.Start(s.prop.Extract(ctx, &carrier{hs: hs}), "patchbay.extproc.decide", trace.WithSpanKind(trace.SpanKindInternal))
		defer span.End()
	}
	var d assign.Decision
	assign.Decide(cur.tbl, hs, &d)
	if d.Outcome == assign.NeedBody {
		if resp := s.awaitBody(ctx, st, cur, hs, h.GetEndOfStream(), &d); resp != nil {
			return resp
		}
	}
	resp := s.answer(ctx, st, cur, &d, hs, false, span)
	s.recordLatency(ctx, start)
	return resp
}

// awaitBody prepares body mode: it returns the headers answer that asks Envoy for the
// buffered body, or nil when the body cannot be had (d is then decided without identity).
func (s *Server) awaitBody(ctx context.Context, st *streamState, cur *state, hs []*corev3.HeaderValue, endOfStream bool, d *assign.Decision) *extprocv3.ProcessingResponse {
	mode := st.protocol.GetRequestBodyMode()
	buffered := mode == filterv3.ProcessingMode_BUFFERED || mode == filterv3.ProcessingMode_BUFFERED_PARTIAL
	if endOfStream || (!buffered && st.protocol.GetSendBodyWithoutWaitingForHeaderResponse()) {
		if !endOfStream {
			s.in.bodies[bodyUnusable].inc()
		}
		assign.Assign(d.Model, "", hs, d)
		return nil
	}
	st.waiting, st.st, st.hs, st.pending = true, cur, hs, *d
	st.oneBodyMessage = true // buffered by configuration, or by the override below
	cr := &extprocv3.CommonResponse{}
	if rm := removals(d, 0, hs); len(rm) > 0 {
		cr.HeaderMutation = &extprocv3.HeaderMutation{RemoveHeaders: rm}
	}
	resp := &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{
		RequestHeaders: &extprocv3.HeadersResponse{Response: cr},
	}}
	if !buffered {
		// Needs allow_mode_override in the filter config (see README). The override is a
		// whole processing mode: Envoy applies every field, so the rest repeats the
		// filter's configuration (else response headers would turn on, a round trip more).
		resp.ModeOverride = bodyOverride
	}
	if e := s.log.Debug(); e.Enabled() {
		e.Str("model", d.Model.Name).Msg("no identity in headers; asking for the body")
	}
	return resp
}

// requestBody decides a body-mode request once its body has arrived.
func (s *Server) requestBody(ctx context.Context, st *streamState, b *extprocv3.HttpBody) *extprocv3.ProcessingResponse {
	if len(st.body)+len(b.GetBody()) <= s.cfg.MaxBodyBytes {
		st.body = append(st.body, b.GetBody()...)
	}
	// In BUFFERED and BUFFERED_PARTIAL modes (configured, or asked for by the override)
	// the body comes as one message, which is not marked end_of_stream when the request
	// has trailers or the buffer limit was reached: decide on it either way.
	if !b.GetEndOfStream() && !st.oneBodyMessage {
		return continueRequestBody
	}
	start := since()
	st.waiting = false
	d := &st.pending
	id, ok := IdentityFromBody(st.body, st.st.tbl.Identity)
	if ok {
		s.in.bodies[bodyIdentity].inc()
	} else {
		s.in.bodies[bodyNone].inc()
	}
	d.Stripped, d.OtherPatchbay = 0, false // removed with the headers answer
	assign.Assign(d.Model, id, st.hs, d)
	resp := s.answer(ctx, st, st.st, d, st.hs, true, nil)
	s.recordLatency(ctx, start)
	return resp
}

// recordLatency records a decision's duration. The histogram's exemplar filter
// (trace-based) reads the context for a sampled span: only a decision span can be one,
// so without tracing it gets an empty context instead of walking the gRPC stream's
// chain of contexts.
func (s *Server) recordLatency(ctx context.Context, start time.Duration) {
	if s.tracer == nil {
		ctx = context.Background()
	}
	s.in.latency.Record(ctx, (since() - start).Seconds())
}

// IdentityFromBody reads the identity from an OIP JSON request body's "parameters"
// object, under the same names as the identity headers (first present wins). String
// and number values count.
func IdentityFromBody(body []byte, names []string) (string, bool) {
	var req struct {
		Parameters map[string]json.RawMessage `json:"parameters"`
	}
	if len(body) == 0 || json.Unmarshal(body, &req) != nil {
		return "", false
	}
	for _, name := range names {
		raw, ok := req.Parameters[name]
		if !ok {
			continue
		}
		var sv string
		if json.Unmarshal(raw, &sv) == nil && sv != "" {
			return sv, true
		}
		var nv json.Number
		if json.Unmarshal(raw, &nv) == nil && nv != "" {
			return nv.String(), true
		}
	}
	return "", false
}

// reply is every message of a routed answer in one object, recycled (replies).
type reply struct {
	resp    extprocv3.ProcessingResponse
	onH     extprocv3.ProcessingResponse_RequestHeaders
	onB     extprocv3.ProcessingResponse_RequestBody
	hr      extprocv3.HeadersResponse
	br      extprocv3.BodyResponse
	cr      extprocv3.CommonResponse
	hm      extprocv3.HeaderMutation
	set     [6]*corev3.HeaderValueOption
	bucket  corev3.HeaderValueOption
	bucketV corev3.HeaderValue
	buf     [20]byte
}

// answer turns a decision into Envoy's answer: for body mode (onBody) a body response,
// else a headers response; errors become immediate responses. A routed answer lives in
// st.reply until st.release.
func (s *Server) answer(ctx context.Context, st *streamState, cur *state, d *assign.Decision, hs []*corev3.HeaderValue, onBody bool, span trace.Span) *extprocv3.ProcessingResponse {
	switch d.Outcome {
	case assign.PassThrough:
		if d.OtherPatchbay {
			return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{
				RequestHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{
					HeaderMutation: &extprocv3.HeaderMutation{RemoveHeaders: removals(d, 0, hs)},
				}},
			}}
		}
		return passThrough[d.Stripped]
	case assign.UnknownModel, assign.UnknownVersion, assign.PinForbidden, assign.ModelConflict:
		s.in.rejects[d.Outcome].inc()
		if span != nil {
			span.SetAttributes(attribute.String("patchbay.model", d.ModelName), attribute.String("patchbay.error", errorMessage(d)))
		}
		return immediateError(d)
	}
	m, lb := d.Model, cur.labels
	r := replies.Get().(*reply)
	st.reply = r
	r.bucketV.Key = headers.Bucket
	r.bucketV.RawValue = strconv.AppendUint(r.buf[:0], d.Bucket, 10)
	r.bucket.Header = &r.bucketV
	r.bucket.Append = policy.NoAppend // what Envoy reads (see policy.SetHeader)
	r.bucket.AppendAction = corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD
	// x-patchbay-model is always overwritten with the decided model (prebuilt per model),
	// so Envoy's route cannot disagree with the decision.
	r.set[0] = m.Header
	r.set[1] = &r.bucket
	n, setBits := 2, bucketBit
	if d.Version != nil {
		r.set[n] = d.Version.Header
		n, setBits = n+1, setBits|versionBit
	}
	if d.Combo > 0 {
		h := m.CombosHeader(d.Combo)
		if h == nil {
			h = policy.SetHeader(headers.Experiments, policy.JoinLabels(d.Exposures()))
		}
		r.set[n] = h
		n, setBits = n+1, setBits|experimentsBit
	}
	r.hm.SetHeaders = r.set[:n]
	r.hm.RemoveHeaders = removals(d, setBits, hs)
	r.cr.HeaderMutation = &r.hm
	r.cr.ClearRouteCache = true
	if onBody {
		r.br.Response = &r.cr
		r.onB.RequestBody = &r.br
		r.resp.Response = &r.onB
	} else {
		r.hr.Response = &r.cr
		r.onH.RequestHeaders = &r.hr
		r.resp.Response = &r.onH
	}

	switch {
	case d.Source == assign.Pin:
		lb.byPin[d.Version.ID].inc()
	case d.Source == assign.Experiment:
		lb.byExp[d.Version.ID].inc()
	default:
		lb.split[m.ID].inc()
	}
	if d.Anonymous {
		lb.anonymous[m.ID].inc()
	}
	for _, a := range d.Exposures() {
		lb.exposure[a.ID].inc()
	}
	if span != nil {
		s.traceDecision(ctx, span, d, r, n)
	}
	if e := s.log.Debug(); e.Enabled() {
		e.Str("model", m.Name).Uint64("bucket", d.Bucket).Bool("anonymous", d.Anonymous).
			Int("exposures", d.NExposed).Bool("version_decided", d.Version != nil).Msg("decided")
	}
	return &r.resp
}

// traceDecision annotates the span and injects its context for the upstream request.
func (s *Server) traceDecision(ctx context.Context, span trace.Span, d *assign.Decision, r *reply, n int) {
	attrs := []attribute.KeyValue{
		attribute.String("patchbay.model", d.Model.Name),
		attribute.Int64("patchbay.bucket", int64(d.Bucket)),
		attribute.Bool("patchbay.anonymous", d.Anonymous),
	}
	if d.Version != nil {
		attrs = append(attrs, attribute.String("patchbay.version", d.Version.Name))
	}
	if d.NExposed > 0 {
		attrs = append(attrs, attribute.String("patchbay.experiments", policy.JoinLabels(d.Exposures())))
	}
	span.SetAttributes(attrs...)
	var c carrier
	s.prop.Inject(trace.ContextWithSpan(ctx, span), &c)
	for _, kv := range c.set {
		if n == len(r.set) {
			break
		}
		r.set[n] = policy.SetHeader(kv[0], kv[1])
		n++
	}
	r.hm.SetHeaders = r.set[:n]
}

// carrier adapts ext_proc headers to OpenTelemetry propagation: Get reads the request,
// Set collects headers to add.
type carrier struct {
	hs  []*corev3.HeaderValue
	set [][2]string
}

func (c carrier) Get(key string) string {
	v, _ := assign.Find(c.hs, key)
	return v
}

func (c *carrier) Set(key, value string) { c.set = append(c.set, [2]string{key, value}) }

func (c carrier) Keys() []string {
	keys := make([]string, 0, len(c.hs))
	for _, h := range c.hs {
		keys = append(keys, h.GetKey())
	}
	return keys
}

// errorMessage is the OIP error text of a rejected decision.
func errorMessage(d *assign.Decision) string {
	switch d.Outcome {
	case assign.UnknownModel:
		return "unknown model " + strconv.Quote(d.ModelName)
	case assign.UnknownVersion:
		return "model " + strconv.Quote(d.ModelName) + ": unknown version " + strconv.Quote(d.PinnedVersion)
	case assign.ModelConflict:
		if d.ModelHeaders > 1 {
			return headers.Model + " given " + strconv.Itoa(d.ModelHeaders) + " times: a request names one model"
		}
		return "path names model " + strconv.Quote(d.ModelName) + " but " + headers.Model + " names " + strconv.Quote(d.HeaderModel) + ": a request names one model"
	default:
		return "model " + strconv.Quote(d.ModelName) + ": requests may not name a version (pinning is off for this model)"
	}
}

// immediateError answers a rejected request without forwarding it: an OIP error
// (HTTP status and {"error": ...}) or, for gRPC requests, a gRPC status.
func immediateError(d *assign.Decision) *extprocv3.ProcessingResponse {
	msg := errorMessage(d)
	ir := &extprocv3.ImmediateResponse{Details: msg}
	if d.GRPC {
		code := uint32(5) // NOT_FOUND
		switch d.Outcome {
		case assign.PinForbidden:
			code = 7 // PERMISSION_DENIED
		case assign.ModelConflict:
			code = 3 // INVALID_ARGUMENT
		}
		ir.Status = &typev3.HttpStatus{Code: typev3.StatusCode_OK}
		ir.GrpcStatus = &extprocv3.GrpcStatus{Status: code}
		ir.Headers = &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{policy.SetHeader("grpc-message", grpcMessage(msg))}}
	} else {
		ir.Status = &typev3.HttpStatus{Code: typev3.StatusCode_NotFound}
		switch d.Outcome {
		case assign.PinForbidden:
			ir.Status.Code = typev3.StatusCode_Forbidden
		case assign.ModelConflict:
			ir.Status.Code = typev3.StatusCode_BadRequest
		}
		body, _ := json.Marshal(struct {
			Error string `json:"error"`
		}{msg})
		ir.Body = body
		ir.Headers = &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{policy.SetHeader("content-type", "application/json")}}
	}
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{ImmediateResponse: ir}}
}

// grpcMessage percent-encodes msg as the grpc-message header requires.
func grpcMessage(msg string) string {
	const hex = "0123456789ABCDEF"
	out := make([]byte, 0, len(msg))
	for i := 0; i < len(msg); i++ {
		c := msg[i]
		if c >= ' ' && c <= '~' && c != '%' {
			out = append(out, c)
			continue
		}
		out = append(out, '%', hex[c>>4], hex[c&15])
	}
	return string(out)
}
