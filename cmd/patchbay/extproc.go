package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"runtime/debug"
	"strings"

	"github.com/rs/zerolog"
	"go.opentelemetry.io/otel/trace"

	"github.com/patchbay-io/patchbay/extproc"
	"github.com/patchbay-io/patchbay/internal/telemetry"
	"github.com/patchbay-io/patchbay/internal/tlsfiles"
)

// runExtproc runs the ext_proc router until ctx ends.
func runExtproc(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("extproc", "[flags]", "The Envoy ext_proc router: takes its policy from the control plane (--xds) and picks\neach request's model version (sticky buckets, experiment arms).")
	listen := fs.String("listen", "127.0.0.1:18080", "ext_proc gRPC address (with the gRPC health service)")
	xdsAddr := fs.String("xds", "127.0.0.1:18000", "control plane ADS address")
	admin := fs.String("admin", "127.0.0.1:18081", "admin HTTP address: /readyz, /livez, /metrics")
	identity := fs.String("identity-headers", "x-user-id", "comma-separated identity headers, first present wins (used when the policy names none)")
	nodeID := fs.String("node-id", "", "xDS node id (default hostname-pid)")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	gcPercent := fs.Int("gc-percent", 0, "GOGC for the process when > 0 (default: the runtime's, or $GOGC)")
	workers := fs.Uint("stream-workers", 0, "gRPC stream worker goroutines (grpc.NumStreamWorkers); 0: a goroutine per stream")
	otlp := fs.String("otlp-endpoint", "", "OTLP/gRPC collector host:port for decision spans (unset: tracing off)")
	sampleRatio := fs.Float64("trace-sample-ratio", 0.01, "fraction of root traces sampled when tracing is on (a sampled parent is always followed)")
	tlsCert := fs.String("tls-cert", "", "PEM certificate: serve ext_proc and the admin listener over TLS (re-read when it changes)")
	tlsKey := fs.String("tls-key", "", "PEM key of --tls-cert")
	clientCA := fs.String("client-ca", "", "PEM CA bundle: require client certificates that chain to it (needs --tls-cert)")
	xdsCA := fs.String("xds-ca", "", "PEM CA bundle that the control plane's certificate must chain to: dial --xds over TLS")
	xdsCert := fs.String("xds-cert", "", "PEM client certificate presented to the control plane (with --xds-key)")
	xdsKey := fs.String("xds-key", "", "PEM key of --xds-cert")
	if err := parseFlags(fs, args, stdout, stderr); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return fmt.Errorf("extproc: unexpected arguments %q: %w", fs.Args(), errUsage)
	}
	log, err := telemetry.NewLogger(stderr, *logLevel)
	if err != nil {
		return fmt.Errorf("extproc: %v: %w", err, errUsage)
	}
	if *gcPercent > 0 {
		debug.SetGCPercent(*gcPercent)
	}
	var ids []string
	for _, h := range strings.Split(*identity, ",") {
		if h = strings.ToLower(strings.TrimSpace(h)); h != "" {
			ids = append(ids, h)
		}
	}
	serverTLS, xdsTLS, err := extprocTLS(log, *xdsAddr,
		tlsfiles.Files{Cert: *tlsCert, Key: *tlsKey, CA: *clientCA},
		tlsfiles.Files{Cert: *xdsCert, Key: *xdsKey, CA: *xdsCA})
	if err != nil {
		return err
	}
	metrics, err := telemetry.NewMetrics(telemetry.Service("patchbay-extproc"))
	if err != nil {
		return fmt.Errorf("extproc: %w", err)
	}
	defer metrics.Shutdown(context.Background())
	var tracerProvider trace.TracerProvider
	if *otlp != "" {
		tp, shutdown, err := telemetry.NewTracerProvider(ctx, "patchbay-extproc", *otlp, *sampleRatio)
		if err != nil {
			return fmt.Errorf("extproc: %w", err)
		}
		defer shutdown(context.Background())
		tracerProvider = tp
	}
	cfg := extproc.Config{
		TracerProvider:   tracerProvider,
		XDSAddress:       *xdsAddr,
		NodeID:           *nodeID,
		IdentityHeaders:  ids,
		Logger:           log,
		Meter:            metrics.Meter("patchbay/extproc"),
		NumStreamWorkers: uint32(*workers),
	}
	if serverTLS != nil {
		cfg.TLS, cfg.AdminTLS = serverTLS.ServerConfig("h2"), serverTLS.ServerConfig("h2", "http/1.1")
	}
	if xdsTLS != nil {
		cfg.XDSTLS = xdsTLS.ClientConfig(tlsfiles.ServerNameOf(*xdsAddr))
	}
	srv, err := extproc.New(cfg)
	if err != nil {
		return err
	}
	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("extproc: listen %s: %w", *listen, err)
	}
	adminLis, err := net.Listen("tcp", *admin)
	if err != nil {
		lis.Close()
		return fmt.Errorf("extproc: admin listen %s: %w", *admin, err)
	}
	actx, stopAdmin := context.WithCancel(ctx)
	adminDone := make(chan struct{})
	go func() {
		defer close(adminDone)
		if err := srv.ServeAdmin(actx, adminLis, metrics.Handler); err != nil {
			log.Error().Err(err).Msg("admin server stopped")
		}
	}()
	err = srv.Serve(ctx, lis)
	stopAdmin()
	<-adminDone
	return err
}

// extprocTLS loads the serving and the xDS client TLS files (nil where none are named).
// Both are re-read when they change.
func extprocTLS(log zerolog.Logger, xdsAddr string, serve, xds tlsfiles.Files) (serverSrc, xdsSrc *tlsfiles.Source, err error) {
	opts := func(what string) tlsfiles.Options {
		return tlsfiles.Options{
			OnError: func(err error) {
				log.Error().Err(err).Str("tls", what).Msg("TLS files reload failed; keeping the last good ones")
			},
			OnReload: func() { log.Info().Str("tls", what).Msg("TLS files reloaded") },
		}
	}
	if serve.Enabled() {
		if serve.Cert == "" || serve.Key == "" {
			return nil, nil, fmt.Errorf("extproc: --tls-cert and --tls-key go together, and --client-ca needs them: %w", errUsage)
		}
		if serverSrc, err = tlsfiles.Load(serve, opts("serve")); err != nil {
			return nil, nil, fmt.Errorf("extproc: %w", err)
		}
	}
	if xds.Enabled() {
		if (xds.Cert == "") != (xds.Key == "") {
			return nil, nil, fmt.Errorf("extproc: --xds-cert and --xds-key go together: %w", errUsage)
		}
		if xdsSrc, err = tlsfiles.Load(xds, opts("xds")); err != nil {
			return nil, nil, fmt.Errorf("extproc: %w", err)
		}
		log.Info().Str("server_name", tlsfiles.ServerNameOf(xdsAddr)).Msg("control plane over TLS")
	}
	return serverSrc, xdsSrc, nil
}
