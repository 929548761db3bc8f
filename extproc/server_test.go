package extproc

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/testing/protocmp"

	"github.com/patchbay-io/patchbay/api/headers"
	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
)

var (
	respHeadersMsg  = &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{ResponseHeaders: &extprocv3.HttpHeaders{}}}
	reqBodyMsg      = &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: []byte("{}"), EndOfStream: true}}}
	respBodyMsg     = &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{ResponseBody: &extprocv3.HttpBody{Body: []byte("{}"), EndOfStream: true}}}
	reqTrailersMsg  = &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestTrailers{RequestTrailers: &extprocv3.HttpTrailers{}}}
	respTrailersMsg = &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseTrailers{ResponseTrailers: &extprocv3.HttpTrailers{}}}

	emptyReqHeaders   = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{}}}
	emptyRespHeaders  = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{ResponseHeaders: &extprocv3.HeadersResponse{}}}
	emptyReqBody      = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{}}}
	emptyRespBody     = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{ResponseBody: &extprocv3.BodyResponse{}}}
	emptyReqTrailers  = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestTrailers{RequestTrailers: &extprocv3.TrailersResponse{}}}
	emptyRespTrailers = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseTrailers{ResponseTrailers: &extprocv3.TrailersResponse{}}}
)

func immediate(code typev3.StatusCode, details, body string) *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{ImmediateResponse: &extprocv3.ImmediateResponse{
		Status:  &typev3.HttpStatus{Code: code},
		Headers: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{set("content-type", "application/json")}},
		Body:    []byte(body),
		Details: details,
	}}}
}

func TestProcessSequences(t *testing.T) {
	t.Parallel()
	h := startServer(t, Config{}, testPolicy("c1"))

	// Users chosen by the contract's formulas, not by the code under test.
	treated := userIn(t, func(id string) bool {
		return slot("L1", id) < 2000 && policyv1.Hash("ltv", id)%100 >= 30 && slot("L2", id) >= 5000
	})
	both := userIn(t, func(id string) bool {
		return slot("L1", id) < 2000 && policyv1.Hash("ltv", id)%100 < 30 && slot("L2", id) < 5000 && policyv1.Hash("color", id)%2 == 1
	})
	colorOnly := userIn(t, func(id string) bool {
		return slot("L1", id) >= 2000 && slot("L2", id) < 5000 && policyv1.Hash("color", id)%2 == 0
	})
	nobody := userIn(t, func(id string) bool { return slot("L1", id) >= 2000 && slot("L2", id) >= 5000 })

	tests := []struct {
		name string
		msgs []*extprocv3.ProcessingRequest
		want []*extprocv3.ProcessingResponse
	}{
		{
			name: "headers only, experiment arm decides the version",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(false, ":path", "/v2/models/ranker/infer", headers.UserID, treated)},
			want: []*extprocv3.ProcessingResponse{routed(nil, set(headers.Model, "ranker"), bucketOf("ranker-salt", treated), set(headers.Version, "v8"), set(headers.Experiments, "ltv=treatment"))},
		},
		{
			name: "two layers: first experiment in file order decides",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(true, ":path", "/v2/models/ranker/infer", headers.UserID, both)},
			want: []*extprocv3.ProcessingResponse{routed(nil, set(headers.Model, "ranker"), bucketOf("ranker-salt", both), set(headers.Version, "v7"), set(headers.Experiments, "ltv=control,color=b"))},
		},
		{
			name: "second layer alone",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(true, ":path", "/v2/models/ranker/infer", headers.UserID, colorOnly)},
			want: []*extprocv3.ProcessingResponse{routed(nil, set(headers.Model, "ranker"), bucketOf("ranker-salt", colorOnly), set(headers.Version, "v7"), set(headers.Experiments, "color=a"))},
		},
		{
			name: "no experiment: bucket only; forbidden client headers removed",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(true, ":path", "/v2/models/ranker/infer", headers.UserID, nobody,
				headers.Version, "v8", headers.Experiments, "ltv=treatment", headers.Bucket, "1", headers.ServedBy, "x", headers.Model, "ranker")},
			want: []*extprocv3.ProcessingResponse{routed([]string{headers.Version, headers.Experiments, headers.ServedBy}, set(headers.Model, "ranker"), bucketOf("ranker-salt", nobody))},
		},
		{
			name: "unknown x-patchbay-* client headers removed too",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(true, ":path", "/v2/models/ranker/infer", headers.UserID, nobody,
				"x-patchbay-arm", "treatment", headers.Bucket, "1", headers.Version, "v7", "x-patchbay-arm", "again")},
			want: []*extprocv3.ProcessingResponse{routed([]string{headers.Version, "x-patchbay-arm"}, set(headers.Model, "ranker"), bucketOf("ranker-salt", nobody))},
		},
		{
			// Envoy's early header mutation set it (the client's own was removed first), and
			// Envoy selects the route scope by it again after this answer: removing it would
			// leave every routed request without a scope (404).
			name: "x-patchbay-route-key is Envoy's: kept, with other x-patchbay-* removed",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(true, ":path", "/v2/models/ranker/infer", headers.UserID, nobody,
				headers.RouteKey, "/v2/models/ranker/infer///", "x-patchbay-arm", "treatment")},
			want: []*extprocv3.ProcessingResponse{routed([]string{"x-patchbay-arm"}, set(headers.Model, "ranker"), bucketOf("ranker-salt", nobody))},
		},
		{
			name: "x-patchbay-route-key alone: nothing removed",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(true, ":path", "/v2/models/ranker/infer", headers.UserID, nobody,
				headers.RouteKey, "/v2/models/ranker/infer///")},
			want: []*extprocv3.ProcessingResponse{routed(nil, set(headers.Model, "ranker"), bucketOf("ranker-salt", nobody))},
		},
		{
			name: "non-model path: unknown x-patchbay-* removed",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(true, ":path", "/v2", "x-patchbay-debug", "1")},
			want: []*extprocv3.ProcessingResponse{{Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{
				Response: &extprocv3.CommonResponse{HeaderMutation: &extprocv3.HeaderMutation{RemoveHeaders: []string{"x-patchbay-debug"}}}}}}},
		},
		{
			name: "gRPC OIP: model from x-patchbay-model",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(false, ":path", headers.GRPCInferencePrefix+"ModelInfer", "content-type", "application/grpc", headers.Model, "ranker", headers.UserID, nobody)},
			want: []*extprocv3.ProcessingResponse{routed(nil, set(headers.Model, "ranker"), bucketOf("ranker-salt", nobody))},
		},
		{
			name: "allowed pin",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(true, ":path", "/v2/models/thumbs/versions/v2/infer", headers.UserID, "u1")},
			want: []*extprocv3.ProcessingResponse{routed(nil, set(headers.Model, "thumbs"), bucketOf("thumbs-salt", "u1"), set(headers.Version, "v2"))},
		},
		{
			name: "non-model path passes untouched",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(true, ":path", "/v2/health/ready", headers.UserID, "u1")},
			want: []*extprocv3.ProcessingResponse{emptyReqHeaders},
		},
		{
			name: "non-model path still loses forbidden headers",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(true, ":path", "/v2", headers.Version, "v8")},
			want: []*extprocv3.ProcessingResponse{{Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{
				Response: &extprocv3.CommonResponse{HeaderMutation: &extprocv3.HeaderMutation{RemoveHeaders: []string{headers.Version}}}}}}},
		},
		{
			name: "unknown model: OIP 404",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(false, ":path", "/v2/models/nope/infer")},
			want: []*extprocv3.ProcessingResponse{immediate(typev3.StatusCode_NotFound, `unknown model "nope"`, `{"error":"unknown model \"nope\""}`)},
		},
		{
			name: "pin not allowed: OIP 403",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(false, ":path", "/v2/models/ranker/versions/v8/infer", headers.UserID, "u1")},
			want: []*extprocv3.ProcessingResponse{immediate(typev3.StatusCode_Forbidden, `model "ranker": requests may not name a version (pinning is off for this model)`, `{"error":"model \"ranker\": requests may not name a version (pinning is off for this model)"}`)},
		},
		{
			name: "pin of an unknown version: OIP 404",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(false, ":path", "/v2/models/thumbs/versions/v9")},
			want: []*extprocv3.ProcessingResponse{immediate(typev3.StatusCode_NotFound, `model "thumbs": unknown version "v9"`, `{"error":"model \"thumbs\": unknown version \"v9\""}`)},
		},
		{
			name: "unknown model over gRPC: gRPC NOT_FOUND",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(false, ":path", headers.GRPCInferencePrefix+"ModelInfer", "content-type", "application/grpc", headers.Model, "nope")},
			want: []*extprocv3.ProcessingResponse{{Response: &extprocv3.ProcessingResponse_ImmediateResponse{ImmediateResponse: &extprocv3.ImmediateResponse{
				Status:     &typev3.HttpStatus{Code: typev3.StatusCode_OK},
				GrpcStatus: &extprocv3.GrpcStatus{Status: uint32(codes.NotFound)},
				Headers:    &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{set("grpc-message", `unknown model "nope"`)}},
				Details:    `unknown model "nope"`,
			}}}},
		},
		{
			name: "every phase Envoy may send is answered in kind",
			msgs: []*extprocv3.ProcessingRequest{
				reqHeaders(false, ":path", "/v2/models/ranker/infer", headers.UserID, nobody),
				reqBodyMsg, reqTrailersMsg, respHeadersMsg, respBodyMsg, respTrailersMsg,
			},
			want: []*extprocv3.ProcessingResponse{
				routed(nil, set(headers.Model, "ranker"), bucketOf("ranker-salt", nobody)),
				emptyReqBody, emptyReqTrailers, emptyRespHeaders, emptyRespBody, emptyRespTrailers,
			},
		},
		{
			name: "unexpected order: response phases without request headers",
			msgs: []*extprocv3.ProcessingRequest{respHeadersMsg, respTrailersMsg, reqBodyMsg},
			want: []*extprocv3.ProcessingResponse{emptyRespHeaders, emptyRespTrailers, emptyReqBody},
		},
		{
			name: "streamed body chunks are answered one by one",
			msgs: []*extprocv3.ProcessingRequest{
				{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: []byte("a")}}},
				{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: []byte("b"), EndOfStream: true}}},
			},
			want: []*extprocv3.ProcessingResponse{emptyReqBody, emptyReqBody},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			got, err := h.exchange(t, tt.msgs...)
			if err != nil {
				t.Fatalf("stream: %v", err)
			}
			if diff := cmp.Diff(tt.want, got, protocmp.Transform()); diff != "" {
				t.Errorf("answers (-want +got):\n%s", diff)
			}
		})
	}
}

func TestProcessRejectsEmptyMessage(t *testing.T) {
	t.Parallel()
	h := startServer(t, Config{}, testPolicy("c1"))
	_, err := h.exchange(t, &extprocv3.ProcessingRequest{})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("empty message: %v, want InvalidArgument", err)
	}
	// The server is unharmed.
	got, err := h.exchange(t, reqHeaders(true, ":path", "/v2"))
	if err != nil || len(got) != 1 {
		t.Fatalf("after a bad stream: %v %v", got, err)
	}
}

func TestObservabilityModeIsNotAnswered(t *testing.T) {
	t.Parallel()
	h := startServer(t, Config{}, testPolicy("c1"))
	m1 := reqHeaders(false, ":path", "/v2/models/ranker/infer", headers.UserID, "u1")
	m1.ObservabilityMode = true
	m2 := &extprocv3.ProcessingRequest{ObservabilityMode: true, Request: &extprocv3.ProcessingRequest_ResponseHeaders{ResponseHeaders: &extprocv3.HttpHeaders{}}}
	got, err := h.exchange(t, m1, m2)
	if err != nil || len(got) != 0 {
		t.Fatalf("observability mode answered: %v %v", got, err)
	}
}

func TestNoPolicyDecidesNothing(t *testing.T) {
	t.Parallel()
	h := startServer(t, Config{}, nil)
	got, err := h.exchange(t, reqHeaders(true, ":path", "/v2/models/ranker/infer", headers.UserID, "u1"))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]*extprocv3.ProcessingResponse{emptyReqHeaders}, got, protocmp.Transform()); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	got, err = h.exchange(t, reqHeaders(true, ":path", "/v2/models/ranker/infer", headers.Version, "v8", headers.Model, "ranker", "x-patchbay-x", "1"))
	if err != nil {
		t.Fatal(err)
	}
	want := &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{
		Response: &extprocv3.CommonResponse{HeaderMutation: &extprocv3.HeaderMutation{RemoveHeaders: []string{headers.Version, "x-patchbay-x"}}}}}}
	if diff := cmp.Diff([]*extprocv3.ProcessingResponse{want}, got, protocmp.Transform()); diff != "" {
		t.Errorf("forbidden headers without a policy (-want +got):\n%s", diff)
	}
}

func bodyMsg(body string, eos bool) *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: []byte(body), EndOfStream: eos}}}
}

func bodyRouted(sets ...*corev3.HeaderValueOption) *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{
		Response: &extprocv3.CommonResponse{HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: sets}, ClearRouteCache: true},
	}}}
}

func TestBodyMode(t *testing.T) {
	t.Parallel()
	h := startServer(t, Config{}, testPolicy("c1"))
	const body = `{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}],"parameters":{"x-user-id":"u5"}}`

	t.Run("headers + buffered body via mode_override", func(t *testing.T) {
		first := reqHeaders(false, ":path", "/v2/models/thumbs/infer", headers.Bucket, "7")
		first.ProtocolConfig = &extprocv3.ProtocolConfiguration{RequestBodyMode: filterv3.ProcessingMode_NONE}
		got, err := h.exchange(t, first, bodyMsg(body, true))
		if err != nil {
			t.Fatal(err)
		}
		want := []*extprocv3.ProcessingResponse{
			{
				Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{
					HeaderMutation: &extprocv3.HeaderMutation{RemoveHeaders: []string{headers.Bucket}},
				}}},
				ModeOverride: &filterv3.ProcessingMode{
					RequestHeaderMode: filterv3.ProcessingMode_SEND, ResponseHeaderMode: filterv3.ProcessingMode_SKIP,
					RequestBodyMode: filterv3.ProcessingMode_BUFFERED, ResponseBodyMode: filterv3.ProcessingMode_NONE,
					RequestTrailerMode: filterv3.ProcessingMode_SKIP, ResponseTrailerMode: filterv3.ProcessingMode_SKIP,
				},
			},
			bodyRouted(set(headers.Model, "thumbs"), bucketOf("thumbs-salt", "u5")),
		}
		if diff := cmp.Diff(want, got, protocmp.Transform()); diff != "" {
			t.Errorf("(-want +got):\n%s", diff)
		}
	})
	t.Run("filter already buffers: no override; one body message not marked final", func(t *testing.T) {
		// Envoy sends the buffered body with end_of_stream false when trailers follow (and
		// BUFFERED_PARTIAL does when its limit is reached): it is still the whole message.
		first := reqHeaders(false, ":path", "/v2/models/thumbs/infer")
		first.ProtocolConfig = &extprocv3.ProtocolConfiguration{RequestBodyMode: filterv3.ProcessingMode_BUFFERED_PARTIAL}
		got, err := h.exchange(t, first, bodyMsg(body, false))
		if err != nil {
			t.Fatal(err)
		}
		want := []*extprocv3.ProcessingResponse{
			{Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{}}}},
			bodyRouted(set(headers.Model, "thumbs"), bucketOf("thumbs-salt", "u5")),
		}
		if diff := cmp.Diff(want, got, protocmp.Transform()); diff != "" {
			t.Errorf("(-want +got):\n%s", diff)
		}
	})
	t.Run("identity in headers: decided on headers", func(t *testing.T) {
		got, err := h.exchange(t, reqHeaders(false, ":path", "/v2/models/thumbs/infer", headers.UserID, "u6"))
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff([]*extprocv3.ProcessingResponse{routed(nil, set(headers.Model, "thumbs"), bucketOf("thumbs-salt", "u6"))}, got, protocmp.Transform()); diff != "" {
			t.Errorf("(-want +got):\n%s", diff)
		}
	})
	for name, first := range map[string]*extprocv3.ProcessingRequest{
		"no body at all": reqHeaders(true, ":path", "/v2/models/thumbs/infer"),
		"body sent without waiting for us": func() *extprocv3.ProcessingRequest {
			r := reqHeaders(false, ":path", "/v2/models/thumbs/infer")
			r.ProtocolConfig = &extprocv3.ProtocolConfiguration{SendBodyWithoutWaitingForHeaderResponse: true}
			return r
		}(),
	} {
		t.Run(name+": random bucket at once", func(t *testing.T) {
			got, err := h.exchange(t, first)
			if err != nil || len(got) != 1 {
				t.Fatalf("%v %v", got, err)
			}
			m := got[0].GetRequestHeaders().GetResponse().GetHeaderMutation()
			if len(m.GetSetHeaders()) != 2 || m.GetSetHeaders()[0].GetHeader().GetKey() != headers.Model || m.GetSetHeaders()[1].GetHeader().GetKey() != headers.Bucket || got[0].GetModeOverride() != nil {
				t.Errorf("want the model and a bucket and no override, got %v", got[0])
			}
		})
	}
}

func TestIdentityFromBody(t *testing.T) {
	t.Parallel()
	names := []string{"x-account", "x-user-id"}
	tests := []struct {
		body, want string
		ok         bool
	}{
		{`{"parameters":{"x-user-id":"u1"}}`, "u1", true},
		{`{"parameters":{"x-user-id":"u1","x-account":"a1"}}`, "a1", true},
		{`{"parameters":{"x-user-id":12345}}`, "12345", true},
		{`{"parameters":{"x-user-id":""}}`, "", false},
		{`{"parameters":{"x-user-id":{"a":1}}}`, "", false},
		{`{"inputs":[]}`, "", false},
		{`not json`, "", false},
		{``, "", false},
	}
	for _, tt := range tests {
		got, ok := IdentityFromBody([]byte(tt.body), names)
		if got != tt.want || ok != tt.ok {
			t.Errorf("IdentityFromBody(%s) = %q, %v; want %q, %v", tt.body, got, ok, tt.want, tt.ok)
		}
	}
}

func FuzzIdentityFromBody(f *testing.F) {
	f.Add([]byte(`{"parameters":{"x-user-id":"u1"}}`))
	f.Add([]byte(`{"parameters":{"x-user-id":1e400}}`))
	f.Add([]byte(`{"parameters":null,"inputs":[{"data":[1,2,3]}]}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		if id, ok := IdentityFromBody(body, []string{"x-user-id"}); ok && id == "" {
			t.Fatal("ok with an empty identity")
		}
	})
}

func TestHealthAndReadiness(t *testing.T) {
	t.Parallel()
	h := startServer(t, Config{}, nil)
	hc := healthpb.NewHealthClient(h.conn)
	admin := httptest.NewServer(h.srv.AdminHandler(http.NotFoundHandler()))
	t.Cleanup(admin.Close)
	check := func(wantHealth healthpb.HealthCheckResponse_ServingStatus, wantReady int) {
		t.Helper()
		for _, svc := range []string{"", ServiceName} {
			r, err := hc.Check(context.Background(), &healthpb.HealthCheckRequest{Service: svc})
			if err != nil || r.GetStatus() != wantHealth {
				t.Errorf("health %q = %v, %v; want %v", svc, r.GetStatus(), err, wantHealth)
			}
		}
		resp, err := http.Get(admin.URL + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != wantReady {
			t.Errorf("/readyz = %d %s, want %d", resp.StatusCode, b, wantReady)
		}
	}
	check(healthpb.HealthCheckResponse_NOT_SERVING, http.StatusServiceUnavailable)
	if h.srv.Ready() || h.srv.ConfigVersion() != "" {
		t.Error("ready before a policy")
	}
	if err := h.srv.SetPolicy(&policyv1.Policy{Models: []*policyv1.Model{{Name: "m"}}}); err == nil || h.srv.Ready() {
		t.Fatalf("invalid policy accepted: %v", err)
	}
	if err := h.srv.SetPolicy(testPolicy("c9")); err != nil {
		t.Fatal(err)
	}
	check(healthpb.HealthCheckResponse_SERVING, http.StatusOK)
	if !h.srv.Ready() || h.srv.ConfigVersion() != "c9" {
		t.Errorf("Ready %v version %q", h.srv.Ready(), h.srv.ConfigVersion())
	}
}

func TestServeStopsOnCancel(t *testing.T) {
	t.Parallel()
	srv, err := New(Config{ShutdownGrace: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	lis := newLocalListener(t)
	if err := srv.Serve(ctx, lis); err != nil {
		t.Fatalf("Serve after cancel: %v", err)
	}
	if err := srv.Serve(context.Background(), lis); err == nil || !strings.Contains(err.Error(), "twice") {
		t.Errorf("second Serve: %v", err)
	}
}

// TestExperimentsHeaderBeyondPrecomputed covers models with too many exposure
// combinations to precompute: the header is then assembled per request.
func TestExperimentsHeaderBeyondPrecomputed(t *testing.T) {
	t.Parallel()
	p := &policyv1.Policy{ConfigVersion: "many", Models: []*policyv1.Model{{Name: "m", Salt: "ms", Versions: []string{"v1", "v2"}}}}
	for _, l := range []string{"a", "b", "c"} {
		p.Layers = append(p.Layers, &policyv1.Layer{Name: l, Salt: "L" + l})
		e := &policyv1.Experiment{Name: "e" + l, Layer: l, SlotStart: 0, SlotEnd: policyv1.LayerSlots, Salt: "S" + l}
		for i := range 20 {
			e.Arms = append(e.Arms, &policyv1.Arm{Name: "arm" + strconv.Itoa(i), Version: []string{"v1", "v2"}[i%2], Weight: 1})
		}
		p.Models[0].Experiments = append(p.Models[0].Experiments, e)
	}
	h := startServer(t, Config{}, p)
	for _, id := range []string{"u1", "u2", "u3"} {
		got, err := h.exchange(t, reqHeaders(true, ":path", "/v2/models/m/infer", headers.UserID, id))
		if err != nil {
			t.Fatal(err)
		}
		arm := func(l string) int { return int(policyv1.Hash("S"+l, id) % 20) }
		want := routed(nil, set(headers.Model, "m"), bucketOf("ms", id), set(headers.Version, []string{"v1", "v2"}[arm("a")%2]),
			set(headers.Experiments, fmt.Sprintf("ea=arm%d,eb=arm%d,ec=arm%d", arm("a"), arm("b"), arm("c"))))
		if diff := cmp.Diff([]*extprocv3.ProcessingResponse{want}, got, protocmp.Transform()); diff != "" {
			t.Errorf("user %s (-want +got):\n%s", id, diff)
		}
	}
}
