package extproc

import (
	"net/url"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/patchbay-io/patchbay/api/headers"
)

// TestGRPCRefusalsAsEnvoyDeliversThem pins what a gRPC client gets when ext_proc refuses
// its request. Envoy turns the ImmediateResponse into a local reply
// (source/extensions/filters/http/ext_proc/ext_proc.cc, Filter::sendImmediateResponse):
// grpc_status becomes grpc-status, and for a gRPC request the reply is trailers-only
// (source/common/http/utility.cc, prepareLocalReply). grpc-message comes from the body
// when it is non-empty, else from the headers ext_proc set; so the answer must carry no
// body, a percent-encoded grpc-message that decodes to Details, and append: false (the
// field Envoy reads). Unknown models answer NOT_FOUND, the status Envoy's own direct
// response for a model it has no route for gives too (xds/translate).
func TestGRPCRefusalsAsEnvoyDeliversThem(t *testing.T) {
	t.Parallel()
	h := startServer(t, Config{}, testPolicy("c1"))
	grpcPath := headers.GRPCInferencePrefix + "ModelInfer"
	for _, tc := range []struct {
		name  string
		model []string
		code  codes.Code
		msg   string
	}{
		{"unknown model", []string{"nope"}, codes.NotFound, `unknown model "nope"`},
		{"unknown model, name needing percent-encoding", []string{"größe%"}, codes.NotFound, `unknown model "größe%"`},
		{"two models", []string{"ranker", "thumbs"}, codes.InvalidArgument, `x-patchbay-model given 2 times: a request names one model`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kv := []string{":path", grpcPath, "content-type", "application/grpc"}
			for _, m := range tc.model {
				kv = append(kv, headers.Model, m)
			}
			got, err := h.exchange(t, reqHeaders(false, kv...))
			if err != nil || len(got) != 1 {
				t.Fatalf("exchange = %v, %v", got, err)
			}
			ir := got[0].GetImmediateResponse()
			if ir == nil {
				t.Fatalf("answer %v, want an ImmediateResponse", got[0])
			}
			if c := codes.Code(ir.GetGrpcStatus().GetStatus()); ir.GetGrpcStatus() == nil || c != tc.code {
				t.Errorf("grpc_status = %v, want %v", ir.GetGrpcStatus(), tc.code)
			}
			if ir.GetStatus().GetCode() != 200 {
				t.Errorf("HTTP status %v, want 200 (gRPC replies are trailers-only with :status 200)", ir.GetStatus())
			}
			if len(ir.GetBody()) != 0 {
				t.Errorf("body %q: Envoy would send it as grpc-message instead of the header", ir.GetBody())
			}
			if ir.GetDetails() != tc.msg {
				t.Errorf("details %q, want %q", ir.GetDetails(), tc.msg)
			}
			var msgs int
			for _, o := range ir.GetHeaders().GetSetHeaders() {
				if o.GetHeader().GetKey() != "grpc-message" {
					continue
				}
				msgs++
				raw := string(o.GetHeader().GetRawValue())
				for i := 0; i < len(raw); i++ {
					if raw[i] < ' ' || raw[i] > '~' {
						t.Fatalf("grpc-message %q is not percent-encoded ASCII", raw)
					}
				}
				if dec, err := url.PathUnescape(raw); err != nil || dec != tc.msg {
					t.Errorf("grpc-message %q decodes to %q (%v), want %q", raw, dec, err, tc.msg)
				}
				if o.GetAppend() == nil || o.GetAppend().GetValue() {
					t.Errorf("grpc-message option %v: want append: false", o)
				}
			}
			if msgs != 1 {
				t.Errorf("%d grpc-message headers, want 1: %v", msgs, ir)
			}
		})
	}
}
