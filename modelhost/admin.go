package modelhost

import (
	"context"
	"errors"
	"net/http"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	grpchealth "google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/modelhost/internal/bearer"
)

// The admin listener serves, on one port: GET /metrics, GET /v2/health/live|ready, the
// repository extension over REST (POST /v2/repository/...) and over gRPC
// (RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload, plus ServerLive,
// ServerReady, ServerMetadata and grpc.health.v1). gRPC shares the port through net/http:
// HTTP/2 requests with content type application/grpc go to a grpc.Server's ServeHTTP
// (cleartext HTTP/2 with prior knowledge, or h2 over TLS by ALPN). That handler is slower
// than grpc-go's own transport, which does not matter for a handful of operator calls and
// keeps one admin port and one place for authentication. The repository calls need
// "Authorization: Bearer <token>" (HTTP header or gRPC metadata).

const adminMaxMsg = 1 << 20 // repository requests are a model name

var (
	errRepoDisabled = &apiError{http.StatusForbidden, codes.PermissionDenied,
		"the repository API is disabled on this model host: start patchbay modelhost with --admin-token-file"}
	errTokenFile = &apiError{http.StatusServiceUnavailable, codes.Unavailable,
		"the admin token file is unusable (see the model host's log); repository calls are refused until it is fixed"}
)

// authorize checks an Authorization value against the admin token.
func (s *Server) authorize(authz string) *apiError {
	if s.token == nil {
		return errRepoDisabled
	}
	err := s.token.Check(authz)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, bearer.ErrFile):
		s.log.Error().Err(err).Msg("admin token file unusable; refusing repository calls")
		return errTokenFile
	}
	return &apiError{http.StatusUnauthorized, codes.Unauthenticated, err.Error()}
}

func (s *Server) withToken(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if e := s.authorize(r.Header.Get("Authorization")); e != nil {
			if e.status == http.StatusUnauthorized {
				w.Header().Set("WWW-Authenticate", `Bearer realm="patchbay-modelhost"`)
			}
			writeError(w, e)
			return
		}
		h(w, r)
	}
}

// adminHandler is the admin listener's handler; gs serves its gRPC requests.
func (s *Server) adminHandler(gs *grpc.Server) http.Handler {
	mux := newOIPMux()
	s.healthRoutes(mux)
	if s.cfg.MetricsHandler != nil {
		mux.route("GET", "/metrics", s.cfg.MetricsHandler)
	}
	mux.routeFunc("POST", "/v2/repository/index", s.withToken(s.handleIndex))
	mux.routeFunc("POST", "/v2/repository/models/{model}/load", s.withToken(s.handleLoad))
	mux.routeFunc("POST", "/v2/repository/models/{model}/unload", s.withToken(s.handleUnload))
	mux.finish(func(r *http.Request) string {
		return r.Method + " " + r.URL.Path + " is not served on the admin listener (inference is on the REST and gRPC ports)"
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
			gs.ServeHTTP(w, r)
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// newAdminGRPC is the admin listener's gRPC server: the repository calls and server
// health, nothing that runs a model.
func (s *Server) newAdminGRPC() (*grpc.Server, *grpchealth.Server) {
	gs := grpc.NewServer(grpc.MaxRecvMsgSize(adminMaxMsg), grpc.MaxConcurrentStreams(16))
	oip.RegisterGRPCInferenceServiceServer(gs, &adminGRPC{s: s})
	health := grpchealth.NewServer()
	healthpb.RegisterHealthServer(gs, health)
	return gs, health
}

// adminGRPC is inference.GRPCInferenceService as served on the admin listener.
type adminGRPC struct {
	oip.UnimplementedGRPCInferenceServiceServer
	s *Server
}

func (a *adminGRPC) authorize(ctx context.Context) error {
	var authz string
	if v := metadata.ValueFromIncomingContext(ctx, "authorization"); len(v) > 0 {
		authz = v[0]
	}
	if e := a.s.authorize(authz); e != nil {
		return status.Error(e.code, e.msg)
	}
	return nil
}

func (a *adminGRPC) ServerLive(context.Context, *oip.ServerLiveRequest) (*oip.ServerLiveResponse, error) {
	return &oip.ServerLiveResponse{Live: true}, nil
}

func (a *adminGRPC) ServerReady(context.Context, *oip.ServerReadyRequest) (*oip.ServerReadyResponse, error) {
	return &oip.ServerReadyResponse{Ready: a.s.Ready()}, nil
}

func (a *adminGRPC) ServerMetadata(ctx context.Context, r *oip.ServerMetadataRequest) (*oip.ServerMetadataResponse, error) {
	m := a.s.serverMetadata()
	return &oip.ServerMetadataResponse{Name: m.Name, Version: m.Version, Extensions: m.Extensions}, nil
}

func (a *adminGRPC) RepositoryIndex(ctx context.Context, r *oip.RepositoryIndexRequest) (*oip.RepositoryIndexResponse, error) {
	if err := a.authorize(ctx); err != nil {
		return nil, err
	}
	resp := &oip.RepositoryIndexResponse{}
	for _, e := range a.s.Index(r.GetReady()) {
		resp.Models = append(resp.Models, &oip.RepositoryIndexResponse_ModelIndex{Name: e.Name, Version: e.Version, State: e.State, Reason: e.Reason})
	}
	return resp, nil
}

func (a *adminGRPC) RepositoryModelLoad(ctx context.Context, r *oip.RepositoryModelLoadRequest) (*oip.RepositoryModelLoadResponse, error) {
	if err := a.authorize(ctx); err != nil {
		return nil, err
	}
	if _, err := a.s.Load(r.GetModelName()); err != nil {
		e := a.s.loadError(r.GetModelName(), err)
		if e.code == codes.InvalidArgument {
			e.code = codes.FailedPrecondition
		}
		return nil, grpcErr(e)
	}
	return &oip.RepositoryModelLoadResponse{}, nil
}

func (a *adminGRPC) RepositoryModelUnload(ctx context.Context, r *oip.RepositoryModelUnloadRequest) (*oip.RepositoryModelUnloadResponse, error) {
	if err := a.authorize(ctx); err != nil {
		return nil, err
	}
	if err := a.s.Unload(r.GetModelName()); err != nil {
		return nil, status.Error(codes.NotFound, err.Error())
	}
	return &oip.RepositoryModelUnloadResponse{}, nil
}
