package envoymodel

import (
	"io"
	"net/http"
	"strconv"
	"strings"
)

// Server returns an http.Server that serves p over HTTP/1.1 and HTTP/2: without TLS by prior
// knowledge (as gRPC clients speak to a plaintext Envoy listener), and over TLS by ALPN when
// it serves a Listener-wrapped listener and the listener config has TLS.
func (p *Proxy) Server() *http.Server {
	protos := new(http.Protocols)
	protos.SetHTTP1(true)
	protos.SetHTTP2(true)
	protos.SetUnencryptedHTTP2(true)
	return &http.Server{Handler: p, Protocols: protos}
}

// isGRPC is Envoy's test for a gRPC request: a path and a content-type that is exactly
// application/grpc or starts with application/grpc+ (application/grpc-web is not gRPC)
// (envoy source/common/grpc/common.cc, Common::isGrpcRequestHeaders, hasGrpcContentType).
func isGRPC(req *http.Request) bool {
	ct := req.Header.Get("Content-Type")
	return req.URL.Path != "" && strings.HasPrefix(ct, "application/grpc") &&
		(len(ct) == len("application/grpc") || ct[len("application/grpc")] == '+')
}

// localReply answers as Envoy's sendLocalReply does (envoy source/common/http/utility.cc,
// Utility::prepareLocalReply and encodeLocalReply): the route's response headers are applied
// first; then a gRPC request gets a trailers-only answer — :status 200, content-type
// application/grpc, grpc-status (a grpc-status already among the headers wins, then
// grpcStatus when >= 0, else httpToGrpcStatus(code)) and the body, percent-encoded, as
// grpc-message, with no body; any other request gets code, the body, and content-type
// text/plain unless the headers set one.
func localReply(w http.ResponseWriter, req *http.Request, code int, body string, hdrs http.Header, grpcStatus int) {
	out := w.Header()
	for k, vs := range hdrs {
		out[k] = append([]string(nil), vs...)
	}
	if isGRPC(req) {
		out.Set("Content-Type", "application/grpc")
		if out.Get("Grpc-Status") == "" {
			if grpcStatus < 0 {
				grpcStatus = httpToGrpcStatus(code)
			}
			out.Set("Grpc-Status", strconv.Itoa(grpcStatus))
		}
		if body != "" && req.Method != http.MethodHead {
			out.Set("Grpc-Message", percentEncode(body))
		}
		out.Del("Content-Length")
		w.WriteHeader(http.StatusOK)
		return
	}
	if body == "" {
		out.Del("Content-Type")
		out.Del("Content-Length")
		w.WriteHeader(code)
		return
	}
	if out.Get("Content-Type") == "" {
		out.Set("Content-Type", "text/plain")
	}
	out.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(code)
	if req.Method != http.MethodHead {
		io.WriteString(w, body)
	}
}

// httpToGrpcStatus is Envoy's mapping (envoy source/common/grpc/status.cc,
// Utility::httpToGrpcStatus, after grpc's doc/http-grpc-status-mapping.md).
func httpToGrpcStatus(code int) int {
	switch code {
	case 400:
		return 13 // INTERNAL
	case 401:
		return 16 // UNAUTHENTICATED
	case 403:
		return 7 // PERMISSION_DENIED
	case 404:
		return 12 // UNIMPLEMENTED
	case 429, 502, 503, 504:
		return 14 // UNAVAILABLE
	default:
		return 2 // UNKNOWN
	}
}

// percentEncode encodes grpc-message as Envoy's PercentEncoding::encode does for it: bytes
// outside ' '..'~', and '%', become %XX.
func percentEncode(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < ' ' || c > '~' || c == '%' {
			b.WriteString("%" + strings.ToUpper(strconv.FormatUint(uint64(c)>>4, 16)+strconv.FormatUint(uint64(c)&15, 16)))
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}
