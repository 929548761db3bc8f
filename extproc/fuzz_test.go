package extproc

import (
	"context"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/protobuf/proto"

	"github.com/patchbay-io/patchbay/api/headers"
)

// FuzzHandle feeds arbitrary ext_proc messages (wire bytes, two per stream) to the
// stream state machine: it must answer each with the matching kind or an error, and
// never panic.
func FuzzHandle(f *testing.F) {
	seed := func(m *extprocv3.ProcessingRequest) []byte {
		b, err := proto.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		return b
	}
	hdr := seed(reqHeaders(false, ":path", "/v2/models/thumbs/infer", headers.Bucket, "1"))
	f.Add(hdr, seed(bodyMsg(`{"parameters":{"x-user-id":"u1"}}`, true)))
	f.Add(seed(reqHeaders(true, ":path", "/v2/models/ranker/versions/v8", headers.UserID, "u")), seed(respHeadersMsg))
	f.Add([]byte{}, hdr)
	f.Add(seed(reqHeaders(false, ":path", headers.GRPCInferencePrefix+"ModelInfer", "content-type", "application/grpc", headers.Model, "ranker", headers.Model, "thumbs")), seed(respHeadersMsg))
	f.Add(seed(reqHeaders(false, ":path", "/v2/models/ranker/infer", headers.Model, "ranker", headers.UserID, "u1")), seed(reqBodyMsg))
	srv, err := New(Config{})
	if err != nil {
		f.Fatal(err)
	}
	if err := srv.SetPolicy(testPolicy("c1")); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, first, second []byte) {
		var st streamState
		for _, raw := range [][]byte{first, second} {
			var req extprocv3.ProcessingRequest
			if proto.Unmarshal(raw, &req) != nil {
				return
			}
			resp, err := srv.handle(context.Background(), &st, &req)
			if err != nil {
				if req.GetRequest() != nil {
					t.Fatalf("error for a %T message: %v", req.GetRequest(), err)
				}
				return
			}
			if resp == nil {
				if !req.GetObservabilityMode() {
					t.Fatalf("no answer to %v", &req)
				}
				continue
			}
			if !matchingKind(&req, resp) {
				t.Fatalf("%T answered with %T", req.GetRequest(), resp.GetResponse())
			}
			if _, err := proto.Marshal(resp); err != nil {
				t.Fatalf("answer does not marshal: %v", err)
			}
			checkOneModel(t, &st, &req, resp)
		}
	})
}

// matchingKind reports whether resp answers req's kind (or is an immediate response to
// request headers).
func matchingKind(req *extprocv3.ProcessingRequest, resp *extprocv3.ProcessingResponse) bool {
	switch req.GetRequest().(type) {
	case *extprocv3.ProcessingRequest_RequestHeaders:
		return resp.GetRequestHeaders() != nil || resp.GetImmediateResponse() != nil
	case *extprocv3.ProcessingRequest_RequestBody:
		return resp.GetRequestBody() != nil
	case *extprocv3.ProcessingRequest_RequestTrailers:
		return resp.GetRequestTrailers() != nil
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		return resp.GetResponseHeaders() != nil
	case *extprocv3.ProcessingRequest_ResponseBody:
		return resp.GetResponseBody() != nil
	case *extprocv3.ProcessingRequest_ResponseTrailers:
		return resp.GetResponseTrailers() != nil
	}
	return false
}

// checkOneModel holds a routed answer to one model: a decision (a bucket is set) also
// overwrites x-patchbay-model, once, and only for a request that named at most one model.
func checkOneModel(t *testing.T, st *streamState, req *extprocv3.ProcessingRequest, resp *extprocv3.ProcessingResponse) {
	t.Helper()
	cr := resp.GetRequestHeaders().GetResponse()
	if cr == nil {
		cr = resp.GetRequestBody().GetResponse()
	}
	var models, buckets int
	for _, o := range cr.GetHeaderMutation().GetSetHeaders() {
		switch o.GetHeader().GetKey() {
		case headers.Model:
			models++
			if o.GetAppend() == nil || o.GetAppend().GetValue() || o.GetAppendAction() != corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD || len(o.GetHeader().GetRawValue()) == 0 {
				t.Fatalf("x-patchbay-model not overwritten with a raw value: %v", o)
			}
		case headers.Bucket:
			buckets++
		}
	}
	if buckets != models || models > 1 {
		t.Fatalf("%d bucket and %d model headers set: %v", buckets, models, resp)
	}
	hs := req.GetRequestHeaders().GetHeaders().GetHeaders()
	if req.GetRequestBody() != nil {
		hs = st.hs
	}
	n := 0
	for _, h := range hs {
		if h.GetKey() == headers.Model {
			n++
		}
	}
	if models > 0 && n > 1 {
		t.Fatalf("routed a request with %d x-patchbay-model headers", n)
	}
}
