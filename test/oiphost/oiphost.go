// Package oiphost is a TEST-ONLY stand-in for an unmodified Open Inference Protocol server
// (Triton, KServe, MLServer) that holds several versions of a model. Like those servers it
// knows nothing of patchbay: it chooses the version from the request alone — the versioned
// REST path (/v2/models/<m>/versions/<v>/...) or the gRPC message's model_version — and
// ignores x-patchbay-version; a request that names no version runs its default version.
// Every answer says which version ran (model_version, and an output tensor "version"), and
// the host counts what each version served, so a test through the router can show that
// every answer came from the version the router chose.
package oiphost

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	grpchealth "google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/patchbay-io/patchbay/api/oip"
)

// Host is a running stand-in: REST on HTTP, gRPC on GRPC (host:port, 127.0.0.1).
type Host struct {
	HTTP, GRPC string
	Model      string
	Versions   []string
	Default    string

	served         map[string]*atomic.Int64 // version -> answers
	versionHeaders atomic.Int64             // requests that carried x-patchbay-version
	unversioned    atomic.Int64             // inference requests that named no version
}

// Start serves model with versions (the first is the default) until the test ends.
func Start(t testing.TB, model string, versions ...string) *Host {
	t.Helper()
	if len(versions) == 0 {
		t.Fatal("oiphost: at least one version")
	}
	h := &Host{Model: model, Versions: versions, Default: versions[0], served: map[string]*atomic.Int64{}}
	for _, v := range versions {
		h.served[v] = new(atomic.Int64)
	}
	hl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: h.Handler()}
	go hs.Serve(hl)
	gs := grpc.NewServer()
	oip.RegisterGRPCInferenceServiceServer(gs, &grpcService{h: h})
	health := grpchealth.NewServer() // overall health only: it knows nothing of patchbay's per-version names
	healthpb.RegisterHealthServer(gs, health)
	go gs.Serve(gl)
	t.Cleanup(func() { hs.Close(); gs.Stop() })
	h.HTTP, h.GRPC = hl.Addr().String(), gl.Addr().String()
	return h
}

// Served is how many inference answers version v gave.
func (h *Host) Served(v string) int64 {
	if c := h.served[v]; c != nil {
		return c.Load()
	}
	return 0
}

// Unversioned is how many inference requests named no version (answered by the default).
func (h *Host) Unversioned() int64 { return h.unversioned.Load() }

// VersionHeaders is how many requests carried x-patchbay-version (which the host ignored).
func (h *Host) VersionHeaders() int64 { return h.versionHeaders.Load() }

// resolve picks the version a request runs: the one it names, else the default.
func (h *Host) resolve(model, version string) (string, error) {
	if model != h.Model {
		return "", status.Errorf(codes.NotFound, "model %q not found", model)
	}
	if version == "" {
		h.unversioned.Add(1)
		return h.Default, nil
	}
	if !slices.Contains(h.Versions, version) {
		return "", status.Errorf(codes.NotFound, "model %q has no version %q", model, version)
	}
	return version, nil
}

type inferResponse struct {
	ModelName    string   `json:"model_name"`
	ModelVersion string   `json:"model_version"`
	Outputs      []output `json:"outputs"`
}

type output struct {
	Name     string   `json:"name"`
	Datatype string   `json:"datatype"`
	Shape    []int64  `json:"shape"`
	Data     []string `json:"data"`
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func writeErr(w http.ResponseWriter, err error) {
	code := http.StatusBadRequest
	if status.Code(err) == codes.NotFound {
		code = http.StatusNotFound
	}
	writeJSON(w, code, map[string]string{"error": status.Convert(err).Message()})
}

// Handler serves the OIP REST surface the router uses: health, model readiness and
// metadata, and infer, on the unversioned and the versioned paths.
func (h *Host) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v2/health/{what}", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, map[string]bool{r.PathValue("what"): true})
	})
	model := func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("x-patchbay-version") != "" {
			h.versionHeaders.Add(1)
		}
		rest := strings.TrimPrefix(r.URL.Path, "/v2/models/")
		parts := strings.Split(rest, "/")
		name, version, verb := parts[0], "", ""
		switch {
		case len(parts) >= 3 && parts[1] == "versions":
			version = parts[2]
			if len(parts) == 4 {
				verb = parts[3]
			} else if len(parts) > 4 {
				writeErr(w, status.Error(codes.NotFound, "no such path"))
				return
			}
		case len(parts) == 2:
			verb = parts[1]
		case len(parts) > 2:
			writeErr(w, status.Error(codes.NotFound, "no such path"))
			return
		}
		switch {
		case r.Method == http.MethodPost && verb == "infer":
			v, err := h.resolve(name, version)
			if err != nil {
				writeErr(w, err)
				return
			}
			h.served[v].Add(1)
			writeJSON(w, 200, inferResponse{ModelName: name, ModelVersion: v,
				Outputs: []output{{Name: "version", Datatype: "BYTES", Shape: []int64{1}, Data: []string{v}}}})
		case r.Method == http.MethodGet && verb == "ready":
			if name != h.Model || (version != "" && !slices.Contains(h.Versions, version)) {
				writeErr(w, status.Error(codes.NotFound, "not found"))
				return
			}
			writeJSON(w, 200, map[string]bool{"ready": true})
		case r.Method == http.MethodGet && verb == "":
			if name != h.Model {
				writeErr(w, status.Error(codes.NotFound, "not found"))
				return
			}
			writeJSON(w, 200, map[string]any{"name": name, "versions": h.Versions, "platform": "oiphost"})
		default:
			writeErr(w, status.Errorf(codes.NotFound, "%s %s not served", r.Method, r.URL.Path))
		}
	}
	mux.HandleFunc("/v2/models/", model)
	return mux
}

// grpcService answers ModelInfer from the message's model_version only (metadata ignored).
type grpcService struct {
	oip.UnimplementedGRPCInferenceServiceServer
	h *Host
}

func (g *grpcService) ServerLive(context.Context, *oip.ServerLiveRequest) (*oip.ServerLiveResponse, error) {
	return &oip.ServerLiveResponse{Live: true}, nil
}

func (g *grpcService) ServerReady(context.Context, *oip.ServerReadyRequest) (*oip.ServerReadyResponse, error) {
	return &oip.ServerReadyResponse{Ready: true}, nil
}

func (g *grpcService) ModelReady(_ context.Context, r *oip.ModelReadyRequest) (*oip.ModelReadyResponse, error) {
	if r.GetName() != g.h.Model || (r.GetVersion() != "" && !slices.Contains(g.h.Versions, r.GetVersion())) {
		return nil, status.Error(codes.NotFound, "not found")
	}
	return &oip.ModelReadyResponse{Ready: true}, nil
}

func (g *grpcService) ModelInfer(ctx context.Context, r *oip.ModelInferRequest) (*oip.ModelInferResponse, error) {
	if md, ok := metadataVersion(ctx); ok && md != "" {
		g.h.versionHeaders.Add(1)
	}
	v, err := g.h.resolve(r.GetModelName(), r.GetModelVersion())
	if err != nil {
		return nil, err
	}
	g.h.served[v].Add(1)
	return &oip.ModelInferResponse{ModelName: r.GetModelName(), ModelVersion: v, Id: r.GetId(),
		Outputs: []*oip.ModelInferResponse_InferOutputTensor{{Name: "version", Datatype: "BYTES", Shape: []int64{1},
			Contents: &oip.InferTensorContents{BytesContents: [][]byte{[]byte(v)}}}}}, nil
}

func metadataVersion(ctx context.Context) (string, bool) {
	if v := metadata.ValueFromIncomingContext(ctx, "x-patchbay-version"); len(v) > 0 {
		return v[0], true
	}
	return "", false
}
