// Package xds is patchbay's control plane: it watches a directory of rollout files and
// serves Envoy nodes, proxyless gRPC clients and ext_proc instances over ADS (SotW and
// delta), with an admin HTTP API for readiness, metrics, status and rollbacks.
//
// What to serve is decided in xds/translate (pure) from xds/rollout (the file format);
// this package only wires go-control-plane's caches and server to them.
package xds

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"sort"
	"sync"
	"time"

	clusterservice "github.com/envoyproxy/go-control-plane/envoy/service/cluster/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	endpointservice "github.com/envoyproxy/go-control-plane/envoy/service/endpoint/v3"
	listenerservice "github.com/envoyproxy/go-control-plane/envoy/service/listener/v3"
	routeservice "github.com/envoyproxy/go-control-plane/envoy/service/route/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"

	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
	"github.com/patchbay-io/patchbay/internal/telemetry"
	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/translate"
	"github.com/patchbay-io/patchbay/xds/watch"
)

// Config configures the control plane. Flags map onto it 1:1 in cmd/patchbay.
type Config struct {
	// RolloutsDir is the directory of rollout files that is watched.
	RolloutsDir string
	// Translate holds the Envoy listener addresses and other emitted knobs.
	Translate translate.Options
	// AdminToken guards the rollback API; empty disables it.
	AdminToken string
	// Debounce is how long the directory must be quiet before a reload (default 10ms).
	Debounce time.Duration
	// Resync reloads the directory this often even without file events (default 30s).
	Resync time.Duration
	// DNSRefresh re-resolves endpoint host names this often (default 5s).
	DNSRefresh time.Duration
	// StateFile, when set, keeps each model's slot map across restarts (JSON, written
	// atomically after every change). Without it a restarted control plane lays splits out
	// afresh, which can move users between versions whose shares did not change.
	StateFile string
	// LookupHost resolves a host name (default net.DefaultResolver.LookupHost).
	LookupHost func(ctx context.Context, host string) ([]string, error)
	Logger     zerolog.Logger
	Metrics    *telemetry.Metrics
}

// Server is a running control plane.
type Server struct {
	cfg       Config
	log       zerolog.Logger
	snapshots cachev3.SnapshotCache
	policies  *cachev3.LinearCache
	cache     cachev3.Cache
	metrics   *metrics

	mu    sync.Mutex
	state state
}

// state is everything the server remembers between reloads; guarded by Server.mu.
type state struct {
	files     *rollout.Set // last good set read from the files
	slots     map[string]translate.SlotMap
	resolved  map[string][]string
	overrides map[string]*override
	history   map[string][]*rollout.Rollout // applied distinct states per model, oldest first
	built     *translate.Built
	applied   time.Time
	lastErr   *statusError
	rejected  int
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

const historyDepth = 10

// New builds a server. It does not read the rollout directory yet: Run does.
func New(cfg Config) (*Server, error) {
	if cfg.RolloutsDir == "" {
		return nil, errors.New("xds: no rollouts directory")
	}
	if cfg.Debounce <= 0 {
		cfg.Debounce = 10 * time.Millisecond
	}
	if cfg.Resync <= 0 {
		cfg.Resync = 30 * time.Second
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
		cfg:       cfg,
		log:       log,
		snapshots: cachev3.NewSnapshotCache(false, nodeHash{}, nil),
		policies:  cachev3.NewLinearCache(policyv1.TypeURL),
		state: state{
			slots:     map[string]translate.SlotMap{},
			resolved:  map[string][]string{},
			overrides: map[string]*override{},
			history:   map[string][]*rollout.Rollout{},
		},
	}
	classify := func(typeURL string) string {
		if typeURL == policyv1.TypeURL {
			return "policy"
		}
		return "snapshot"
	}
	s.cache = &nackGuard{
		Cache: &cachev3.MuxCache{
			Classify:      func(r *cachev3.Request) string { return classify(r.GetTypeUrl()) },
			ClassifyDelta: func(r *cachev3.DeltaRequest) string { return classify(r.GetTypeUrl()) },
			Caches:        map[string]cachev3.Cache{"snapshot": s.snapshots, "policy": s.policies},
		},
		snapshots: s.snapshots,
	}
	if cfg.StateFile != "" {
		slots, err := loadSlots(cfg.StateFile)
		if err != nil {
			return nil, err
		}
		s.state.slots = slots
	}
	m, err := newMetrics(cfg.Metrics.Meter("patchbay/xds"), s)
	if err != nil {
		return nil, err
	}
	s.metrics = m
	return s, nil
}

// Cache exposes the composed cache (for tests and embedding).
func (s *Server) Cache() cachev3.Cache { return s.cache }

// GRPCServer returns a gRPC server with ADS, the per-type discovery services and the
// health service registered.
func (s *Server) GRPCServer(ctx context.Context) *grpc.Server {
	gs := grpc.NewServer(
		grpc.MaxConcurrentStreams(1_000_000),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	)
	xs := serverv3.NewServer(ctx, s.cache, s.callbacks())
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(gs, xs)
	listenerservice.RegisterListenerDiscoveryServiceServer(gs, xs)
	routeservice.RegisterRouteDiscoveryServiceServer(gs, xs)
	clusterservice.RegisterClusterDiscoveryServiceServer(gs, xs)
	endpointservice.RegisterEndpointDiscoveryServiceServer(gs, xs)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	return gs
}

// Run loads the rollouts, then serves ADS on grpcLis and the admin API on adminLis until
// ctx is done, reloading on file changes and re-resolving DNS names.
func (s *Server) Run(ctx context.Context, grpcLis, adminLis net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 4)
	// The watch goes in place first, then the first load: an edit in between is seen.
	watching := make(chan struct{})
	go func() {
		errc <- watch.Run(ctx, watch.Config{Dir: s.cfg.RolloutsDir, Debounce: s.cfg.Debounce, Resync: s.cfg.Resync,
			Ready: func() { close(watching) }},
			func() { s.Reload(ctx, "files changed") })
	}()
	select {
	case <-watching:
	case err := <-errc:
		grpcLis.Close()
		adminLis.Close()
		return err
	}
	s.Reload(ctx, "start")
	gs := s.GRPCServer(ctx)
	admin := &http.Server{Handler: s.AdminHandler(), ReadHeaderTimeout: 5 * time.Second}
	go func() { errc <- serveGRPC(gs, grpcLis) }()
	go func() {
		if err := admin.Serve(adminLis); !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("admin: %w", err)
			return
		}
		errc <- nil
	}()
	go func() { s.refreshDNS(ctx); errc <- nil }()
	s.log.Info().Str("ads", grpcLis.Addr().String()).Str("admin", adminLis.Addr().String()).
		Str("rollouts", s.cfg.RolloutsDir).Msg("control plane serving")

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

func serveGRPC(gs *grpc.Server, lis net.Listener) error {
	if err := gs.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("ads: %w", err)
	}
	return nil
}

// Reload reads the rollout directory and applies it if it is valid. A bad directory
// changes nothing that is served: the error is logged, counted and shown on /status.
func (s *Server) Reload(ctx context.Context, why string) {
	set, err := rollout.LoadDir(s.cfg.RolloutsDir)
	if err == nil {
		// Resolve names never seen before outside the lock: a slow or failing DNS must
		// not stall /readyz, /status or the rollback API.
		s.resolveNew(ctx, set)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.rejectLocked(ctx, fmt.Errorf("rollouts rejected, still serving the last good config: %w", err))
		return
	}
	prevFiles, prevOverrides := s.state.files, s.state.overrides
	s.state.files = set
	// A rollback holds until that model's file content changes. Work on a copy: if the
	// new files fail to apply, the rollback in force stays recorded.
	overrides := make(map[string]*override, len(prevOverrides))
	var released []string
	for model, o := range prevOverrides {
		if r := set.Model(model); r == nil || fingerprint(r) != o.fileFP {
			released = append(released, model)
			continue
		}
		overrides[model] = o
	}
	s.state.overrides = overrides
	if err := s.applyLocked(ctx); err != nil {
		s.state.files, s.state.overrides = prevFiles, prevOverrides
		s.rejectLocked(ctx, err)
		return
	}
	for _, model := range released {
		s.log.Info().Str("model", model).Msg("rollback released: the model's rollout file changed")
	}
	s.log.Info().Str("version", s.state.built.Version).Str("reason", why).Int("models", len(set.Rollouts)).Msg("config applied")
}

func (s *Server) rejectLocked(ctx context.Context, err error) {
	s.state.lastErr = &statusError{At: time.Now().UTC(), Message: err.Error()}
	s.state.rejected++
	s.metrics.rejected.Add(ctx, 1)
	s.log.Error().Err(err).Msg("config rejected")
}

// effectiveLocked is the file set with rollbacks substituted.
func (s *Server) effectiveLocked() *rollout.Set {
	out := &rollout.Set{}
	for _, r := range s.state.files.Rollouts {
		if o := s.state.overrides[r.Model]; o != nil {
			out.Rollouts = append(out.Rollouts, o.rollout)
			continue
		}
		out.Rollouts = append(out.Rollouts, r)
	}
	return out
}

// applyLocked translates the effective set and, only if every check passes, swaps the
// snapshots and the policy. Slot maps advance only when a config is applied.
func (s *Server) applyLocked(ctx context.Context) error {
	start := time.Now()
	set := s.effectiveLocked()
	slots := translate.SlotMaps(set, s.state.slots)
	in := &translate.Input{Set: set, Slots: slots, Resolved: s.state.resolved}
	built, err := translate.Build(in, s.cfg.Translate)
	if err != nil {
		return fmt.Errorf("translation rejected, still serving the last good config: %w", err)
	}
	if s.state.built != nil && built.Version == s.state.built.Version {
		return nil // nothing changed
	}
	for f, snap := range map[Flavour]*cachev3.Snapshot{FlavourEdge: built.Edge, FlavourSidecar: built.Sidecar, FlavourGRPC: built.GRPC} {
		if err := s.snapshots.SetSnapshot(ctx, string(f), snap); err != nil {
			return fmt.Errorf("set %s snapshot: %w", f, err)
		}
	}
	if err := s.policies.UpdateResource(policyv1.ResourceName, built.Policy); err != nil {
		return fmt.Errorf("set policy: %w", err)
	}
	if s.cfg.StateFile != "" && !sameSlots(s.state.slots, slots) {
		if err := saveSlots(s.cfg.StateFile, slots); err != nil {
			s.log.Error().Err(err).Str("file", s.cfg.StateFile).Msg("cannot save slot maps; a restart may reshuffle users")
		}
	}
	s.state.slots = slots
	s.state.built = built
	s.state.applied = time.Now().UTC()
	// History holds the file states that were served (not rollbacks), so a rollback
	// goes back through what the files said.
	for _, r := range s.state.files.Rollouts {
		if s.state.overrides[r.Model] != nil {
			continue
		}
		h := s.state.history[r.Model]
		if n := len(h); n == 0 || fingerprint(h[n-1]) != fingerprint(r) {
			h = append(h, r)
			if len(h) > historyDepth {
				h = h[len(h)-historyDepth:]
			}
			s.state.history[r.Model] = h
		}
	}
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

// resolveNew resolves, in parallel and without the lock, the host names of set that were
// never looked up, so a new endpoint name is served with addresses in the same reload.
// A failure is remembered as an empty answer: refreshDNS retries it every DNSRefresh.
func (s *Server) resolveNew(ctx context.Context, set *rollout.Set) {
	s.mu.Lock()
	var hosts []string
	for _, h := range translate.Hostnames(set) {
		if _, ok := s.state.resolved[h]; !ok {
			hosts = append(hosts, h)
		}
	}
	s.mu.Unlock()
	if len(hosts) == 0 {
		return
	}
	answers := make([][]string, len(hosts))
	var wg sync.WaitGroup
	for i, h := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ips, err := s.lookup(ctx, h)
			if err != nil {
				s.log.Warn().Err(err).Str("host", h).Msg("endpoint name does not resolve yet; its version has no endpoints until it does")
				ips = []string{}
			}
			answers[i] = ips
		}()
	}
	wg.Wait()
	s.mu.Lock()
	for i, h := range hosts {
		if _, ok := s.state.resolved[h]; !ok {
			s.state.resolved[h] = answers[i]
		}
	}
	s.mu.Unlock()
}

func (s *Server) lookup(ctx context.Context, host string) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	ips, err := s.cfg.LookupHost(ctx, host)
	if err != nil {
		return nil, err
	}
	sort.Strings(ips)
	return ips, nil
}

// refreshDNS re-resolves every endpoint name periodically and re-applies when any
// name's addresses changed. A failed lookup keeps the last known addresses.
func (s *Server) refreshDNS(ctx context.Context) {
	t := time.NewTicker(s.cfg.DNSRefresh)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		s.mu.Lock()
		var hosts []string
		if s.state.files != nil {
			hosts = translate.Hostnames(s.state.files)
		}
		s.mu.Unlock()
		changed := map[string][]string{}
		for _, h := range hosts {
			ips, err := s.lookup(ctx, h)
			if err != nil {
				s.log.Warn().Err(err).Str("host", h).Msg("re-resolve failed; keeping the last addresses")
				continue
			}
			changed[h] = ips
		}
		s.mu.Lock()
		diff := false
		for h, ips := range changed {
			if !slices.Equal(s.state.resolved[h], ips) {
				s.state.resolved[h] = ips
				diff = true
			}
		}
		if diff {
			if err := s.applyLocked(ctx); err != nil {
				s.rejectLocked(ctx, err)
			} else {
				s.log.Info().Str("version", s.state.built.Version).Msg("endpoint addresses changed")
			}
		}
		s.mu.Unlock()
	}
}
