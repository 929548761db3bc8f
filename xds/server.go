// Package xds is patchbay's control plane: it watches a directory of rollout files and
// serves Envoy nodes, proxyless gRPC clients and ext_proc instances over ADS (SotW and
// delta), with an admin HTTP API for readiness, metrics, status and rollbacks.
//
// What to serve is decided in xds/translate (pure) from xds/rollout (the file format);
// this package only wires go-control-plane's caches and server to them.
package xds

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/experimental"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"

	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
	"github.com/patchbay-io/patchbay/internal/telemetry"
	"github.com/patchbay-io/patchbay/internal/tlsfiles"
	"github.com/patchbay-io/patchbay/xds/analysis"
	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/shadow"
	"github.com/patchbay-io/patchbay/xds/store"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// Config configures the control plane. Flags map onto it 1:1 in cmd/patchbay.
type Config struct {
	// RolloutsDir is the directory of rollout files that is watched (when Source is nil).
	RolloutsDir string
	// Source is where rollouts come from; nil: the files of RolloutsDir (watched, read once
	// settled: see Settle, Debounce, Resync).
	Source Source
	// Store keeps each model's slot map, rollback in force and history of splits, read on
	// every reload and written through compare-and-swap; replicas sharing a Store serve the
	// same. nil: store.File on StateFile when it is set, else a private store.Memory.
	Store store.Store
	// StoreRetry is how often a reload is retried while the Store cannot be read or written
	// (default 5s).
	StoreRetry time.Duration
	// Translate holds the Envoy listener addresses and other emitted knobs.
	Translate translate.Options
	// AdminToken guards the rollback API and every other mutation (at least 32 bytes).
	AdminToken string
	// AdminTokenFile holds the token instead (--admin-token-file); it is re-read when it
	// changes, so the token rotates without a restart. Neither set: only an mTLS client
	// with role operator may mutate (none without TLS).
	AdminTokenFile string
	// AllowEmpty lets a reload that finds no rollout at all remove every model. Without it
	// such a reload (an empty directory, a half-synced ConfigMap, a wrong mount) is refused
	// and reported like any bad config.
	AllowEmpty bool
	// Settle is how long the rollout files must stay unchanged (size, modification time
	// and content) before they are applied (default 100ms): a file written in several
	// writes is never applied half-written, and its parse errors are not reported until it
	// stops changing. Negative: apply at once (0: the default).
	Settle time.Duration
	// TLS, with Cert and Key, serves ADS and the admin API over TLS from files re-read when
	// they change. With CA too, client certificates are required and verified, and a
	// client's flavour and role follow its certificate (see PeerRoles), not what it says.
	TLS tlsfiles.Files
	// PeerRoles maps a client certificate's URI SAN to a role (edge, sidecar, grpc,
	// extproc, operator), beside the built-in spiffe://patchbay.local/role/<role>.
	PeerRoles map[string]string
	// Debounce is how long the directory must be quiet before a reload (default 10ms).
	Debounce time.Duration
	// Resync reloads the directory this often even without file events (default 30s).
	Resync time.Duration
	// DNSRefresh re-resolves endpoint host names this often (default 5s).
	DNSRefresh time.Duration
	// StateFile, when set (and Store is nil), keeps each model's slot map, rollback in force
	// and history across restarts (store.File: JSON, written atomically and fsynced after
	// every change, the previous state kept as <file>.prev). Without it a restarted control
	// plane lays splits out afresh, which can move users between versions whose shares did
	// not change, and forgets rollbacks.
	StateFile string
	// VersionHealth probes every version with a share this often on each resolved
	// endpoint of each protocol it serves (REST ready path, gRPC health service of the
	// version), and lends an unhealthy version's slots to the model's healthy versions
	// until it recovers (see health.go). 0: off (cmd/patchbay defaults to
	// translate.HealthCheckInterval).
	VersionHealth time.Duration
	// ContractRetry is how often a version held by its model's contract (its OIP metadata
	// breaks it or cannot be read) is read again (contract.go); 0: DefaultContractRetry.
	ContractRetry time.Duration
	// ContractWait is how long, at start, ADS waits for the first contract check of every
	// contracted version, so the first config clients get already holds those that break
	// it; versions still not read after it are served as written until read (fail open).
	// 0: DefaultContractWait; negative: no wait.
	ContractWait time.Duration
	// LookupHost resolves a host name (default net.DefaultResolver.LookupHost).
	LookupHost func(ctx context.Context, host string) ([]string, error)
	// Zones, when set, gives the zone of each address a host name resolves to (Kubernetes:
	// xds/endpointslice's Resolver.Zones, from the EndpointSlices' zone). Those endpoints
	// are served in one EDS locality per zone (translate.Input.Zones).
	Zones func(host string) map[string]string
	// ShadowAgreement, when set, answers the analysis gate shadow-agreement (xds/shadow's
	// comparison of a shadowed version); nil: such gates have no data and the analysis waits.
	ShadowAgreement analysis.ShadowFunc
	Logger          zerolog.Logger
	Metrics         *telemetry.Metrics
}

// Server is a running control plane.
type Server struct {
	// contractWaiting is set while Run waits, before serving ADS, for the first contract
	// checks (awaitFirstContracts): /readyz answers 503 meanwhile.
	contractWaiting atomic.Bool
	cfg             Config
	log             zerolog.Logger
	res             *resourceCache
	builder         *translate.Builder
	shadow          *shadow.Comparator // the Records service model hosts send predictions to
	// servingVersion is the config version being served (string), read by the stream
	// callbacks without the lock.
	servingVersion atomic.Value
	policies       *cachev3.LinearCache
	cache          cachev3.Cache
	metrics        *metrics

	tls      *tlsfiles.Source // nil without TLS
	identity bool             // client certificates required: roles follow them
	// upstream is the client side to versions served over TLS (--tls-cert/--tls-key,
	// --upstream-tls-ca), loaded once for the prober, the contract check and the
	// analysis scraper; nil: none (versions over TLS cannot be reached).
	upstream *tlsfiles.Source
	token    *tokenSource // nil: no bearer token configured
	peers    *peerRoles
	prober   *prober // nil: versions are not probed
	// contracts reads versions' OIP metadata for models with a contract (contract.go).
	contracts *contractChecker
	analyses  *analysisLoop
	source    Source
	store     store.Store

	// reloadMu serialises reloads (the first one, the watcher's, any caller's) from
	// read to apply, so an older read is never applied after a newer one.
	reloadMu sync.Mutex
	// afterRead, when set (tests only), runs in Reload between reading and applying.
	afterRead func(why string)

	// resolveKick asks refreshDNS for a round now (ResolveNow); buffered: kicks coalesce.
	resolveKick chan struct{}

	mu    sync.Mutex
	state state
}

// state is everything the server remembers between reloads; guarded by Server.mu.
type state struct {
	files *rollout.Set // last good set read from the source
	// models is each served model's durable state as stored (or, for a replica whose
	// source lags the store, as computed locally); slots, overrides and history are derived
	// from it (deriveLocked).
	models    map[string]store.ModelState
	slots     map[string]translate.SlotMap
	resolved  map[string][]string
	overrides map[string]*override
	history   map[string][]map[string]int // distinct splits the spec served, oldest first
	// synced is, per model, the spec fingerprint this server last agreed with the store on
	// (wrote, or found stored): a store holding another spec while ours is unchanged since
	// was moved on by a replica whose source is ahead, and is not written back.
	synced map[string]string
	// storeErr is why the Store could not be read or written on the last try (nil: fine).
	storeErr error
	// problems are the last read's problems per document (ProblemReporter).
	problems map[string][]*rollout.Error
	built    *translate.Output
	applied  time.Time
	// curErr is the error of the last reload when it failed (nil once one succeeds);
	// errs the last errorHistory distinct rejections, oldest first.
	curErr   *statusError
	errs     []statusError
	rejected int
	// readKey identifies the content of the last read of the files; rejectKey the last
	// rejection counted (content and error), so the 30 s resync or a DNS retry that meets
	// the same bad file again neither counts nor logs it again. Cleared on a good apply.
	readKey   string
	rejectKey string
	// zones is the zone of each endpoint address in the last config built (Config.Zones).
	zones map[string]string
	// dns is what is known of each endpoint host name: addresses, and whether it resolves.
	dns map[string]*NameStatus
	// unhealthy marks the versions the prober found unhealthy (model -> version): the
	// snapshots lend their slots to healthy versions; slots (the persisted map) is unchanged.
	unhealthy map[string]map[string]bool
	// contract is each contracted version's standing and what it holds at zero (contract.go).
	contract contractState
	// candidate is the last set read that was refused only because a version with a share
	// has no resolved endpoint; it is tried again when a name's addresses change.
	candidate *rollout.Set
	// fps memoises fingerprint by rollout value, and derived what deriveLocked made of each
	// model, for the rollouts of the last set: a reload of 10,000 models where one changed
	// recomputes one (the loader hands back the same *Rollout for a file it parsed before).
	fps     map[*rollout.Rollout]string
	derived map[string]derivedModel
}

// derivedModel is what deriveLocked made of one model's spec and stored state.
type derivedModel struct {
	spec  *rollout.Rollout
	state store.ModelState
	slots translate.SlotMap
	ov    *override
}

// NameStatus is one endpoint host name's resolution, as /status shows it.
type NameStatus struct {
	Addresses []string `json:"addresses"`
	// State is ok, unresolved (never resolved: its versions have no endpoints from it) or
	// stale (resolved before, fails now: its last known addresses are kept).
	State string    `json:"state"`
	Error string    `json:"error,omitempty"`
	Since time.Time `json:"since"`
}

// override is a rollback in force: it holds until the model's file content changes.
type override struct {
	rollout   *rollout.Rollout
	fileFP    string
	reason    string
	at        time.Time
	fromIndex int // history index of the split it restored; -1 for a named version
}

type statusError struct {
	At      time.Time `json:"at"`
	Message string    `json:"message"`
}

// errorHistory is how many distinct rejections /status keeps.
const errorHistory = 10

// New builds a server. It does not read the rollout directory yet: Run does.
func New(cfg Config) (*Server, error) {
	if cfg.RolloutsDir == "" && cfg.Source == nil {
		return nil, errors.New("xds: no rollouts directory")
	}
	if cfg.StoreRetry <= 0 {
		cfg.StoreRetry = 5 * time.Second
	}
	if cfg.Debounce <= 0 {
		cfg.Debounce = 10 * time.Millisecond
	}
	if cfg.Resync <= 0 {
		cfg.Resync = 30 * time.Second
	}
	if cfg.Settle == 0 {
		cfg.Settle = 100 * time.Millisecond
	}
	if cfg.DNSRefresh <= 0 {
		cfg.DNSRefresh = 5 * time.Second
	}
	if cfg.LookupHost == nil {
		cfg.LookupHost = net.DefaultResolver.LookupHost
	}
	if cfg.Metrics == nil {
		m, err := telemetry.NewMetrics()
		if err != nil {
			return nil, err
		}
		cfg.Metrics = m
	}
	log := cfg.Logger.With().Str("component", "xds").Logger()
	s := &Server{
		cfg:      cfg,
		log:      log,
		res:      newResourceCache(),
		builder:  translate.NewBuilder(cfg.Translate),
		policies: cachev3.NewLinearCache(policyv1.TypeURL),
		state: state{
			models:    map[string]store.ModelState{},
			slots:     map[string]translate.SlotMap{},
			resolved:  map[string][]string{},
			overrides: map[string]*override{},
			history:   map[string][]map[string]int{},
			synced:    map[string]string{},
			dns:       map[string]*NameStatus{},
		},
		source:      cfg.Source,
		store:       cfg.Store,
		resolveKick: make(chan struct{}, 1),
	}
	if s.source == nil {
		s.source = &dirSource{dir: cfg.RolloutsDir, debounce: cfg.Debounce, resync: cfg.Resync, settle: cfg.Settle}
	}
	if s.store == nil {
		if cfg.StateFile != "" {
			s.store = store.NewFile(cfg.StateFile)
		} else {
			s.store = store.NewMemory()
		}
	}
	if cfg.AdminToken != "" || cfg.AdminTokenFile != "" {
		ts, err := newTokenSource(cfg.AdminToken, cfg.AdminTokenFile)
		if err != nil {
			return nil, err
		}
		s.token = ts
	}
	peers, err := newPeerRoles(cfg.PeerRoles)
	if err != nil {
		return nil, err
	}
	s.peers = peers
	if cfg.TLS.Enabled() {
		if cfg.TLS.Cert == "" {
			return nil, errors.New("xds: TLS needs a certificate and key (--tls-cert, --tls-key)")
		}
		src, err := tlsfiles.Load(cfg.TLS, tlsfiles.Options{OnError: func(err error) {
			log.Error().Err(err).Msg("TLS files changed but cannot be loaded; keeping the last good ones")
		}})
		if err != nil {
			return nil, fmt.Errorf("xds: %w", err)
		}
		s.tls, s.identity = src, cfg.TLS.CA != ""
	}
	caches := s.res.muxCaches()
	caches[policyKey] = s.policies
	caches[silentKey] = silentCache{}
	// A request goes to its flavour's cache of its type (the policy to the one policy
	// cache); a node the callbacks did not admit, or a type no flavour is served, to a
	// cache that never answers.
	classify := func(n *corev3.Node, typeURL string) string {
		if typeURL == policyv1.TypeURL {
			return policyKey
		}
		if k := muxKey(nodeHash{}.ID(n), typeURL); caches[k] != nil {
			return k
		}
		return silentKey
	}
	s.cache = &nackGuard{Cache: &cachev3.MuxCache{
		Classify:      func(r *cachev3.Request) string { return classify(r.GetNode(), r.GetTypeUrl()) },
		ClassifyDelta: func(r *cachev3.DeltaRequest) string { return classify(r.GetNode(), r.GetTypeUrl()) },
		Caches:        caches,
	}, scopesVersion: s.res.scopesVersion}
	s.upstream = s.loadUpstreamTLS()
	if cfg.VersionHealth > 0 {
		s.prober = s.newProber()
	}
	s.analyses = s.newAnalysisLoop()
	s.contracts = s.newContractChecker()
	if err := s.registerContractMetrics(cfg.Metrics.Meter("patchbay/xds")); err != nil {
		return nil, err
	}
	m, err := newMetrics(cfg.Metrics.Meter("patchbay/xds"), s)
	if err != nil {
		return nil, err
	}
	// Shadow comparison: model hosts stream sampled prediction records on the ADS port.
	// With client certificates required, only a model host may send them.
	s.shadow, err = shadow.New(shadow.Config{Meter: cfg.Metrics.Meter("patchbay/xds/shadow"), Authorize: s.authorizeRecords})
	if err != nil {
		return nil, err
	}
	if s.cfg.ShadowAgreement == nil {
		s.cfg.ShadowAgreement = s.shadowAgreement
	}
	s.metrics = m
	return s, nil
}

// authorizeRecords admits a prediction record stream: from anyone without client
// certificates (like ADS itself), else only from a certificate with role modelhost.
func (s *Server) authorizeRecords(ctx context.Context) error {
	if !s.identity {
		return nil
	}
	if role := s.peers.streamRole(ctx); role != "modelhost" {
		return status.Errorf(codes.PermissionDenied, "xds: prediction records come from model hosts (role modelhost), not role %q", role)
	}
	return nil
}

// shadowAgreement answers the analysis gate shadow-agreement from the records compared so
// far for a model's shadowed version and output (since the control plane started).
func (s *Server) shadowAgreement(model, version, output string) (agreement, meanAbsDiff float64, pairs int, ok bool) {
	for _, r := range s.shadow.Results().Outputs {
		if r.Model == model && r.Version == version && r.Output == output && r.Pairs > 0 {
			agreement = math.NaN() // the output has no class: only its values compare
			if r.Agreement != nil {
				agreement = *r.Agreement
			}
			return agreement, r.MeanAbsDiff, int(r.Pairs), true
		}
	}
	return 0, 0, 0, false
}

// Cache exposes the composed cache (for tests and embedding).
func (s *Server) Cache() cachev3.Cache { return s.cache }

// sendBuffers is the gRPC server's buffer pool (see GRPCServer).
var sendBuffers = func() mem.BufferPool {
	p, err := mem.NewBinaryTieredBufferPool(8, 12, 14, 15, 16, 17, 18, 19, 20)
	if err != nil {
		panic(err) // static sizes: a failure is a programming error
	}
	return p
}()

// GRPCServer returns a gRPC server with ADS (SotW and delta) and the health service
// registered. The per-type LDS/RDS/CDS/EDS services are not: every client uses ADS (the
// Envoy bootstraps, grpc-go's xDS client, ext_proc), and their unary Fetch* calls would
// bypass the stream callbacks that decide a client's flavour from its certificate.
func (s *Server) GRPCServer(ctx context.Context) *grpc.Server {
	opts := []grpc.ServerOption{
		grpc.MaxConcurrentStreams(1_000_000),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		// Send buffers in power-of-two tiers up to 1 MiB: grpc-go's default pool jumps from
		// 32 KiB to 1 MiB and clears the whole buffer it hands out, so every xDS response
		// between the two (a route table, a batch of clusters) paid for zeroing 1 MiB: 19%
		// of the control plane's CPU in the fan-out benchmark (test/bench/fanout).
		experimental.BufferPool(sendBuffers),
	}
	if s.tls != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(s.tls.ServerConfig("h2"))))
	}
	gs := grpc.NewServer(opts...)
	s.shadow.Register(gs)
	xs := serverv3.NewServer(ctx, s.cache, s.callbacks())
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(gs, xs)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	return gs
}

// Run loads the rollouts, then serves ADS on grpcLis and the admin API on adminLis until
// ctx is done, reloading on file changes and re-resolving DNS names.
func (s *Server) Run(ctx context.Context, grpcLis, adminLis net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// bg counts the goroutines Run starts: Run returns once they have ended (bounded), so
	// nothing of a stopped server still reloads, writes status or logs.
	var bg sync.WaitGroup
	defer func() { cancel(); waitBounded(&bg, 5*time.Second, s.log) }()
	errc := make(chan error, 8) // one per sender below: none blocks once Run stops reading
	// The watch goes in place first, then the first load: an edit in between is seen.
	watching := make(chan struct{})
	bg.Go(func() {
		errc <- s.source.Watch(ctx, func() { close(watching) }, func() { s.Reload(ctx, "files changed") })
	})
	select {
	case <-watching:
	case err := <-errc:
		grpcLis.Close()
		adminLis.Close()
		return err
	}
	s.Reload(ctx, "start")
	bg.Go(func() { s.watchStore(ctx) })
	bg.Go(func() { s.retryStore(ctx) })
	gs := s.GRPCServer(ctx)
	if s.tls != nil {
		adminLis = tls.NewListener(adminLis, s.tls.ServerConfig("h2", "http/1.1"))
	}
	admin := &http.Server{Handler: s.AdminHandler(), ReadHeaderTimeout: adminReadHeaderTimeout,
		ReadTimeout: adminReadTimeout, WriteTimeout: adminWriteTimeout, IdleTimeout: adminIdleTimeout}
	go func() {
		if err := admin.Serve(adminLis); !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("admin: %w", err)
			return
		}
		errc <- nil
	}()
	bg.Go(func() { s.checkContracts(ctx); errc <- nil })
	s.awaitFirstContracts(ctx) // the first config served holds versions that break their contract
	go func() { errc <- serveGRPC(gs, grpcLis) }()
	bg.Go(func() { s.refreshDNS(ctx); errc <- nil })
	if s.prober != nil {
		bg.Go(func() { s.probeVersions(ctx); errc <- nil })
	}
	bg.Go(func() { s.runAnalyses(ctx) })
	s.log.Info().Str("ads", grpcLis.Addr().String()).Str("admin", adminLis.Addr().String()).
		Str("rollouts", s.source.Describe()).Msg("control plane serving")

	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	cancel()
	shutdownCtx, stop := context.WithTimeout(context.Background(), 5*time.Second)
	defer stop()
	_ = admin.Shutdown(shutdownCtx)
	stopped := make(chan struct{})
	go func() { gs.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-shutdownCtx.Done():
		gs.Stop() // xDS streams never end on their own: do not wait forever
	}
	return err
}

// waitBounded waits for wg, at most d (a goroutine stuck past it is logged, not waited for).
func waitBounded(wg *sync.WaitGroup, d time.Duration, log zerolog.Logger) {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
		log.Warn().Dur("waited", d).Msg("control plane stopped; some of its background work has not ended yet")
	}
}

// The admin HTTP server's timeouts: its requests are small JSON bodies and its answers
// (/status, /metrics) small, so a client that trickles or stalls is cut off. Variables
// only so tests can shorten them.
var (
	adminReadHeaderTimeout = 5 * time.Second
	adminReadTimeout       = 10 * time.Second
	adminWriteTimeout      = 30 * time.Second
	adminIdleTimeout       = 2 * time.Minute
)

func serveGRPC(gs *grpc.Server, lis net.Listener) error {
	if err := gs.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("ads: %w", err)
	}
	return nil
}

// Reload reads the rollouts from the source and applies them if they are valid, on the
// state the Store holds. A bad read changes nothing that is served: the error is logged,
// counted and shown on /status. Files still changing are not read as a config at all: a
// later event reloads them. A Store that cannot be read changes nothing either: the server
// is not ready, shows why and retries (Config.StoreRetry).
func (s *Server) Reload(ctx context.Context, why string) {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	files, settled, err := s.source.Read(ctx)
	if !settled {
		s.log.Info().Str("reason", why).Dur("settle", s.cfg.Settle).
			Msg("rollout files are still changing; they are applied once they settle")
		return
	}
	var set *rollout.Set
	if err == nil {
		set, err = rollout.LoadData(files)
	}
	if err == nil {
		for _, w := range rollout.Warnings(set) {
			s.log.Warn().Msg(w.Error())
		}
	}
	if s.afterRead != nil {
		s.afterRead(why)
	}
	if err == nil && len(set.Rollouts) == 0 && !s.cfg.AllowEmpty {
		err = fmt.Errorf("no rollout in %s (an empty directory, a half-synced ConfigMap or a wrong mount?): "+
			"refusing to remove every model (start with --allow-empty to allow it)", s.source.Describe())
		s.metrics.emptyRefused.Add(ctx, 1)
	}
	if err == nil {
		// Resolve names never seen before outside the lock: a slow or failing DNS must
		// not stall /readyz, /status or the rollback API.
		s.resolveNew(ctx, set)
	}
	var stored map[string]store.ModelState
	var storeErr error
	if err == nil {
		stored, storeErr = s.store.Load(ctx)
	}
	s.mu.Lock()
	s.state.readKey = contentKey(files)
	s.state.problems = documentProblems(err)
	if err != nil && len(s.state.problems) == 0 {
		s.problemOfAllLocked(err) // a read error, an empty set: no document to blame
	}
	switch {
	case err != nil:
		s.rejectLocked(ctx, fmt.Errorf("rollouts rejected, still serving the last good config: %w", err))
	case storeErr != nil:
		s.storeFailedLocked(ctx, storeErr)
	default:
		s.applyFilesLocked(ctx, set, why, stored)
	}
	s.mu.Unlock()
	s.report(ctx)
}

// reloadState applies the Store's state, changed by another replica, to the rollouts
// already read (no new read of the source: the state is all that changed).
func (s *Server) reloadState(ctx context.Context, why string) {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	s.mu.Lock()
	set := s.state.files
	s.mu.Unlock()
	if set == nil {
		return // nothing read yet (or nothing good): the next reload of the source applies it
	}
	stored, err := s.store.Load(ctx)
	s.mu.Lock()
	if err != nil {
		s.storeFailedLocked(ctx, err)
	} else {
		s.applyFilesLocked(ctx, set, why, stored)
	}
	s.mu.Unlock()
	s.report(ctx)
}

// watchStore reloads the state whenever another replica may have changed it.
func (s *Server) watchStore(ctx context.Context) {
	for ctx.Err() == nil {
		err := s.store.Watch(ctx, func() { s.reloadState(ctx, "state changed") })
		if err == nil {
			return // ended with ctx, or a store with one writer: nothing to watch
		}
		s.log.Error().Err(err).Dur("retry", s.cfg.StoreRetry).Msg("cannot watch the state store; retrying")
		select {
		case <-ctx.Done():
		case <-time.After(s.cfg.StoreRetry):
			s.reloadState(ctx, "state watch restarted") // changes missed meanwhile
		}
	}
}

// retryStore reloads every StoreRetry while the Store could not be read or written.
func (s *Server) retryStore(ctx context.Context) {
	t := time.NewTicker(s.cfg.StoreRetry)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.mu.Lock()
			failed := s.state.storeErr != nil
			s.mu.Unlock()
			if failed {
				s.Reload(ctx, "retry: state store")
			}
		}
	}
}

// storeFailedLocked records that the Store could not be read or written: nothing new is
// applied (the last good config stays served), /status shows the error with its recovery,
// it is logged once per distinct error, and retryStore tries again.
func (s *Server) storeFailedLocked(ctx context.Context, err error) {
	first := s.state.storeErr == nil || s.state.storeErr.Error() != err.Error()
	s.state.storeErr = err
	msg := fmt.Errorf("state store %s: serving nothing new until it can be read: %w", describeStore(s.store), err)
	s.problemOfAllLocked(msg)
	if first {
		s.log.Error().Err(err).Str("store", describeStore(s.store)).Dur("retry", s.cfg.StoreRetry).
			Msg("state store unusable; serving nothing new until it is recovered (see the xds README)")
	}
	e := statusError{At: time.Now().UTC(), Message: msg.Error()}
	if s.state.curErr == nil || s.state.curErr.Message != e.Message {
		s.state.curErr = &e
		s.state.errs = append(s.state.errs, e)
		if n := len(s.state.errs); n > errorHistory {
			s.state.errs = s.state.errs[n-errorHistory:]
		}
	}
}

func describeStore(st store.Store) string {
	switch v := st.(type) {
	case *store.File:
		return "file " + v.Path()
	case *store.Memory:
		return "memory"
	default:
		return fmt.Sprintf("%T", st)
	}
}

// storeCorrupt reports whether the Store holds a state that cannot be read back.
func (s *Server) storeCorrupt() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state.storeErr != nil && errors.Is(s.state.storeErr, store.ErrCorrupt) {
		return s.state.storeErr
	}
	return nil
}

// documentProblems groups a load error's rollout problems by document.
func documentProblems(err error) map[string][]*rollout.Error {
	if err == nil {
		return nil
	}
	out := map[string][]*rollout.Error{}
	var walk func(error)
	walk = func(e error) {
		if j, ok := e.(interface{ Unwrap() []error }); ok {
			for _, c := range j.Unwrap() {
				walk(c)
			}
			return
		}
		var re *rollout.Error
		if errors.As(e, &re) {
			out[re.File] = append(out[re.File], re)
		}
	}
	walk(err)
	return out
}

// problemOfAllLocked makes err a problem of every document for the ProblemReporter
// (AllDocuments), beside the documents' own: what their authors wrote is not served.
func (s *Server) problemOfAllLocked(err error) {
	p := make(map[string][]*rollout.Error, len(s.state.problems)+1)
	for k, v := range s.state.problems {
		p[k] = v
	}
	p[AllDocuments] = []*rollout.Error{{Msg: err.Error()}}
	s.state.problems = p // a new map: the last one may be in a ProblemReporter's hands
}

// clearProblemOfAllLocked forgets the failure of no one document (a config was applied).
func (s *Server) clearProblemOfAllLocked() {
	if _, ok := s.state.problems[AllDocuments]; !ok {
		return
	}
	p := make(map[string][]*rollout.Error, len(s.state.problems))
	for k, v := range s.state.problems {
		if k != AllDocuments {
			p[k] = v
		}
	}
	s.state.problems = p
}

// report hands each document's problems and the config version served to a Source that
// shows them where its authors look.
func (s *Server) report(ctx context.Context) {
	pr, ok := s.source.(ProblemReporter)
	if !ok {
		return
	}
	s.mu.Lock()
	problems, version := s.state.problems, ""
	if s.state.built != nil {
		version = s.state.built.Version
	}
	s.mu.Unlock()
	pr.Report(ctx, problems, version)
}

// applyFilesLocked makes set the rollouts served, on the stored state, or keeps the
// previous ones. For each model it plans the state that serves its spec (planState) from
// the stored one; the plan is translated and checked before anything is written, then
// written through Store.Update (the same rule re-run on the state a concurrent writer
// left), and what the Store kept is what is served.
func (s *Server) applyFilesLocked(ctx context.Context, set *rollout.Set, why string, stored map[string]store.ModelState) {
	prev := s.saveLocked()
	prevVersion := ""
	if s.state.built != nil {
		prevVersion = s.state.built.Version
	}
	if s.state.storeErr != nil {
		// The store was unreadable (an operator may have restored or replaced it since):
		// what it holds now is the truth, not what we agreed on before.
		s.state.synced = map[string]string{}
	}
	models := make(map[string]store.ModelState, len(set.Rollouts))
	var writes []*rollout.Rollout
	var released []string
	s.rememberFingerprintsLocked(set)
	for _, r := range set.Rollouts {
		fp := s.fingerprintLocked(r)
		cur := stored[r.Model]
		next := planState(cur, r, fp)
		models[r.Model] = next
		if sameModelState(next, cur) {
			s.state.synced[r.Model] = fp
			continue
		}
		if cur.SpecFingerprint != "" && s.state.synced[r.Model] == fp {
			// Our spec has not changed since we last agreed with the store, which now holds
			// another: a replica whose source is ahead moved it on. Serve our spec on a
			// local layout until our source catches up; do not write it back.
			continue
		}
		if cur.Rollback != nil && next.Rollback == nil {
			released = append(released, r.Model)
		}
		writes = append(writes, r)
	}
	if set == s.state.files && len(writes) == 0 && s.state.built != nil && s.state.curErr == nil && sameModels(models, s.state.models) {
		s.clearProblemOfAllLocked()
		return // the state changed for another model, or back to what is served: nothing to do
	}
	s.state.files, s.state.models = set, models
	s.state.storeErr = nil
	s.deriveLocked()
	fail := func(err error) {
		s.restoreLocked(prev)
		s.state.candidate = nil
		if errors.Is(err, errUnresolved) {
			s.state.candidate = set
		}
		s.rejectLocked(ctx, err)
		s.problemOfAllLocked(err)
	}
	built, err := s.buildLocked()
	if err != nil {
		fail(err)
		return
	}
	changed := false
	for _, r := range writes {
		fp := s.fingerprintLocked(r)
		got, err := s.store.Update(ctx, r.Model, func(cur store.ModelState) (store.ModelState, error) {
			next := planState(cur, r, fp)
			if !sameModelState(next, cur) {
				next.ConfigVersion = built.Version
			}
			return next, nil
		})
		if err != nil {
			s.restoreLocked(prev)
			s.storeFailedLocked(ctx, fmt.Errorf("write model %s: %w", r.Model, err))
			return
		}
		if !sameModelState(got, models[r.Model]) {
			changed = true
		}
		models[r.Model] = got
		s.state.synced[r.Model] = fp
	}
	if changed {
		s.deriveLocked()
		built, err = s.buildLocked()
		if err != nil {
			fail(err)
			return
		}
	}
	if err := s.serveLocked(ctx, built, time.Now()); err != nil {
		fail(err)
		return
	}
	s.state.candidate = nil
	s.state.curErr, s.state.rejectKey = nil, ""
	s.clearProblemOfAllLocked()
	s.kickAnalyses()
	for _, model := range released {
		s.log.Info().Str("model", model).Msg("rollback released: the model's rollout changed")
	}
	// A reload that finds what is already served (the resync, a touch) is not news.
	if s.state.built.Version != prevVersion {
		s.log.Info().Str("version", s.state.built.Version).Str("reason", why).Int("models", len(set.Rollouts)).Msg("config applied")
	}
}

func sameModels(a, b map[string]store.ModelState) bool {
	if len(a) != len(b) {
		return false
	}
	for m, x := range a {
		y, ok := b[m]
		if !ok || !sameModelState(x, y) {
			return false
		}
	}
	return true
}

// saved is the part of the state a refused apply puts back.
type saved struct {
	files     *rollout.Set
	models    map[string]store.ModelState
	slots     map[string]translate.SlotMap
	overrides map[string]*override
	history   map[string][]map[string]int
	storeErr  error
}

func (s *Server) saveLocked() saved {
	return saved{s.state.files, s.state.models, s.state.slots, s.state.overrides, s.state.history, s.state.storeErr}
}

func (s *Server) restoreLocked(p saved) {
	s.state.files, s.state.models, s.state.slots, s.state.overrides, s.state.history, s.state.storeErr =
		p.files, p.models, p.slots, p.overrides, p.history, p.storeErr
}

// deriveLocked sets slots, overrides (rollbacks in force) and history from files and
// models. A slot map that does not give the effective split's shares (a state from before
// the spec, or edited by hand) is moved to it locally.
func (s *Server) deriveLocked() {
	slots := map[string]translate.SlotMap{}
	overrides := map[string]*override{}
	history := map[string][]map[string]int{}
	derived := make(map[string]derivedModel, len(s.state.files.Rollouts))
	for _, r := range s.state.files.Rollouts {
		ms := s.state.models[r.Model]
		d, ok := s.state.derived[r.Model]
		if !ok || d.spec != r || !sameModelState(d.state, ms) {
			d = s.deriveModelLocked(r, ms)
		}
		derived[r.Model] = d
		if d.ov != nil {
			overrides[r.Model] = d.ov
		}
		slots[r.Model] = d.slots
		history[r.Model] = ms.History
	}
	s.state.slots, s.state.overrides, s.state.history, s.state.derived = slots, overrides, history, derived
}

// deriveModelLocked is deriveLocked for one model.
func (s *Server) deriveModelLocked(r *rollout.Rollout, ms store.ModelState) derivedModel {
	d := derivedModel{spec: r, state: ms}
	fp := s.fingerprintLocked(r)
	rb := ms.Rollback
	if rb != nil && rb.SpecFingerprint != fp {
		rb = nil
	}
	eff := effectiveRollout(analysisSpec(r, ms.Analysis, fp), rb)
	if rb != nil {
		d.ov = &override{rollout: eff, fileFP: rb.SpecFingerprint, reason: rb.Reason, at: rb.At, fromIndex: rb.FromIndex}
	}
	m := toSlotMap(ms.Slots)
	if !consistentSlots(m, eff) {
		m = translate.NextSlotMap(m, versionList(eff), eff.Traffic)
	}
	d.slots = m
	return d
}

// fingerprintLocked is fingerprint(r), memoised for the rollouts of the current set.
func (s *Server) fingerprintLocked(r *rollout.Rollout) string {
	if fp, ok := s.state.fps[r]; ok {
		return fp
	}
	fp := fingerprint(r)
	if s.state.fps == nil {
		s.state.fps = map[*rollout.Rollout]string{}
	}
	s.state.fps[r] = fp
	return fp
}

// rememberFingerprintsLocked keeps the memoised fingerprints of set's rollouts only.
func (s *Server) rememberFingerprintsLocked(set *rollout.Set) {
	fps := make(map[*rollout.Rollout]string, len(set.Rollouts))
	for _, r := range set.Rollouts {
		if fp, ok := s.state.fps[r]; ok {
			fps[r] = fp
		}
	}
	s.state.fps = fps
}

// rejectLocked records a refused config: it is the current error, and it is counted, logged
// and kept in the error history once per distinct content and error (the same bad file met
// again by the resync is one mistake, not a stream of them).
func (s *Server) rejectLocked(ctx context.Context, err error) {
	e := statusError{At: time.Now().UTC(), Message: err.Error()}
	key := s.state.readKey + "|" + e.Message
	if key == s.state.rejectKey && s.state.curErr != nil {
		s.state.curErr.Message = e.Message
		return
	}
	s.state.curErr, s.state.rejectKey = &e, key
	s.state.errs = append(s.state.errs, e)
	if n := len(s.state.errs); n > errorHistory {
		s.state.errs = s.state.errs[n-errorHistory:]
	}
	s.state.rejected++
	s.metrics.rejected.Add(ctx, 1)
	s.log.Error().Err(err).Msg("config rejected")
}

// contentKey identifies what a read of the rollout files saw (names, bytes, read errors).
func contentKey(files []rollout.File) string {
	h := sha256.New()
	for _, f := range files {
		fmt.Fprintf(h, "%s\x00%d\x00", f.Path, len(f.Data))
		h.Write(f.Data)
		if f.Err != nil {
			fmt.Fprintf(h, "\x00%s", f.Err)
		}
		h.Write([]byte{0})
	}
	return hex.EncodeToString(h.Sum(nil)[:12])
}

// effectiveLocked is the file set with rollbacks substituted.
func (s *Server) effectiveLocked() *rollout.Set {
	out := &rollout.Set{}
	for _, r := range s.state.files.Rollouts {
		if o := s.state.overrides[r.Model]; o != nil {
			out.Rollouts = append(out.Rollouts, s.holdLocked(o.rollout))
			continue
		}
		// A running analysis serves its step's split (analysis_loop.go); a contract holds
		// the versions that break it at zero (contract.go).
		out.Rollouts = append(out.Rollouts, s.holdLocked(analysisSpec(r, s.state.models[r.Model].Analysis, s.fingerprintLocked(r))))
	}
	return out
}

// buildLocked translates the effective set on the current slot maps and checks it,
// without serving it.
func (s *Server) buildLocked() (*translate.Output, error) {
	set := s.effectiveLocked()
	if err := s.checkResolvedLocked(set); err != nil {
		return nil, fmt.Errorf("config rejected, still serving the last good config: %w", err)
	}
	slots := translate.SlotMaps(set, s.state.slots)
	in := &translate.Input{Set: set, Slots: slots, Resolved: s.state.resolved, Unhealthy: s.state.unhealthy, Zones: s.zonesLocked(set)}
	built, err := s.builder.Build(in)
	if err != nil {
		return nil, fmt.Errorf("translation rejected, still serving the last good config: %w", err)
	}
	s.state.zones = in.Zones
	return built, nil
}

// applyLocked translates the effective set and, only if every check passes, swaps the
// snapshots and the policy.
func (s *Server) applyLocked(ctx context.Context) error {
	start := time.Now()
	built, err := s.buildLocked()
	if err != nil {
		return err
	}
	return s.serveLocked(ctx, built, start)
}

// serveLocked swaps the snapshots and the policy for built (checked by buildLocked).
func (s *Server) serveLocked(ctx context.Context, built *translate.Output, start time.Time) error {
	if s.state.built != nil && built.Version == s.state.built.Version {
		return nil // nothing changed
	}
	// Responses sent from here on are labelled with the new version (labelVersion): the
	// linear caches answer the watches during apply.
	prevServing := s.servingVersion.Load()
	s.servingVersion.Store(built.Version)
	if err := s.res.apply(built); err != nil {
		if prevServing != nil {
			s.servingVersion.Store(prevServing)
		}
		return fmt.Errorf("serve: %w", err)
	}
	if err := s.policies.UpdateResource(policyv1.ResourceName, built.Policy); err != nil {
		return fmt.Errorf("set policy: %w", err)
	}
	s.state.built = built
	s.state.applied = time.Now().UTC()
	s.kickContracts() // a version may have appeared or moved: read its metadata now
	s.metrics.applies.Add(ctx, 1)
	s.metrics.applySeconds.Record(ctx, time.Since(start).Seconds())
	return nil
}

// Version is the config version being served ("" before the first good config).
func (s *Server) Version() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state.built == nil {
		return ""
	}
	return s.state.built.Version
}

// zonesLocked asks Config.Zones for the zone of every address the set's host names
// resolve to (nil without Config.Zones). It reads the resolver's cache: no lookups.
func (s *Server) zonesLocked(set *rollout.Set) map[string]string {
	if s.cfg.Zones == nil {
		return nil
	}
	out := map[string]string{}
	for _, h := range translate.Hostnames(set) {
		for addr, z := range s.cfg.Zones(h) {
			if z != "" {
				out[addr] = z
			}
		}
	}
	return out
}
