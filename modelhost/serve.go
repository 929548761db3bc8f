package modelhost

import (
	"context"
	"errors"
	"net"
	"net/http"
	"time"

	"google.golang.org/grpc"
	grpchealth "google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/patchbay-io/patchbay/api/oip"
)

// Serve serves REST on httpLis and gRPC on grpcLis (either may be nil) until ctx ends,
// then shuts down gracefully: listeners close, in-flight requests finish (bounded by
// ShutdownTimeout), and every version is retired.
func (s *Server) Serve(ctx context.Context, httpLis, grpcLis net.Listener) error {
	errc := make(chan error, 2)
	var hs *http.Server
	var gs *grpc.Server
	if httpLis != nil {
		hs = &http.Server{Handler: s.mux, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute,
			MaxHeaderBytes: 64 << 10}
		go func() {
			if err := hs.Serve(httpLis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- err
			}
		}()
		s.log.Info().Str("addr", httpLis.Addr().String()).Msg("OIP REST listening")
	}
	var health *grpchealth.Server
	if grpcLis != nil {
		gs = grpc.NewServer(s.GRPCServerOptions()...)
		s.RegisterGRPC(gs)
		// Standard gRPC health (for Envoy and Kubernetes gRPC probes): the overall
		// status and the OIP service follow server readiness.
		health = grpchealth.NewServer()
		healthpb.RegisterHealthServer(gs, health)
		health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
		health.SetServingStatus(oip.GRPCInferenceService_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
		go func() {
			if err := gs.Serve(grpcLis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
				errc <- err
			}
		}()
		s.log.Info().Str("addr", grpcLis.Addr().String()).Msg("OIP gRPC listening")
	}
	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-errc:
	}
	s.closing.Store(true)
	if health != nil {
		health.Shutdown() // NOT_SERVING while draining
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.ShutdownTimeout)
	defer cancel()
	if hs != nil {
		_ = hs.Shutdown(sctx)
	}
	if gs != nil {
		done := make(chan struct{})
		go func() { gs.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-sctx.Done():
			gs.Stop()
		}
	}
	s.Close()
	s.log.Info().Msg("model host stopped")
	return serveErr
}
