package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"strconv"

	"go.opentelemetry.io/otel/trace"

	"github.com/patchbay-io/patchbay/internal/runtimetune"
	"github.com/patchbay-io/patchbay/internal/telemetry"
	"github.com/patchbay-io/patchbay/internal/tlsfiles"
	"github.com/patchbay-io/patchbay/modelhost"
	"github.com/patchbay-io/patchbay/modelhost/runtime/builtin"
)

// modelhostDefaults: the runtime's GC percent (a host's live heap is its models, so a
// higher percent multiplies their memory; not yet measured for speed) and the soft memory
// limit at 90% of the container's, so the runtime collects harder near the limit instead of
// the pod being OOM-killed.
var modelhostDefaults = runtimetune.Defaults{GCPercent: 100, LimitFraction: 0.9}

// runModelhost parses the modelhost flags into modelhost.Config and serves until ctx ends.
func runModelhost(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("modelhost", "[flags]", "A model host: serves the model versions in --repository DIR (required; laid out as\n<model>/<version>/model.yaml) over the Open Inference Protocol, REST and gRPC.")
	repo := fs.String("repository", "", "model repository directory: <model>/<version>/model.yaml (required)")
	httpAddr := fs.String("http", "127.0.0.1:8000", "OIP REST listen address (also serves /metrics)")
	grpcAddr := fs.String("grpc", "127.0.0.1:8001", "OIP gRPC listen address")
	adminAddr := fs.String("admin", "127.0.0.1:8002", "admin listen address: /metrics, health, and the repository API (load, unload, index; REST and gRPC) behind --admin-token-file (empty: no admin listener)")
	tokenFile := fs.String("admin-token-file", "", "file holding the admin bearer token, at least 32 bytes, re-read when it changes (unset: repository API disabled)")
	maxInflight := fs.Int("max-inflight", modelhost.DefaultMaxInflight(), "inference requests in flight at most (REST and gRPC together; 128 x GOMAXPROCS by default); the excess gets 429 / RESOURCE_EXHAUSTED at once")
	maxInflightBytes := fs.Int64("max-inflight-bytes", 0, "request bytes held by in-flight requests at most (0: 16 x --max-body-bytes); the excess gets 429 / RESOURCE_EXHAUSTED at once")
	tlsCert := fs.String("tls-cert", "", "PEM certificate for the REST, gRPC and admin listeners (re-read when it changes)")
	tlsKey := fs.String("tls-key", "", "PEM key of --tls-cert")
	clientCA := fs.String("client-ca", "", "PEM CA bundle: client certificates are then required on every listener and verified against it")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	maxBody := fs.Int64("max-body-bytes", 8<<20, "largest REST body / gRPC message")
	otlp := fs.String("otlp-endpoint", "", "OTLP/gRPC collector host:port for inference spans (unset: tracing off)")
	sampleRatio := fs.Float64("trace-sample-ratio", 0.01, "fraction of root traces sampled when tracing is on (a sampled parent is always followed)")
	gcPercent := fs.String("gc-percent", strconv.Itoa(modelhostDefaults.GCPercent), "GC percent (as GOGC; off: no GC but at the memory limit); precedence: this flag, then $GOGC, then the default")
	shadowRecords := fs.String("shadow-records", "", "the control plane's ADS address: send sampled prediction records there for shadow comparison (unset: off; TLS with --tls-cert/--tls-key/--client-ca when set)")
	shadowSample := fs.Float64("shadow-sample", modelhost.DefaultShadowSample, "share of requests (by a hash of x-request-id, so a request and its mirror are both sampled) whose predictions are sent, in (0, 1]")
	featureStore := fs.String("feature-store", "", "Redis server (host:port or redis:// URL) of model.yaml's store features (unset: they take their defaults)")
	featureTimeout := fs.Duration("feature-timeout", modelhost.DefaultFeatureTimeout, "bound of one request's feature store round trip; beyond it features take their defaults")
	featureCacheTTL := fs.Duration("feature-cache-ttl", modelhost.DefaultFeatureCacheTTL, "how long a feature store answer is reused (negative: no cache)")
	featureCacheSize := fs.Int("feature-cache-size", modelhost.DefaultFeatureCacheSize, "entities whose features are cached locally at most")
	onnxLib := fs.String("onnxruntime-lib", "", "ONNX Runtime shared library `file` (libonnxruntime.so 1.24.1) for model.yaml's runtime: onnx, loaded with the first onnx model (unset: $PATCHBAY_ONNXRUNTIME_LIB, else .cache/onnxruntime/lib from make onnxruntime in the working directory or a parent); needs the cgo build")
	memoryLimit := fs.String("memory-limit", "auto", "soft memory limit of the Go runtime, e.g. 4GiB, or none; auto: 90% of the container's memory limit (cgroup) if it has one, else none; precedence: this flag, then $GOMEMLIMIT, then auto")
	if err := parseFlags(fs, args, stdout, stderr); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fs.Usage()
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
	if *featureTimeout <= 0 || *featureCacheSize <= 0 {
		fs.Usage()
		return fmt.Errorf("modelhost: --feature-timeout and --feature-cache-size must be positive: %w", errUsage)
	}
	if *shadowSample <= 0 || *shadowSample > 1 {
		fs.Usage()
		return fmt.Errorf("modelhost: --shadow-sample %v: want a share in (0, 1]: %w", *shadowSample, errUsage)
	}
	tune, err := runtimeSettings(fs, *gcPercent, *memoryLimit, modelhostDefaults)
	if err != nil {
		return fmt.Errorf("modelhost: %v: %w", err, errUsage)
	}
	tune.Apply()
	log.Info().Str("runtime", tune.String()).Msg("runtime settings")
	var tlsSource *tlsfiles.Source
	if *tlsCert != "" || *tlsKey != "" || *clientCA != "" {
		if *tlsCert == "" || *tlsKey == "" {
			return fmt.Errorf("modelhost: --tls-cert and --tls-key go together (and --client-ca needs them): %w", errUsage)
		}
		tlsSource, err = tlsfiles.Load(tlsfiles.Files{Cert: *tlsCert, Key: *tlsKey, CA: *clientCA}, tlsfiles.Options{
			OnError:  func(err error) { log.Error().Err(err).Msg("TLS files reload failed; keeping the last good ones") },
			OnReload: func() { log.Info().Msg("TLS files reloaded") },
		})
		if err != nil {
			return fmt.Errorf("modelhost: %w", err)
		}
	}
	metrics, err := telemetry.NewMetrics(telemetry.Service("patchbay-modelhost"))
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
		TracerProvider:   tracerProvider,
		Repository:       *repo,
		Logger:           log,
		MeterProvider:    metrics.Provider,
		MetricsHandler:   metrics.Handler,
		MaxBodyBytes:     *maxBody,
		AdminTokenFile:   *tokenFile,
		MaxInflight:      *maxInflight,
		MaxInflightBytes: *maxInflightBytes,
		TLS:              tlsSource,
		ShadowRecords:    *shadowRecords,
		ShadowSample:     *shadowSample,
		FeatureStore:     *featureStore,
		FeatureTimeout:   *featureTimeout,
		FeatureCacheTTL:  *featureCacheTTL,
		FeatureCacheSize: *featureCacheSize,
		Runtimes:         builtin.LoadersWith(builtin.Options{ONNXRuntimeLib: *onnxLib}),
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
	var al net.Listener
	if *adminAddr != "" {
		if al, err = net.Listen("tcp", *adminAddr); err != nil {
			hl.Close()
			gl.Close()
			srv.Close()
			return fmt.Errorf("modelhost: listen admin: %w", err)
		}
	}
	return srv.ServeAll(ctx, modelhost.Listeners{HTTP: hl, GRPC: gl, Admin: al})
}
