package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"

	"github.com/rs/zerolog"
	"go.opentelemetry.io/otel/trace"

	"github.com/patchbay-io/patchbay/extproc"
	"github.com/patchbay-io/patchbay/internal/runtimetune"
	"github.com/patchbay-io/patchbay/internal/telemetry"
	"github.com/patchbay-io/patchbay/internal/tlsfiles"
)

// extprocDefaults are `patchbay extproc`'s GC and memory-limit defaults, chosen by measurement
// against the floor server (test/bench/extproc BenchmarkExtprocSweep; the figures are in
// extproc/README.md, "Runtime defaults").
var extprocDefaults = runtimetune.Defaults{GCPercent: 800, LimitFraction: 0.9}

// runtimeSettings resolves a server's GC percent and memory limit: a flag the user gave
// wins, then $GOGC / $GOMEMLIMIT, then def (the memory limit from the container's cgroup).
func runtimeSettings(fs *flag.FlagSet, gcPercent, memoryLimit string, def runtimetune.Defaults) (runtimetune.Settings, error) {
	return resolveRuntime(fs, gcPercent, memoryLimit, def, os.Getenv, runtimetune.CgroupMemoryLimit(os.DirFS("/sys/fs/cgroup")))
}

// resolveRuntime is runtimeSettings with the environment and the container limit given.
func resolveRuntime(fs *flag.FlagSet, gcPercent, memoryLimit string, def runtimetune.Defaults, getenv func(string) string, cgroupLimit int64) (runtimetune.Settings, error) {
	in := runtimetune.Input{EnvGOGC: getenv("GOGC"), EnvGOMEMLIMIT: getenv("GOMEMLIMIT"), CgroupLimit: cgroupLimit, Defaults: def}
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "gc-percent":
			in.GCPercentFlag = gcPercent
		case "memory-limit":
			in.MemoryLimitFlag = memoryLimit
		}
	})
	return runtimetune.Resolve(in)
}

// workersPerProc × GOMAXPROCS is --stream-workers auto. grpc-go hands a new stream to an
// idle worker, else starts a goroutine for it, whose stack then grows (morestack and
// copystack were 8% of the server's CPU with 2 workers and 16 streams in flight); workers
// keep their grown stacks. Streams in flight grow with throughput, so with cores.
const workersPerProc = 8

// streamWorkers reads --stream-workers: auto (workersPerProc × GOMAXPROCS), 0 (a goroutine
// per stream) or N.
func streamWorkers(v string) (uint32, error) {
	if v == "auto" {
		return uint32(workersPerProc * runtime.GOMAXPROCS(0)), nil
	}
	n, err := strconv.ParseUint(v, 10, 16)
	if err != nil {
		return 0, fmt.Errorf("%q: want auto, 0 or a number of workers", v)
	}
	return uint32(n), nil
}

// runExtproc runs the ext_proc router until ctx ends.
func runExtproc(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("extproc", "[flags]", "The Envoy ext_proc router: takes its policy from the control plane (--xds) and picks\neach request's model version (sticky buckets, experiment arms).")
	listen := fs.String("listen", "127.0.0.1:18080", "ext_proc gRPC address (with the gRPC health service)")
	xdsAddr := fs.String("xds", "127.0.0.1:18000", "control plane ADS address")
	admin := fs.String("admin", "127.0.0.1:18081", "admin HTTP address: /readyz, /livez, /metrics")
	identity := fs.String("identity-headers", "x-user-id", "comma-separated identity headers, first present wins (used when the policy names none)")
	nodeID := fs.String("node-id", "", "xDS node id (default hostname-pid)")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	gcPercent := fs.String("gc-percent", strconv.Itoa(extprocDefaults.GCPercent), "GC percent (as GOGC; off: no GC but at the memory limit); precedence: this flag, then $GOGC, then the default (measured: extproc/README.md)")
	memoryLimit := fs.String("memory-limit", "auto", "soft memory limit of the Go runtime, e.g. 400MiB, or none; auto: 90% of the container's memory limit (cgroup) if it has one, else none; precedence: this flag, then $GOMEMLIMIT, then auto")
	workers := fs.String("stream-workers", "auto", "gRPC stream worker goroutines (grpc.NumStreamWorkers); auto: 8 x GOMAXPROCS; 0: a goroutine per stream")
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
	tune, err := runtimeSettings(fs, *gcPercent, *memoryLimit, extprocDefaults)
	if err != nil {
		return fmt.Errorf("extproc: %v: %w", err, errUsage)
	}
	numWorkers, err := streamWorkers(*workers)
	if err != nil {
		return fmt.Errorf("extproc: --stream-workers: %v: %w", err, errUsage)
	}
	tune.Apply()
	log.Info().Str("runtime", tune.String()).Int("stream_workers", int(numWorkers)).Msg("runtime settings")
	if path := os.Getenv(cpuProfileEnv); path != "" {
		stop, err := startCPUProfile(path)
		if err != nil {
			return fmt.Errorf("extproc: $%s: %w", cpuProfileEnv, err)
		}
		defer stop()
		log.Info().Str("path", path).Msg("writing a CPU profile until exit")
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
		NumStreamWorkers: numWorkers,
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

// cpuProfileEnv names a file that receives a CPU profile of the whole run (written when
// the process stops). test/bench/extproc/pgo.sh uses it to regenerate default.pgo, the
// profile `go build` optimises this binary with.
const cpuProfileEnv = "PATCHBAY_EXTPROC_CPUPROFILE"

func startCPUProfile(path string) (stop func(), err error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, err
	}
	return func() { pprof.StopCPUProfile(); f.Close() }, nil
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
