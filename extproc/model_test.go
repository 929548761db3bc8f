package extproc

import (
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/testing/protocmp"

	"github.com/patchbay-io/patchbay/api/headers"
)

// grpcRefusal is the immediate answer refusing a gRPC request with a gRPC status.
func grpcRefusal(code codes.Code, msg string) *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{ImmediateResponse: &extprocv3.ImmediateResponse{
		Status:     &typev3.HttpStatus{Code: typev3.StatusCode_OK},
		GrpcStatus: &extprocv3.GrpcStatus{Status: uint32(code)},
		Headers:    &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{set("grpc-message", msg)}},
		Details:    msg,
	}}}
}

// TestOneModelPerRequest plays Envoy's message sequences for requests that name their
// model more than once: a repeated x-patchbay-model (Envoy sends each occurrence as its
// own HeaderValue) or a path and header that disagree is refused, and every routed answer
// overwrites x-patchbay-model with the model decided, so Envoy's route cannot differ.
func TestOneModelPerRequest(t *testing.T) {
	t.Parallel()
	h := startServer(t, Config{}, testPolicy("c1"))
	noPolicy := startServer(t, Config{}, nil)
	const grpcPath = headers.GRPCInferencePrefix + "ModelInfer"
	const (
		repeated2 = `x-patchbay-model given 2 times: a request names one model`
		mismatch  = `path names model "ranker" but x-patchbay-model names "thumbs": a request names one model`
	)
	tests := []struct {
		name string
		h    *harness
		msgs []*extprocv3.ProcessingRequest
		want []*extprocv3.ProcessingResponse
	}{
		{
			name: "REST: path and header name different models: 400",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(false, ":path", "/v2/models/ranker/infer", headers.Model, "thumbs", headers.UserID, "u1")},
			want: []*extprocv3.ProcessingResponse{immediate(typev3.StatusCode_BadRequest, mismatch, `{"error":"path names model \"ranker\" but x-patchbay-model names \"thumbs\": a request names one model"}`)},
		},
		{
			name: "REST: empty header beside a model path: 400",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(true, ":path", "/v2/models/ranker/infer", headers.Model, "")},
			want: []*extprocv3.ProcessingResponse{immediate(typev3.StatusCode_BadRequest,
				`path names model "ranker" but x-patchbay-model names "": a request names one model`,
				`{"error":"path names model \"ranker\" but x-patchbay-model names \"\": a request names one model"}`)},
		},
		{
			name: "REST: header repeated with the path's model: 400",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(false, ":path", "/v2/models/ranker/infer", headers.Model, "ranker", headers.UserID, "u1", headers.Model, "ranker")},
			want: []*extprocv3.ProcessingResponse{immediate(typev3.StatusCode_BadRequest, repeated2, `{"error":"x-patchbay-model given 2 times: a request names one model"}`)},
		},
		{
			name: "gRPC: header repeated with two models: INVALID_ARGUMENT",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(false, ":path", grpcPath, "content-type", "application/grpc", headers.Model, "ranker", headers.Model, "thumbs", headers.UserID, "u1")},
			want: []*extprocv3.ProcessingResponse{grpcRefusal(codes.InvalidArgument, repeated2)},
		},
		{
			name: "gRPC on a non-OIP path: header repeated three times: INVALID_ARGUMENT",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(false, ":path", "/other.Service/Call", "content-type", "application/grpc+proto",
				headers.Model, "ranker", headers.Model, "ranker", headers.Model, "ranker")},
			want: []*extprocv3.ProcessingResponse{grpcRefusal(codes.InvalidArgument, `x-patchbay-model given 3 times: a request names one model`)},
		},
		{
			name: "no policy yet: still refused",
			h:    noPolicy,
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(false, ":path", grpcPath, "content-type", "application/grpc", headers.Model, "ranker", headers.Model, "thumbs")},
			want: []*extprocv3.ProcessingResponse{grpcRefusal(codes.InvalidArgument, repeated2)},
		},
		{
			name: "no policy yet: REST mismatch refused",
			h:    noPolicy,
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(false, ":path", "/v2/models/ranker/infer", headers.Model, "thumbs")},
			want: []*extprocv3.ProcessingResponse{immediate(typev3.StatusCode_BadRequest, mismatch, `{"error":"path names model \"ranker\" but x-patchbay-model names \"thumbs\": a request names one model"}`)},
		},
		{
			name: "REST: path alone: the answer sets x-patchbay-model",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(false, ":path", "/v2/models/ranker/infer", headers.UserID, "u1")},
			want: []*extprocv3.ProcessingResponse{routed(nil, set(headers.Model, "ranker"), bucketOf("ranker-salt", "u1"))},
		},
		{
			name: "REST: path and the same header: routed, header overwritten",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(false, ":path", "/v2/models/thumbs/versions/v2/infer", headers.Model, "thumbs", headers.UserID, "u1")},
			want: []*extprocv3.ProcessingResponse{routed(nil, set(headers.Model, "thumbs"), bucketOf("thumbs-salt", "u1"), set(headers.Version, "v2"))},
		},
		{
			name: "gRPC: one header: routed, header overwritten",
			msgs: []*extprocv3.ProcessingRequest{reqHeaders(false, ":path", grpcPath, "content-type", "application/grpc", headers.Model, "ranker", headers.UserID, "u1")},
			want: []*extprocv3.ProcessingResponse{routed(nil, set(headers.Model, "ranker"), bucketOf("ranker-salt", "u1"))},
		},
		{
			name: "body mode: the body answer sets x-patchbay-model",
			msgs: []*extprocv3.ProcessingRequest{
				reqHeaders(false, ":path", "/v2/models/thumbs/infer", headers.Model, "thumbs"),
				bodyMsg(`{"parameters":{"x-user-id":"u5"}}`, true),
			},
			want: []*extprocv3.ProcessingResponse{
				{
					Response:     &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{}}},
					ModeOverride: bodyOverride,
				},
				bodyRouted(set(headers.Model, "thumbs"), bucketOf("thumbs-salt", "u5")),
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			hh := tt.h
			if hh == nil {
				hh = h
			}
			got, err := hh.exchange(t, tt.msgs...)
			if err != nil {
				t.Fatalf("stream: %v", err)
			}
			if diff := cmp.Diff(tt.want, got, protocmp.Transform()); diff != "" {
				t.Errorf("answers (-want +got):\n%s", diff)
			}
		})
	}
}
