package modelhost

import (
	"context"
	"crypto/tls"
	"errors"
	stdlog "log"
	"net"
	"net/http"
	"strings"

	"github.com/rs/zerolog"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	grpchealth "google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/patchbay-io/patchbay/api/oip"
)

// debugWriter logs what net/http reports (one line per write) at debug level.
type debugWriter struct{ log zerolog.Logger }

func (w debugWriter) Write(p []byte) (int, error) {
	if e := w.log.Debug(); e.Enabled() {
		e.Str("source", "net/http").Msg(strings.TrimSpace(string(p)))
	}
	return len(p), nil
}

// Listeners are where a Server serves; any may be nil.
type Listeners struct {
	HTTP  net.Listener // OIP REST (inference, metadata, health, /metrics)
	GRPC  net.Listener // OIP gRPC (inference, metadata, health)
	Admin net.Listener // /metrics, health, and the repository extension (REST and gRPC) behind the bearer token
}

// Serve serves REST on httpLis and gRPC on grpcLis (either may be nil), without an admin
// listener, until ctx ends. See ServeAll.
func (s *Server) Serve(ctx context.Context, httpLis, grpcLis net.Listener) error {
	return s.ServeAll(ctx, Listeners{HTTP: httpLis, GRPC: grpcLis})
}

// ServeAll serves on the given listeners until ctx ends, then shuts down gracefully:
// listeners close, in-flight requests finish (bounded by ShutdownTimeout), and every
// version is retired. With Config.TLS every listener speaks TLS (ALPN h2 and http/1.1 for
// REST and admin, h2 for gRPC).
func (s *Server) ServeAll(ctx context.Context, l Listeners) error {
	errc := make(chan error, 3)
	if s.shadow != nil {
		sctx, stop := context.WithCancel(context.WithoutCancel(ctx))
		done := make(chan struct{})
		go func() { s.shadow.run(sctx); close(done) }()
		defer func() { stop(); <-done }() // after the servers drained: their records are queued
	}
	var servers []*http.Server
	var tlsHTTP, tlsGRPC *tls.Config
	if s.cfg.TLS != nil {
		tlsHTTP = s.cfg.TLS.ServerConfig("h2", "http/1.1")
		tlsGRPC = s.cfg.TLS.ServerConfig("h2")
	}
	serveHTTP := func(lis net.Listener, h http.Handler, what string) {
		hs := &http.Server{Handler: h, ReadHeaderTimeout: s.cfg.ReadHeaderTimeout, ReadTimeout: s.cfg.ReadTimeout,
			WriteTimeout: s.cfg.WriteTimeout, IdleTimeout: s.cfg.IdleTimeout, MaxHeaderBytes: 64 << 10,
			ErrorLog: stdlog.New(debugWriter{s.log}, "", 0)} // TLS handshake failures and the like: per connection, so debug
		hs.Protocols = new(http.Protocols)
		hs.Protocols.SetHTTP1(true)
		if tlsHTTP != nil {
			hs.Protocols.SetHTTP2(true)
			lis = tls.NewListener(lis, tlsHTTP)
		} else if what == "admin" {
			hs.Protocols.SetUnencryptedHTTP2(true) // gRPC clients speak h2c with prior knowledge
		}
		servers = append(servers, hs)
		go func() {
			if err := hs.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- err
			}
		}()
		s.log.Info().Str("addr", lis.Addr().String()).Bool("tls", tlsHTTP != nil).Msg(what + " listening")
	}
	if l.HTTP != nil {
		serveHTTP(l.HTTP, s.mux, "OIP REST")
	}
	var adminGS *grpc.Server
	var adminHealth *grpchealth.Server
	if l.Admin != nil {
		adminGS, adminHealth = s.newAdminGRPC()
		s.addHealthServer(adminHealth)
		serveHTTP(l.Admin, s.adminHandler(adminGS), "admin")
		if s.token == nil {
			s.log.Warn().Msg("no --admin-token-file: the repository API (load, unload, index) is disabled")
		}
	}
	var gs *grpc.Server
	var health *grpchealth.Server
	if l.GRPC != nil {
		opts := s.GRPCServerOptions()
		if tlsGRPC != nil {
			opts = append(opts, grpc.Creds(credentials.NewTLS(tlsGRPC)))
		}
		gs = grpc.NewServer(opts...)
		s.RegisterGRPC(gs)
		// Standard gRPC health (for Envoy and Kubernetes gRPC probes): the overall
		// status and the OIP service follow server readiness.
		health = grpchealth.NewServer()
		healthpb.RegisterHealthServer(gs, health)
		health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
		health.SetServingStatus(oip.GRPCInferenceService_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
		// One service per model version, kept in step with load and unload (health.go).
		s.addHealthServer(health)
		go func() {
			if err := gs.Serve(l.GRPC); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
				errc <- err
			}
		}()
		s.log.Info().Str("addr", l.GRPC.Addr().String()).Bool("tls", tlsGRPC != nil).Msg("OIP gRPC listening")
	}
	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-errc:
	}
	s.closing.Store(true)
	for _, h := range []*grpchealth.Server{health, adminHealth} {
		if h != nil {
			h.Shutdown() // NOT_SERVING while draining
		}
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.ShutdownTimeout)
	defer cancel()
	for _, hs := range servers {
		_ = hs.Shutdown(sctx)
	}
	if adminGS != nil {
		adminGS.Stop()
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
