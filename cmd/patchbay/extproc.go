package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime/debug"
	"strings"
	"time"

	"go.opentelemetry.io/otel/trace"

	"github.com/patchbay-io/patchbay/extproc"
	"github.com/patchbay-io/patchbay/internal/telemetry"
)

// runExtproc runs the ext_proc router until ctx ends.
func runExtproc(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("extproc", flag.ContinueOnError)
	fs.SetOutput(stderr)
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
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("extproc: %v: %w", err, errUsage)
	}
	if fs.NArg() > 0 {
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
	metrics, err := telemetry.NewMetrics()
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
	srv, err := extproc.New(extproc.Config{
		TracerProvider:   tracerProvider,
		XDSAddress:       *xdsAddr,
		NodeID:           *nodeID,
		IdentityHeaders:  ids,
		Logger:           log,
		Meter:            metrics.Meter("patchbay/extproc"),
		NumStreamWorkers: uint32(*workers),
	})
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
	hs := &http.Server{Handler: srv.AdminHandler(metrics.Handler), ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := hs.Serve(adminLis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error().Err(err).Msg("admin server stopped")
		}
	}()
	err = srv.Serve(ctx, lis)
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = hs.Shutdown(sctx)
	return err
}
