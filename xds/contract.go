package xds

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"golang.org/x/sync/errgroup"

	"github.com/patchbay-io/patchbay/internal/tlsfiles"
	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// Service contracts. A rollout with a contract (rollout.Contract) has the control plane read
// each version's OIP model metadata (GET /v2/models/<m>/versions/<v> on every REST endpoint,
// or gRPC ModelMetadata on every gRPC endpoint of a version without REST; contract_read.go)
// when the version appears, when its endpoints or the contract change, and every
// ContractRetry while it fails. A version that breaks the contract (rollout.CheckContract),
// whose metadata cannot be read, or that has not been read yet is held at zero for every
// kind of traffic: its share of the split goes to the model's other versions, it leaves
// experiments and shadows, and it is Closed (no pinned path, x-patchbay-version route or
// ext_proc pin reaches it; its cluster stays, as for a rollback, see closeDoors). When every
// version with a share is held, the model keeps the last state it served with one that kept
// the contract (or, with none yet, the rollout as written).

// DefaultContractRetry is how often a version whose metadata breaks the contract or cannot
// be read is read again.
const DefaultContractRetry = 3 * time.Second

// DefaultContractWait is how long, at start, the control plane waits for the first check of
// the contracted versions before it serves ADS (Config.ContractWait).
const DefaultContractWait = 5 * time.Second

const (
	contractOK      = "ok"
	contractHeld    = "held"
	contractPending = "pending"
	// maxMetadataBytes bounds a metadata answer.
	maxMetadataBytes = 1 << 20
)

// ContractStatus is one version's standing against its model's contract, as /status shows it.
type ContractStatus struct {
	State  string    `json:"state"` // ok, held (breaks it or metadata unreadable), pending (not read yet)
	Reason string    `json:"reason,omitempty"`
	Since  time.Time `json:"since,omitempty"`
}

// contractVerdict is the outcome of one version's last check: reason "" keeps the contract.
type contractVerdict struct {
	addrs  []string // the endpoints read
	tls    bool
	cfp    string // the contract checked against
	reason string
	since  time.Time
}

// covers reports whether a verdict that kept the contract still stands for t: same contract
// and TLS, and no endpoint it did not read (endpoints gone are fine).
func (v contractVerdict) covers(t contractTarget) bool {
	if v.reason != "" || v.cfp != t.cfp || v.tls != t.tls {
		return false
	}
	for _, a := range t.addrs {
		if !slices.Contains(v.addrs, a) {
			return false
		}
	}
	return true
}

// contractState is what the served config knows of contracts; guarded by Server.mu.
type contractState struct {
	// verdict is each checked version's standing (model -> version); a version of a
	// contracted model absent from it has not been read yet (pending: held).
	verdict map[string]map[string]contractVerdict
	// good is the last rollout served for the model with a version that keeps its contract.
	good map[string]*rollout.Rollout
	// fallback names the models whose every version with a share is held: "last good" or
	// "as written" (no good state yet).
	fallback map[string]string
	memo     map[string]holdMemo
	// open are the versions still not read when the startup window (Config.ContractWait)
	// ended: served as written (not held) until their first check ends.
	open map[mv]bool
}

type holdMemo struct {
	in, out *rollout.Rollout
	key     string
}

// contractChecker reads versions' metadata; its mutex is never held while taking Server.mu.
type contractChecker struct {
	kick chan struct{}
	// rounds is signalled after each check round (awaitFirstContracts).
	rounds chan struct{}
	retry  time.Duration
	mu     sync.Mutex
	last   map[mv]contractVerdict
	tls    *tlsfiles.Source // nil: versions over TLS cannot be read
}

func (s *Server) newContractChecker() *contractChecker {
	retry := s.cfg.ContractRetry
	if retry <= 0 {
		retry = DefaultContractRetry
	}
	// The same client certificate and model hosts' CA as the version prober (loadUpstreamTLS).
	return &contractChecker{kick: make(chan struct{}, 1), rounds: make(chan struct{}, 1), retry: retry,
		last: map[mv]contractVerdict{}, tls: s.upstream}
}

// kickContracts asks for a check round now (a new config was served: a version may have
// appeared or moved).
func (s *Server) kickContracts() {
	if s.contracts == nil {
		return
	}
	select {
	case s.contracts.kick <- struct{}{}:
	default:
	}
}

// checkContracts runs check rounds until ctx ends: on a kick, and every retry interval.
func (s *Server) checkContracts(ctx context.Context) {
	t := time.NewTicker(s.contracts.retry)
	defer t.Stop()
	for {
		s.contractRound(ctx)
		select {
		case s.contracts.rounds <- struct{}{}:
		default:
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.contracts.kick:
		}
	}
}

type contractTarget struct {
	mv
	cfp      string
	contract *rollout.Contract
	eps      []MetadataEndpoint
	addrs    []string // eps as strings (grpc:// for gRPC), what a verdict covers
	tls      bool
}

// contractRound reads the metadata of every version not known to keep its contract, then,
// when a version's standing changed, serves a new config.
func (s *Server) contractRound(ctx context.Context) {
	c := s.contracts
	s.mu.Lock()
	var targets []contractTarget
	current := map[mv]bool{}
	if s.state.files != nil {
		for _, r := range s.state.files.Rollouts {
			if r.Contract == nil {
				continue
			}
			for _, v := range r.Versions {
				t := s.contractTargetLocked(r, v)
				current[t.mv] = true
				c.mu.Lock()
				prev, ok := c.last[t.mv]
				c.mu.Unlock()
				if ok && prev.covers(t) {
					continue // keeps the contract, no new endpoint
				}
				targets = append(targets, t)
			}
		}
	}
	s.mu.Unlock()

	reasons := make([]string, len(targets))
	var g errgroup.Group
	g.SetLimit(probeConcurrency)
	for i, t := range targets {
		g.Go(func() error {
			reasons[i] = s.checkVersionContract(ctx, t)
			return nil
		})
	}
	_ = g.Wait() // the functions report through reasons, not errors
	if ctx.Err() != nil {
		return
	}

	now := time.Now().UTC()
	c.mu.Lock()
	for i, t := range targets {
		prev, ok := c.last[t.mv]
		v := contractVerdict{addrs: t.addrs, tls: t.tls, cfp: t.cfp, reason: reasons[i], since: now}
		if ok && (prev.reason == "") == (v.reason == "") {
			v.since = prev.since
		}
		if !ok || prev.reason != v.reason {
			ev := s.log.Info()
			if v.reason != "" {
				ev = s.log.Warn()
			}
			ev.Str("model", t.model).Str("version", t.version).Str("reason", v.reason).
				Msg(map[bool]string{true: "version keeps its model's contract", false: "version held at zero: it breaks its model's contract or its metadata cannot be read"}[v.reason == ""])
		}
		c.last[t.mv] = v
	}
	for k := range c.last {
		if !current[k] {
			delete(c.last, k)
		}
	}
	next := map[string]map[string]contractVerdict{}
	for k, v := range c.last {
		if next[k.model] == nil {
			next[k.model] = map[string]contractVerdict{}
		}
		next[k.model][k.version] = v
	}
	c.mu.Unlock()

	s.mu.Lock()
	defer s.mu.Unlock()
	if sameVerdicts(s.state.contract.verdict, next) {
		return
	}
	prev := s.state.contract.verdict
	s.state.contract.verdict = next
	for k := range s.state.contract.open {
		if _, read := next[k.model][k.version]; read || !current[k] {
			delete(s.state.contract.open, k) // read at last: its verdict decides now
		}
	}
	if s.state.files == nil {
		return
	}
	if err := s.applyLocked(ctx); err != nil {
		s.state.contract.verdict = prev // seen as a change again next round
		s.log.Error().Err(err).Msg("a version's standing against its contract changed but the config could not be applied; retried next round")
		return
	}
	for m, how := range s.state.contract.fallback {
		s.log.Warn().Str("model", m).Str("serving", how).Msg("every version with a share of the model is held by its contract: serving its " + how + " state")
	}
	s.log.Info().Str("config_version", s.state.built.Version).Msg("split follows the contract checks: held versions get no traffic")
}

// contractTargetLocked is what checking version v of r reads: its resolved REST endpoints,
// or its gRPC ones for a version without REST (MetadataEndpoints).
func (s *Server) contractTargetLocked(r *rollout.Rollout, v rollout.Version) contractTarget {
	cfp, _ := json.Marshal(r.Contract) // plain structs: cannot fail
	t := contractTarget{mv: mv{r.Model, v.Name}, cfp: string(cfp), contract: r.Contract, tls: translate.UpstreamTLS(v, s.cfg.Translate)}
	t.eps = MetadataEndpoints(v, func(a string) []string { return translate.ResolvedEndpoints(s.state.resolved, []string{a}) })
	for _, ep := range t.eps {
		t.addrs = append(t.addrs, ep.String())
	}
	return t
}

func sameVerdicts(a, b map[string]map[string]contractVerdict) bool {
	return maps.EqualFunc(a, b, func(x, y map[string]contractVerdict) bool {
		return maps.EqualFunc(x, y, func(p, q contractVerdict) bool {
			return p.reason == q.reason && p.tls == q.tls && p.cfp == q.cfp && slices.Equal(p.addrs, q.addrs)
		})
	})
}

// checkVersionContract reads the version's metadata on each of its endpoints (REST, or
// gRPC ModelMetadata for a gRPC-only version) and returns why it is held, or "" when every
// endpoint's metadata keeps the contract.
func (s *Server) checkVersionContract(ctx context.Context, t contractTarget) string {
	var tlsCfg func(string) (*tls.Config, error)
	if t.tls {
		tlsCfg = func(host string) (*tls.Config, error) {
			if s.contracts.tls == nil {
				return nil, errors.New("served over TLS and the control plane has no readable --tls-cert/--tls-key/--upstream-tls-ca to read it")
			}
			return s.contracts.tls.ClientConfig(host), nil
		}
	}
	return CheckVersionContract(ctx, t.contract, t.model, t.version, t.eps, tlsCfg, translate.HealthCheckTimeout)
}

// holdLocked is r with the versions its contract holds at zero taken out of every kind of
// traffic (holdVersions); r itself when it has no contract or holds none. When every
// version with a share is held, the last rollout served with one that kept the contract,
// or, with none, r as written.
func (s *Server) holdLocked(r *rollout.Rollout) *rollout.Rollout {
	cs := &s.state.contract
	if cs.good == nil {
		cs.good, cs.fallback, cs.memo = map[string]*rollout.Rollout{}, map[string]string{}, map[string]holdMemo{}
	}
	delete(cs.fallback, r.Model)
	if r.Contract == nil {
		delete(cs.good, r.Model)
		return r
	}
	held := s.heldVersionsLocked(r)
	if len(held) == 0 {
		cs.good[r.Model] = r
		return r
	}
	key := fmt.Sprint(held)
	if m, ok := cs.memo[r.Model]; ok && m.in == r && m.key == key && m.out != nil {
		cs.good[r.Model] = m.out
		return m.out
	}
	out := holdVersions(r, held)
	if out == nil {
		if g := cs.good[r.Model]; g != nil {
			cs.fallback[r.Model] = "last good"
			return g
		}
		cs.fallback[r.Model] = "as written"
		return r
	}
	cs.memo[r.Model] = holdMemo{in: r, out: out, key: key}
	cs.good[r.Model] = out
	return out
}

// heldVersionsLocked are r's versions the contract holds, with why: those that break it or
// whose metadata cannot be read, and those not read yet (new, or with endpoints not read).
func (s *Server) heldVersionsLocked(r *rollout.Rollout) map[string]string {
	held := map[string]string{}
	verdict := s.state.contract.verdict[r.Model]
	for _, v := range r.Versions {
		vd, ok := verdict[v.Name]
		switch {
		case !ok && s.state.contract.open[mv{r.Model, v.Name}]:
			// not read within the startup window: served as written until read
		case !ok:
			held[v.Name] = "pending: OIP model metadata not read yet"
		case vd.reason != "":
			held[v.Name] = vd.reason
		case !vd.covers(s.contractTargetLocked(r, v)):
			held[v.Name] = "pending: new endpoints or contract, OIP model metadata not read yet"
		}
	}
	return held
}

// holdVersions is r with the held versions at zero: their share of the split given to
// the other versions with a share in proportion (largest remainder, in version order),
// their experiment arms removed (an experiment left without arms is dropped), their shadows
// removed, and the versions Closed. nil when no version with a share is left.
func holdVersions(r *rollout.Rollout, held map[string]string) *rollout.Rollout {
	kept, sum := 0, 0
	for _, v := range r.Versions {
		if w := r.Traffic[v.Name]; w > 0 && held[v.Name] == "" {
			kept += w
		}
		sum += r.Traffic[v.Name]
	}
	if kept == 0 {
		return nil
	}
	out := *r
	out.Traffic = map[string]int{}
	type rem struct {
		v string
		r int
	}
	var rems []rem
	given := 0
	for _, v := range r.Versions {
		w := r.Traffic[v.Name]
		if w <= 0 || held[v.Name] != "" {
			continue
		}
		n := w * sum / kept
		out.Traffic[v.Name] = n
		given += n
		rems = append(rems, rem{v.Name, w * sum % kept})
	}
	sort.SliceStable(rems, func(i, j int) bool { return rems[i].r > rems[j].r })
	for i := 0; given < sum; i++ {
		out.Traffic[rems[i%len(rems)].v]++
		given++
	}
	out.Shadow = slices.DeleteFunc(slices.Clone(r.Shadow), func(sh rollout.Shadow) bool { return held[sh.Version] != "" })
	out.Experiments = nil
	for _, e := range r.Experiments {
		e.Arms = slices.DeleteFunc(slices.Clone(e.Arms), func(a rollout.Arm) bool { return held[a.Version] != "" })
		if len(e.Arms) > 0 {
			out.Experiments = append(out.Experiments, e)
		}
	}
	out.Closed = maps.Clone(r.Closed)
	if out.Closed == nil {
		out.Closed = map[string]bool{}
	}
	for v := range held {
		out.Closed[v] = true
	}
	return &out
}

// contractStatusLocked is each version's standing against the model's contract (nil
// without one) and, when every version with a share is held, what is served instead.
func (s *Server) contractStatusLocked(model string) (map[string]ContractStatus, string) {
	r := s.state.files.Model(model)
	if r == nil || r.Contract == nil {
		return nil, ""
	}
	out := map[string]ContractStatus{}
	verdict := s.state.contract.verdict[model]
	held := s.heldVersionsLocked(r)
	for _, v := range r.Versions {
		vd, read := verdict[v.Name]
		switch why := held[v.Name]; {
		case !read && s.state.contract.open[mv{model, v.Name}]:
			out[v.Name] = ContractStatus{State: contractPending, Reason: "not read within the startup window (--contract-wait): served as written until its OIP model metadata is read"}
		case why == "":
			out[v.Name] = ContractStatus{State: contractOK, Since: vd.since}
		case vd.reason == "":
			out[v.Name] = ContractStatus{State: contractPending, Reason: why + ": held at zero"}
		default:
			out[v.Name] = ContractStatus{State: contractHeld, Reason: why, Since: vd.since}
		}
	}
	note := ""
	switch s.state.contract.fallback[model] {
	case "last good":
		note = "every version with a share is held by the contract: serving the last state that had a version keeping it"
	case "as written":
		note = "every version with a share is held by the contract and none kept it before: serving the rollout as written"
	}
	return out, note
}

// contractViolations are the held versions whose metadata was read or tried (model, version).
func (s *Server) contractViolations() []mv {
	if s.contracts == nil {
		return nil
	}
	s.contracts.mu.Lock()
	defer s.contracts.mu.Unlock()
	var out []mv
	for k, v := range s.contracts.last {
		if v.reason != "" {
			out = append(out, k)
		}
	}
	return out
}

// registerContractMetrics adds patchbay_xds_contract_violations.
func (s *Server) registerContractMetrics(m metric.Meter) error {
	_, err := m.Int64ObservableGauge("patchbay_xds_contract_violations", metric.WithDescription("1 while a version is held at zero because its OIP metadata breaks its model's contract or cannot be read, by model and version"),
		metric.WithInt64Callback(func(_ context.Context, o metric.Int64Observer) error {
			for _, k := range s.contractViolations() {
				o.Observe(1, metric.WithAttributes(attribute.String("model", k.model), attribute.String("version", k.version)))
			}
			return nil
		}))
	return err
}

// awaitFirstContracts waits, at start and before ADS is served, until every version of a
// model with a contract has had its first check, at most Config.ContractWait: the first
// config a client gets then already holds the versions that break their contract. After
// the window, the versions still not read are served as written (fail open, logged and on
// /status) until their check ends. Versions that appear later are held until read.
func (s *Server) awaitFirstContracts(ctx context.Context) {
	wait := s.cfg.ContractWait
	if wait == 0 {
		wait = DefaultContractWait
	}
	if wait < 0 || s.contracts == nil {
		return
	}
	s.contractWaiting.Store(true)
	defer s.contractWaiting.Store(false)
	start := time.Now()
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		s.mu.Lock()
		pending := s.unreadContractsLocked()
		s.mu.Unlock()
		if len(pending) == 0 {
			s.log.Debug().Dur("waited", time.Since(start)).Msg("first contract check done: serving ADS")
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-s.contracts.rounds:
		case <-timer.C:
			s.mu.Lock()
			defer s.mu.Unlock()
			pending = s.unreadContractsLocked()
			if s.state.contract.open == nil {
				s.state.contract.open = map[mv]bool{}
			}
			for _, k := range pending {
				s.state.contract.open[k] = true
				s.log.Warn().Str("model", k.model).Str("version", k.version).Dur("contract_wait", wait).
					Msg("version's OIP model metadata not read within the startup window: served as written until it is read (fail open)")
			}
			if len(pending) > 0 {
				if err := s.applyLocked(ctx); err != nil {
					s.log.Error().Err(err).Msg("serving the versions not read within the startup window as written failed")
				}
			}
			return
		}
	}
}

// unreadContractsLocked are the versions of models with a contract that have no verdict yet.
func (s *Server) unreadContractsLocked() []mv {
	if s.state.files == nil {
		return nil
	}
	var out []mv
	for _, r := range s.state.files.Rollouts {
		if r.Contract == nil {
			continue
		}
		for _, v := range r.Versions {
			if _, ok := s.state.contract.verdict[r.Model][v.Name]; !ok {
				out = append(out, mv{r.Model, v.Name})
			}
		}
	}
	return out
}
