package extproc

import (
	"context"
	"errors"
	"fmt"
	"io"
	stdlog "log"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/rs/zerolog"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
	"github.com/patchbay-io/patchbay/extproc/internal/policy"
	"github.com/patchbay-io/patchbay/extproc/internal/xdsclient"
)

// ServiceName is the ext_proc gRPC service, also reported by the health service.
const ServiceName = "envoy.service.ext_proc.v3.ExternalProcessor"

// Server is the ext_proc server. Create it with New; it is safe for concurrent use.
type Server struct {
	extprocv3.UnimplementedExternalProcessorServer

	cfg    Config
	log    zerolog.Logger
	state  atomic.Pointer[state]
	in     *instruments
	tracer trace.Tracer // nil: tracing off
	prop   propagation.TextMapPropagator
	health *health.Server
	served atomic.Bool
}

// state is one compiled policy with its metric labels; swapped whole.
type state struct {
	tbl    *policy.Table
	labels *labels
}

// New builds a server from cfg. It does no I/O.
func New(cfg Config) (*Server, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	in, err := newInstruments(cfg.Meter)
	if err != nil {
		return nil, err
	}
	if cfg.NodeID == "" {
		host, _ := os.Hostname()
		cfg.NodeID = host + "-" + strconv.Itoa(os.Getpid())
	}
	s := &Server{
		cfg:    cfg,
		log:    cfg.Logger.With().Str("component", "extproc").Logger(),
		in:     in,
		prop:   propagation.TraceContext{},
		health: health.NewServer(),
	}
	if cfg.TracerProvider != nil {
		s.tracer = cfg.TracerProvider.Tracer("github.com/patchbay-io/patchbay/extproc")
	}
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	s.health.SetServingStatus(ServiceName, healthpb.HealthCheckResponse_NOT_SERVING)
	return s, nil
}

// Ready reports whether a policy has been accepted.
func (s *Server) Ready() bool { return s.state.Load() != nil }

// ConfigVersion returns the rollout config version of the current policy ("" before any).
func (s *Server) ConfigVersion() string {
	if st := s.state.Load(); st != nil {
		return st.tbl.ConfigVersion
	}
	return ""
}

// SetPolicy validates p and, if it is valid, makes it the current policy. An invalid
// policy leaves the current one in force.
func (s *Server) SetPolicy(p *policyv1.Policy) error {
	tbl, err := policy.Compile(p, s.cfg.IdentityHeaders)
	if err != nil {
		s.in.refused.inc()
		return err
	}
	s.state.Store(&state{tbl: tbl, labels: s.in.newLabels(tbl)})
	s.in.accepted.inc()
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	s.health.SetServingStatus(ServiceName, healthpb.HealthCheckResponse_SERVING)
	s.log.Info().Str("config_version", tbl.ConfigVersion).Int("models", len(tbl.Models)).Msg("policy applied")
	return nil
}

// resourceWrapper is the type URL of xDS's optional Resource wrapper.
const resourceWrapper = "type.googleapis.com/envoy.service.discovery.v3.Resource"

// applyResources applies one xDS response: exactly the Policy named policyv1.ResourceName.
func (s *Server) applyResources(version string, res []*anypb.Any) error {
	switch len(res) {
	case 0:
		s.log.Warn().Str("version", version).Msg("control plane sent no policy; keeping the last good one")
		return nil
	case 1:
	default:
		return fmt.Errorf("policy version %q: %d resources, want 1", version, len(res))
	}
	a := res[0]
	if a.GetTypeUrl() == resourceWrapper {
		var w discoveryv3.Resource
		if err := a.UnmarshalTo(&w); err != nil {
			return fmt.Errorf("policy version %q: decode resource wrapper: %w", version, err)
		}
		if n := w.GetName(); n != "" && n != policyv1.ResourceName {
			return fmt.Errorf("policy version %q: resource %q, want %q", version, n, policyv1.ResourceName)
		}
		a = w.GetResource()
	}
	if a.GetTypeUrl() != policyv1.TypeURL {
		return fmt.Errorf("policy version %q: resource type %q, want %q", version, a.GetTypeUrl(), policyv1.TypeURL)
	}
	var p policyv1.Policy
	if err := proto.Unmarshal(a.GetValue(), &p); err != nil {
		return fmt.Errorf("policy version %q: decode: %w", version, err)
	}
	if err := s.SetPolicy(&p); err != nil {
		return fmt.Errorf("policy version %q (config %q): %w", version, p.GetConfigVersion(), err)
	}
	return nil
}

// Serve serves ext_proc and the gRPC health service on lis, and follows the control
// plane when Config.XDSAddress is set, until ctx ends. It then stops gracefully
// (bounded by ShutdownGrace) and returns nil.
func (s *Server) Serve(ctx context.Context, lis net.Listener) error {
	if s.served.Swap(true) {
		return errors.New("extproc: Serve called twice")
	}
	opts := []grpc.ServerOption{
		// Envoy may keep its connection to us alive with HTTP/2 pings (cluster
		// connection_keepalive); grpc-go's default policy answers pings more frequent
		// than every 5 minutes with GOAWAY. Accept them down to 10 s.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		// Find dead Envoy connections.
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: time.Minute, Timeout: 20 * time.Second}),
	}
	if s.cfg.NumStreamWorkers > 0 {
		opts = append(opts, grpc.NumStreamWorkers(s.cfg.NumStreamWorkers))
	}
	if s.cfg.TLS != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(s.cfg.TLS)))
	}
	gs := grpc.NewServer(opts...)
	extprocv3.RegisterExternalProcessorServer(gs, s)
	healthpb.RegisterHealthServer(gs, s.health)

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	if s.cfg.XDSAddress != "" {
		c, err := xdsclient.New(xdsclient.Config{
			Address:      s.cfg.XDSAddress,
			Node:         &corev3.Node{Id: s.cfg.NodeID, UserAgentName: policyv1.ExtprocUserAgent},
			TypeURL:      policyv1.TypeURL,
			ResourceName: policyv1.ResourceName,
			Apply:        s.applyResources,
			Logger:       s.log,
			MinBackoff:   s.cfg.XDSMinBackoff,
			MaxBackoff:   s.cfg.XDSMaxBackoff,
			TLS:          s.cfg.XDSTLS,
		})
		if err != nil {
			return fmt.Errorf("extproc: %w", err)
		}
		wg.Go(func() { _ = c.Run(ctx) })
	}
	wg.Go(func() {
		<-ctx.Done()
		s.health.Shutdown()
		done := make(chan struct{})
		go func() { gs.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-time.After(s.cfg.ShutdownGrace):
			gs.Stop()
		}
	})
	s.log.Info().Str("listen", lis.Addr().String()).Str("xds", s.cfg.XDSAddress).
		Bool("tls", s.cfg.TLS != nil).Bool("xds_tls", s.cfg.XDSTLS != nil).Msg("serving ext_proc")
	err := gs.Serve(lis)
	cancel()
	wg.Wait()
	if err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("extproc: serve %s: %w", lis.Addr(), err)
	}
	return nil
}

// ServeAdmin serves AdminHandler(metrics) on lis, over TLS when Config.AdminTLS is set,
// until ctx ends; it then shuts down (bounded by ShutdownGrace) and returns nil.
func (s *Server) ServeAdmin(ctx context.Context, lis net.Listener, metrics http.Handler) error {
	hs := &http.Server{
		Handler:           s.AdminHandler(metrics),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		TLSConfig:         s.cfg.AdminTLS,
		ErrorLog:          stdlog.New(debugWriter{s.log}, "", 0), // e.g. refused TLS handshakes
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), s.cfg.ShutdownGrace)
		defer cancel()
		_ = hs.Shutdown(sctx)
	}()
	var err error
	if s.cfg.AdminTLS != nil {
		// The certificate comes from TLSConfig (GetConfigForClient), not from files here.
		err = hs.ServeTLS(lis, "", "")
	} else {
		err = hs.Serve(lis)
	}
	if errors.Is(err, http.ErrServerClosed) {
		<-done
		return nil
	}
	return fmt.Errorf("extproc: admin %s: %w", lis.Addr(), err)
}

// debugWriter logs net/http's server errors (TLS handshakes refused, for example) at debug.
type debugWriter struct{ log zerolog.Logger }

func (w debugWriter) Write(p []byte) (int, error) {
	w.log.Debug().Str("listener", "admin").Msg(strings.TrimSpace(string(p)))
	return len(p), nil
}

// AdminHandler serves /readyz (200 once a policy is in force) and /metrics (the given
// handler, if any).
func (s *Server) AdminHandler(metrics http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if v, ok := s.readyVersion(); ok {
			fmt.Fprintf(w, "ready: config version %q\n", v)
			return
		}
		http.Error(w, "not ready: no policy from the control plane yet", http.StatusServiceUnavailable)
	})
	mux.HandleFunc("GET /livez", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
	if metrics != nil {
		mux.Handle("GET /metrics", metrics)
	}
	return mux
}

func (s *Server) readyVersion() (string, bool) {
	st := s.state.Load()
	if st == nil {
		return "", false
	}
	return st.tbl.ConfigVersion, true
}

// errNoMessage answers a ProcessingRequest that carries none of the known messages.
var errNoMessage = status.Error(codes.InvalidArgument, "ext_proc: processing request carries no request or response message")

// Process is the ext_proc stream: one HTTP request's messages, answered one by one.
func (s *Server) Process(stream extprocv3.ExternalProcessor_ProcessServer) error {
	ctx := stream.Context()
	var st streamState
	for first := true; ; first = false {
		req, err := stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) || status.Code(err) == codes.Canceled {
				return nil
			}
			return err
		}
		if first {
			st.protocol = req.GetProtocolConfig()
		}
		resp, err := s.handle(ctx, &st, req)
		if err != nil {
			return err
		}
		if req.GetObservabilityMode() || resp == nil {
			st.release()
			continue
		}
		err = stream.Send(resp)
		st.release() // Send has marshalled resp
		if err != nil {
			return err
		}
	}
}
