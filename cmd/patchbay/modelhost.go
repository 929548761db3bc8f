package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"go.opentelemetry.io/otel/trace"

	"github.com/patchbay-io/patchbay/internal/telemetry"
	"github.com/patchbay-io/patchbay/modelhost"
)

// runModelhost parses the modelhost flags into modelhost.Config and serves until ctx ends.
func runModelhost(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("modelhost", flag.ContinueOnError)
	fs.SetOutput(stderr)
	repo := fs.String("repository", "", "model repository directory: <model>/<version>/model.yaml (required)")
	httpAddr := fs.String("http", "127.0.0.1:8000", "OIP REST listen address (also serves /metrics)")
	grpcAddr := fs.String("grpc", "127.0.0.1:8001", "OIP gRPC listen address")
	adminAddr := fs.String("admin", "", "optional extra listen address for /metrics and health only")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	maxBody := fs.Int64("max-body-bytes", 8<<20, "largest REST body / gRPC message")
	otlp := fs.String("otlp-endpoint", "", "OTLP/gRPC collector host:port for inference spans (unset: tracing off)")
	sampleRatio := fs.Float64("trace-sample-ratio", 0.01, "fraction of root traces sampled when tracing is on (a sampled parent is always followed)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("modelhost: %v: %w", err, errUsage)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("modelhost: unexpected arguments %q: %w", fs.Args(), errUsage)
	}
	if *repo == "" {
		fs.Usage()
		return fmt.Errorf("modelhost: --repository is required: %w", errUsage)
	}
	log, err := telemetry.NewLogger(stderr, *logLevel)
	if err != nil {
		return fmt.Errorf("modelhost: %w: %w", err, errUsage)
	}
	metrics, err := telemetry.NewMetrics()
	if err != nil {
		return fmt.Errorf("modelhost: %w", err)
	}
	defer func() { _ = metrics.Shutdown(context.WithoutCancel(ctx)) }()
	var tracerProvider trace.TracerProvider
	if *otlp != "" {
		tp, shutdown, err := telemetry.NewTracerProvider(ctx, "patchbay-modelhost", *otlp, *sampleRatio)
		if err != nil {
			return fmt.Errorf("modelhost: %w", err)
		}
		defer func() { _ = shutdown(context.WithoutCancel(ctx)) }()
		tracerProvider = tp
	}
	srv, err := modelhost.New(modelhost.Config{
		TracerProvider: tracerProvider,
		Repository:     *repo,
		Logger:         log,
		MeterProvider:  metrics.Provider,
		MetricsHandler: metrics.Handler,
		MaxBodyBytes:   *maxBody,
	})
	if err != nil {
		return err
	}
	hl, err := net.Listen("tcp", *httpAddr)
	if err != nil {
		srv.Close()
		return fmt.Errorf("modelhost: listen http: %w", err)
	}
	gl, err := net.Listen("tcp", *grpcAddr)
	if err != nil {
		hl.Close()
		srv.Close()
		return fmt.Errorf("modelhost: listen grpc: %w", err)
	}
	if *adminAddr != "" {
		al, err := net.Listen("tcp", *adminAddr)
		if err != nil {
			hl.Close()
			gl.Close()
			srv.Close()
			return fmt.Errorf("modelhost: listen admin: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", metrics.Handler)
		mux.Handle("GET /v2/health/", srv.Handler())
		as := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() { _ = as.Serve(al) }()
		defer as.Close()
	}
	return srv.Serve(ctx, hl, gl)
}
