// Package modelhost is patchbay's model host: it loads a model repository
// (<dir>/<model>/<version>/model.yaml + artifact) and serves every version over the Open
// Inference Protocol, REST and gRPC, with dynamic batching, OpenTelemetry metrics and
// spans, and load/unload that never drops a request.
package modelhost

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"
	"google.golang.org/grpc/metadata"

	"github.com/patchbay-io/patchbay/api/headers"
	"github.com/patchbay-io/patchbay/internal/tlsfiles"
	"github.com/patchbay-io/patchbay/modelhost/internal/batch"
	"github.com/patchbay-io/patchbay/modelhost/internal/bearer"
	rt "github.com/patchbay-io/patchbay/modelhost/runtime"
	"github.com/patchbay-io/patchbay/modelhost/runtime/builtin"
	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

// Config configures a Server. Zero values take the documented defaults.
type Config struct {
	// Repository is the directory holding <model>/<version>/model.yaml.
	Repository string
	Logger     zerolog.Logger
	// MeterProvider receives the host's metrics; nil disables them.
	MeterProvider metric.MeterProvider
	// MetricsHandler, if set, is served at GET /metrics on the HTTP listener.
	MetricsHandler http.Handler
	// TracerProvider receives server spans; nil disables tracing.
	TracerProvider trace.TracerProvider
	// Runtimes maps model.yaml's runtime names to loaders; nil means the built-ins
	// (xgboost, linear, embedding).
	Runtimes map[string]rt.Loader
	// MaxBodyBytes bounds a REST body and a gRPC message (default 8 MiB).
	MaxBodyBytes int64
	// MaxTensorElements bounds the elements of any one input tensor (default 1<<20).
	MaxTensorElements int
	// ServerName and ServerVersion answer GET /v2 and ServerMetadata.
	ServerName, ServerVersion string
	// ShutdownTimeout bounds graceful shutdown in Serve (default 10s).
	ShutdownTimeout time.Duration

	// AdminTokenFile holds the bearer token of the repository API on the admin listener
	// (at least 32 bytes, re-read when the file changes). Empty: the repository API is
	// disabled and answers 403 / PermissionDenied saying so.
	AdminTokenFile string
	// MaxInflight bounds the inference requests (REST and gRPC together) in flight on the
	// host; the excess is refused at once (429 / ResourceExhausted). Default
	// DefaultMaxInflight().
	MaxInflight int
	// MaxInflightBytes bounds the request bytes held by requests in flight (default
	// 16 x MaxBodyBytes); it must be at least MaxBodyBytes.
	MaxInflightBytes int64
	// TLS, when set, serves every listener (REST, gRPC, admin) over TLS from files that
	// are re-read when they change; with a client CA, client certificates are required.
	TLS *tlsfiles.Source
	// HTTP server timeouts (defaults: ReadHeader 10s, Read 30s, Write 60s, Idle 2m). Read
	// bounds how long a slow client can hold an in-flight slot while sending its body.
	ReadHeaderTimeout, ReadTimeout, WriteTimeout, IdleTimeout time.Duration

	// ShadowRecords is the control plane's address (its ADS port) for the shadow
	// comparison's prediction records (patchbay.shadow.v1.Records/Send); empty: none are
	// sent. Over TLS with the host's certificate as client certificate and its client CA
	// as the control plane's CA when TLS is set.
	ShadowRecords string
	// ShadowSample is the share of requests, chosen by a hash of x-request-id (so the
	// primary and its mirror are chosen together), whose predictions are sent (default
	// DefaultShadowSample).
	ShadowSample float64
	// ShadowQueue bounds the records waiting to be sent (default DefaultShadowQueue);
	// beyond it they are dropped and counted.
	ShadowQueue int

	// FeatureStore is the Redis server of model.yaml's store features (host:port or a
	// redis:// URL); empty: store features take their defaults (reason no_store).
	FeatureStore string
	// FeatureTimeout bounds one request's feature store round trip (default
	// DefaultFeatureTimeout, 20 ms); beyond it features take their defaults.
	FeatureTimeout time.Duration
	// FeatureCacheSize bounds the entities whose features are cached locally (default
	// DefaultFeatureCacheSize); FeatureCacheTTL is how long an answer is reused (default
	// DefaultFeatureCacheTTL; negative: no cache).
	FeatureCacheSize int
	FeatureCacheTTL  time.Duration
}

// DefaultMaxInflight is 128 x GOMAXPROCS: enough for the dynamic batcher to fill two
// batches of 64 rows (one running, one filling) on each of its GOMAXPROCS instances, while
// a burst beyond it is refused instead of piling up goroutines and request buffers.
func DefaultMaxInflight() int { return 128 * runtime.GOMAXPROCS(0) }

// Server is a running model host.
type Server struct {
	cfg    Config
	log    zerolog.Logger
	table  atomic.Pointer[table]
	mu     sync.Mutex // serialises load and unload
	ready  atomic.Bool
	inst   *instruments
	tracer trace.Tracer
	// noTracer: the tracer provider is OpenTelemetry's no-op one (no --otlp endpoint).
	noTracer bool
	mux      *http.ServeMux
	closing  atomic.Bool

	token  *bearer.Token // nil: repository API disabled
	shadow *shadowSender // nil: no prediction records
	limits limits
	health versionHealth
	feats  *featureStore
}

// table is the immutable routing table, swapped whole on load and unload.
type table struct {
	models map[string]*model
}

type model struct {
	name     string
	versions map[string]*version
	names    []string // natural order
	def      *version // nil when no version is ready
}

// version is one loaded (or failed) model version.
type version struct {
	spec       *versionSpec
	model      rt.Model
	predict    batch.Func // model.Predict behind a recover
	batcher    *batch.Batcher
	err        error // load failure; the version is not ready
	finger     string
	servedBy   []string    // header value "model/version"
	servedByMD metadata.MD // the same as gRPC response metadata
	attrs      versionAttrs
	outs       []outputHist // by signature output
	feats      *featurePlan // nil: no features declared
	// contract is the model's contract.yaml as this version applies it (nil: none); set
	// at each load of the model, so a changed contract needs no runtime reload.
	contract atomic.Pointer[contractPlan]

	refs    atomic.Int64
	drained chan struct{}
	once    sync.Once
}

const closingBit = int64(1) << 62

func (v *version) ready() bool { return v.err == nil }

// acquire marks a request in flight; false once the version is being retired.
func (v *version) acquire() bool {
	if v.refs.Add(1)&closingBit != 0 {
		v.release()
		return false
	}
	return true
}

func (v *version) release() {
	if v.refs.Add(-1) == closingBit {
		v.once.Do(func() { close(v.drained) })
	}
}

// retire stops new requests, waits for those in flight, then stops the batcher.
func (v *version) retire() {
	if v.refs.Add(closingBit) == closingBit {
		v.once.Do(func() { close(v.drained) })
	}
	<-v.drained
	if v.batcher != nil {
		v.batcher.Stop()
	}
	if c, ok := v.model.(interface{ Close() error }); ok {
		_ = c.Close()
	}
}

// New loads the repository and returns a server ready to Serve. Versions that fail to
// load are kept as not ready with their reason; only an unreadable repository is an
// error.
func New(cfg Config) (*Server, error) {
	if cfg.Repository == "" {
		return nil, errors.New("modelhost: repository directory required")
	}
	if st, err := os.Stat(cfg.Repository); err != nil || !st.IsDir() {
		return nil, fmt.Errorf("modelhost: repository %q is not a directory", cfg.Repository)
	}
	if cfg.Runtimes == nil {
		cfg.Runtimes = builtin.Loaders()
	}
	if cfg.MaxBodyBytes <= 0 {
		cfg.MaxBodyBytes = 8 << 20
	}
	if cfg.MaxTensorElements <= 0 {
		cfg.MaxTensorElements = 1 << 20
	}
	if cfg.ServerName == "" {
		cfg.ServerName = "patchbay-modelhost"
	}
	if cfg.ServerVersion == "" {
		cfg.ServerVersion = "dev"
	}
	if cfg.ShutdownTimeout <= 0 {
		cfg.ShutdownTimeout = 10 * time.Second
	}
	if cfg.MaxInflight <= 0 {
		cfg.MaxInflight = DefaultMaxInflight()
	}
	if cfg.MaxInflightBytes <= 0 {
		cfg.MaxInflightBytes = 16 * cfg.MaxBodyBytes
	}
	if cfg.MaxInflightBytes < cfg.MaxBodyBytes {
		return nil, fmt.Errorf("modelhost: max in-flight bytes (%d) is below the max body bytes (%d): a request of the largest allowed size could never run", cfg.MaxInflightBytes, cfg.MaxBodyBytes)
	}
	for _, d := range []*time.Duration{&cfg.ReadHeaderTimeout, &cfg.ReadTimeout, &cfg.WriteTimeout, &cfg.IdleTimeout} {
		if *d < 0 {
			return nil, errors.New("modelhost: HTTP timeouts must not be negative")
		}
	}
	if cfg.ReadHeaderTimeout == 0 {
		cfg.ReadHeaderTimeout = 10 * time.Second
	}
	if cfg.ReadTimeout == 0 {
		cfg.ReadTimeout = 30 * time.Second
	}
	if cfg.WriteTimeout == 0 {
		cfg.WriteTimeout = 60 * time.Second
	}
	if cfg.IdleTimeout == 0 {
		cfg.IdleTimeout = 2 * time.Minute
	}
	var token *bearer.Token
	if cfg.AdminTokenFile != "" {
		t, err := bearer.Load(cfg.AdminTokenFile)
		if err != nil {
			return nil, fmt.Errorf("modelhost: %w", err)
		}
		token = t
	}
	if cfg.MeterProvider == nil {
		cfg.MeterProvider = metricnoop.NewMeterProvider()
	}
	if cfg.TracerProvider == nil {
		cfg.TracerProvider = tracenoop.NewTracerProvider()
	}
	s := &Server{cfg: cfg, log: cfg.Logger.With().Str("component", "modelhost").Logger(),
		tracer: cfg.TracerProvider.Tracer("github.com/patchbay-io/patchbay/modelhost"), token: token}
	_, s.noTracer = cfg.TracerProvider.(tracenoop.TracerProvider)
	s.limits.init(cfg.MaxInflight, cfg.MaxInflightBytes, cfg.MaxBodyBytes)
	inst, err := newInstruments(cfg.MeterProvider)
	if err != nil {
		return nil, fmt.Errorf("modelhost: metrics: %w", err)
	}
	s.inst = inst
	if s.feats, err = newFeatureStore(&cfg, cfg.MeterProvider); err != nil {
		return nil, fmt.Errorf("modelhost: %w", err)
	}
	if cfg.ShadowRecords != "" {
		if s.shadow, err = newShadowSender(s); err != nil {
			return nil, fmt.Errorf("modelhost: %w", err)
		}
	}
	s.table.Store(&table{models: map[string]*model{}})
	names, err := s.repositoryModels()
	if err != nil {
		return nil, err
	}
	for _, name := range names {
		if _, err := s.Load(name); err != nil {
			s.log.Warn().Err(err).Str("model", name).Msg("model not served")
		}
	}
	s.mux = s.routes()
	s.ready.Store(true)
	return s, nil
}

// repositoryModels lists the model directories in the repository.
func (s *Server) repositoryModels() ([]string, error) {
	ents, err := os.ReadDir(s.cfg.Repository)
	if err != nil {
		return nil, fmt.Errorf("modelhost: read repository: %w", err)
	}
	var names []string
	for _, e := range ents {
		if e.IsDir() && nameRE.MatchString(e.Name()) {
			names = append(names, e.Name())
		}
	}
	return names, nil
}

func fingerprint(files ...string) string {
	fp := ""
	for _, f := range files {
		st, err := os.Stat(f)
		if err != nil {
			return ""
		}
		fp += fmt.Sprintf("%s:%d:%d;", f, st.Size(), st.ModTime().UnixNano())
	}
	return fp
}

// errNotInRepository marks a load of a model the repository does not hold.
var errNotInRepository = errors.New("not in the repository")

// LoadReport says how a load went: the versions now served and those that failed.
type LoadReport struct {
	Ready  []string
	Failed map[string]error
}

// Load (re)loads every version of a model from the repository. Unchanged versions
// (same model.yaml and artifact size and mtime) are kept as they are; changed and new
// ones are loaded next to the old, the table is swapped, and only then are replaced
// versions retired (after their in-flight requests finish). It fails only when no
// version of the model is ready.
func (s *Server) Load(name string) (LoadReport, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	rep := LoadReport{Failed: map[string]error{}}
	if !nameRE.MatchString(name) {
		return rep, fmt.Errorf("model %q: %w", name, errNotInRepository)
	}
	dir := filepath.Join(s.cfg.Repository, name)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return rep, fmt.Errorf("model %q: %w", name, errNotInRepository)
	}
	old := s.table.Load()
	prev := old.models[name]
	m := &model{name: name, versions: map[string]*version{}}
	// A bad contract.yaml fails every version of the model: serving it unchecked would
	// drop the promise to its clients.
	con, cerr := loadContract(dir)
	for _, e := range ents {
		if !e.IsDir() || !nameRE.MatchString(e.Name()) {
			continue
		}
		vdir := filepath.Join(dir, e.Name())
		if _, err := os.Stat(filepath.Join(vdir, "model.yaml")); err != nil {
			continue
		}
		var v *version
		if cerr != nil {
			v = s.failedVersion(name, e.Name(), vdir, cerr)
		} else {
			v = s.loadVersion(prev, name, e.Name(), vdir)
			s.applyContract(v, con)
		}
		m.versions[e.Name()] = v
		m.names = append(m.names, e.Name())
		if v.ready() {
			rep.Ready = append(rep.Ready, e.Name())
		} else {
			rep.Failed[e.Name()] = v.err
			s.log.Warn().Str("model", name).Str("version", e.Name()).Err(v.err).Msg("version failed to load")
		}
	}
	sort.Slice(m.names, func(i, j int) bool { return versionLess(m.names[i], m.names[j]) })
	m.def = s.pickDefault(m)
	next := &table{models: make(map[string]*model, len(old.models)+1)}
	for k, v := range old.models {
		next.models[k] = v
	}
	next.models[name] = m
	s.table.Store(next)
	s.publishHealth()
	if prev != nil {
		for vn, pv := range prev.versions {
			if m.versions[vn] != pv {
				pv.retire()
			}
		}
	}
	s.log.Info().Str("model", name).Strs("ready", rep.Ready).Int("failed", len(rep.Failed)).Msg("model loaded")
	if len(rep.Ready) == 0 {
		errs := []error{fmt.Errorf("model %q: no version is ready", name)}
		for _, vn := range m.names {
			errs = append(errs, fmt.Errorf("version %q: %w", vn, rep.Failed[vn]))
		}
		return rep, errors.Join(errs...)
	}
	return rep, nil
}

func (s *Server) pickDefault(m *model) *version {
	var flagged, highest *version
	for _, vn := range m.names {
		v := m.versions[vn]
		if !v.ready() {
			continue
		}
		highest = v
		if v.spec.Default {
			if flagged != nil {
				s.log.Warn().Str("model", m.name).Msg("several versions set default: true; the highest wins")
			}
			flagged = v
		}
	}
	if flagged != nil {
		return flagged
	}
	for _, vn := range m.names {
		if v := m.versions[vn]; v.spec != nil && v.spec.Default && !v.ready() {
			s.log.Warn().Str("model", m.name).Str("version", vn).Msg("default version not ready; serving the highest ready version")
		}
	}
	return highest
}

func (s *Server) loadVersion(prev *model, name, vname, dir string) *version {
	v := &version{drained: make(chan struct{}), servedBy: []string{name + "/" + vname}}
	v.servedByMD = metadata.MD{headers.ServedBy: v.servedBy}
	v.attrs = s.inst.versionAttrs(name, vname)
	known := make([]string, 0, len(s.cfg.Runtimes))
	for k := range s.cfg.Runtimes {
		known = append(known, k)
	}
	slices.Sort(known)
	spec, err := loadSpec(dir, name, vname, known)
	if err != nil {
		v.err = err
		v.spec = &versionSpec{Model: name, Version: vname, Dir: dir}
		return v
	}
	v.spec = spec
	v.finger = fingerprint(filepath.Join(dir, "model.yaml"), spec.Artifact)
	if prev != nil {
		if pv := prev.versions[vname]; pv != nil && pv.ready() && pv.finger != "" && pv.finger == v.finger {
			return pv
		}
	}
	if v.outs, err = s.inst.outputHists(spec); err != nil {
		v.err = fmt.Errorf("output histograms: %w", err)
		return v
	}
	mdl, err := s.cfg.Runtimes[spec.Runtime](rt.Spec{Dir: dir, Artifact: spec.Artifact, Inputs: spec.Inputs, Outputs: spec.Outputs})
	if err != nil {
		v.err = err
		return v
	}
	v.model = mdl
	v.feats = newFeaturePlan(spec, s.feats)
	v.predict = s.guard(name, vname, mdl)
	if spec.MaxBatch > 0 {
		inst := spec.Instances
		if inst == 0 {
			inst = runtime.GOMAXPROCS(0)
		}
		attrs := v.attrs
		v.batcher = batch.New(batch.Config{MaxRows: spec.MaxBatch, MaxDelay: spec.MaxDelay, Instances: inst, QueueSize: spec.MaxQueue,
			Observe: func(rows int) { s.inst.batchRows.Record(context.Background(), int64(rows), attrs.base...) },
		}, v.predict)
	}
	return v
}

// guard turns a runtime panic into an error, so a faulty model fails its requests
// instead of the process.
func (s *Server) guard(model, version string, m rt.Model) batch.Func {
	return func(ctx context.Context, in []*tensor.Tensor) (out []*tensor.Tensor, err error) {
		defer func() {
			if p := recover(); p != nil {
				s.log.Error().Str("model", model).Str("version", version).Interface("panic", p).Msg("runtime panicked")
				out, err = nil, fmt.Errorf("runtime panicked: %v", p)
			}
		}()
		return m.Predict(ctx, in)
	}
}

// Unload removes a model from service, waiting for its in-flight requests.
func (s *Server) Unload(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.table.Load()
	m, ok := old.models[name]
	if !ok {
		return fmt.Errorf("model %q is not loaded", name)
	}
	next := &table{models: make(map[string]*model, len(old.models))}
	for k, v := range old.models {
		if k != name {
			next.models[k] = v
		}
	}
	s.table.Store(next)
	s.publishHealth()
	for _, v := range m.versions {
		v.retire()
	}
	s.log.Info().Str("model", name).Msg("model unloaded")
	return nil
}

// Close retires every version (waiting for in-flight requests).
func (s *Server) Close() {
	s.closing.Store(true)
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.table.Swap(&table{models: map[string]*model{}})
	s.publishHealth()
	for _, m := range old.models {
		for _, v := range m.versions {
			v.retire()
		}
	}
	s.feats.close()
}

// IndexEntry is one row of the repository index.
type IndexEntry struct {
	Name, Version, State, Reason string
}

// Index lists the repository's models and versions with their state.
func (s *Server) Index(readyOnly bool) []IndexEntry {
	t := s.table.Load()
	names, _ := s.repositoryModels()
	for n := range t.models {
		if !slices.Contains(names, n) {
			names = append(names, n)
		}
	}
	slices.Sort(names)
	var out []IndexEntry
	for _, n := range names {
		m, ok := t.models[n]
		if !ok {
			if !readyOnly {
				out = append(out, IndexEntry{Name: n, State: "UNAVAILABLE", Reason: "not loaded"})
			}
			continue
		}
		for _, vn := range m.names {
			v := m.versions[vn]
			e := IndexEntry{Name: n, Version: vn, State: "READY", Reason: v.contractReason()}
			if !v.ready() {
				if readyOnly {
					continue
				}
				e.State, e.Reason = "UNAVAILABLE", v.err.Error()
			}
			out = append(out, e)
		}
	}
	return out
}
