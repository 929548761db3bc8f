package xds

import (
	"context"
	"crypto/tls"
	"fmt"
	"golang.org/x/sync/errgroup"
	"net"
	"net/http"
	"sort"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/patchbay-io/patchbay/internal/tlsfiles"
	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// The version prober. Envoy picks a weighted cluster by weight alone, so a version whose
// every host fails its health checks keeps its share of the split (in panic). The control
// plane therefore probes each version with a share itself, the way Envoy's health checks do
// (REST GET /v2/models/<m>/versions/<v>/ready answering 200; gRPC grpc.health.v1 Check of
// oip.HealthService(m, v) answering SERVING), and lends an unhealthy version's slots to the
// model's healthy versions in the next snapshot (translate.Input.Unhealthy).

// Version health states, as /status shows them.
const (
	healthHealthy   = "healthy"
	healthUnhealthy = "unhealthy"
	healthUnprobed  = "unprobed" // TLS version without readable client files: counted healthy
)

const (
	// probeUnhealthyAfter consecutive failures mark an endpoint unhealthy; one success
	// marks it healthy again (as the health checks emitted to Envoy).
	probeUnhealthyAfter = 2
	probeHealthyAfter   = 2
	// probeConcurrency bounds the probes in flight.
	probeConcurrency = 8
)

// VersionHealth is one version's probed health, as /status shows it.
type VersionHealth struct {
	State string    `json:"state"`
	Error string    `json:"error,omitempty"`
	Since time.Time `json:"since"`
}

type probeKey struct{ model, version, protocol, addr string }

type probeTarget struct {
	probeKey
	serverName string // the endpoint's host as the rollout names it (TLS server name)
	tls        bool
	service    string // gRPC: the grpc.health.v1 service (translate.GRPCHealthService)
}

type endpointHealth struct {
	healthy bool
	fails   int // consecutive failed probes
	oks     int // consecutive good probes
	lastErr string
}

type mv struct{ model, version string }

// prober holds the probe state; its mutex is never held while taking Server.mu.
type prober struct {
	mu        sync.Mutex
	endpoints map[probeKey]*endpointHealth
	versions  map[mv]VersionHealth

	timeout time.Duration
	tls     *tlsfiles.Source // nil: TLS versions are not probed
	plain   *http.Client
}

func (s *Server) newProber() *prober {
	p := &prober{endpoints: map[probeKey]*endpointHealth{}, versions: map[mv]VersionHealth{},
		timeout: min(s.cfg.VersionHealth, translate.HealthCheckTimeout)}
	p.plain = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	p.tls = s.upstream
	return p
}

// loadUpstreamTLS loads the client files versions served over TLS are reached with
// (--tls-cert/--tls-key, --upstream-tls-ca) for the prober, the contract check and the
// analysis scraper; nil without --upstream-tls-ca or when they cannot be read.
func (s *Server) loadUpstreamTLS() *tlsfiles.Source {
	up := s.cfg.Translate.UpstreamTLS
	if up.CA == "" {
		return nil
	}
	src, err := tlsfiles.Load(tlsfiles.Files{Cert: s.cfg.TLS.Cert, Key: s.cfg.TLS.Key, CA: up.CA}, tlsfiles.Options{})
	if err != nil {
		s.log.Warn().Err(err).Msg("cannot read the TLS files (--tls-cert, --tls-key, --upstream-tls-ca): versions over TLS are not probed, their metrics not scraped, and their contract checks held as unreadable")
		return nil
	}
	return src
}

// probeVersions probes every VersionHealth interval until ctx ends.
func (s *Server) probeVersions(ctx context.Context) {
	t := time.NewTicker(s.cfg.VersionHealth)
	defer t.Stop()
	for {
		s.probeOnce(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// probeOnce runs one round: targets under the state lock, probes outside it, then, when
// the set of unhealthy versions changed, a new snapshot.
func (s *Server) probeOnce(ctx context.Context) {
	p := s.prober
	s.mu.Lock()
	var targets []probeTarget
	var tlsVersions []mv
	if s.state.files != nil {
		for _, r := range s.effectiveLocked().Rollouts {
			for _, v := range r.Versions {
				if !r.HasShare(v.Name) {
					continue
				}
				useTLS := translate.UpstreamTLS(v, s.cfg.Translate)
				if useTLS && p.tls == nil {
					tlsVersions = append(tlsVersions, mv{r.Model, v.Name})
					continue
				}
				for _, proto := range []string{rollout.REST, rollout.GRPC} {
					if !r.Serves(proto) {
						continue // a protocol the model does not route says nothing of its users
					}
					for _, a := range v.Addrs(proto) {
						host, _, _ := net.SplitHostPort(a)
						for _, ep := range translate.ResolvedEndpoints(s.state.resolved, []string{a}) {
							targets = append(targets, probeTarget{probeKey: probeKey{r.Model, v.Name, proto, ep}, serverName: host, tls: useTLS,
								service: translate.GRPCHealthService(r.Model, v)})
						}
					}
				}
			}
		}
	}
	s.mu.Unlock()

	errs := make([]error, len(targets))
	var g errgroup.Group
	g.SetLimit(probeConcurrency)
	for i, t := range targets {
		g.Go(func() error {
			errs[i] = p.probe(ctx, t)
			return nil
		})
	}
	_ = g.Wait() // the functions report through errs, not errors
	if ctx.Err() != nil {
		return
	}

	// Endpoint states, then each version's: unhealthy when some protocol it serves has no
	// healthy endpoint.
	now := time.Now().UTC()
	p.mu.Lock()
	seen := map[probeKey]bool{}
	protos := map[mv]map[string]bool{} // protocol -> some endpoint healthy
	lastErr := map[mv]string{}
	for i, t := range targets {
		seen[t.probeKey] = true
		e := p.endpoints[t.probeKey]
		if e == nil {
			e = &endpointHealth{healthy: true}
			p.endpoints[t.probeKey] = e
		}
		if errs[i] == nil {
			// Back in after probeHealthyAfter good probes in a row, so a version that fails
			// every other probe does not move its users back and forth each round.
			e.fails, e.lastErr = 0, ""
			if e.oks++; e.oks >= probeHealthyAfter {
				e.healthy = true
			}
		} else {
			e.oks = 0
			e.fails++
			e.lastErr = fmt.Sprintf("%s %s: %v", t.protocol, t.addr, errs[i])
			if e.fails >= probeUnhealthyAfter {
				e.healthy = false
			}
		}
		k := mv{t.model, t.version}
		if protos[k] == nil {
			protos[k] = map[string]bool{}
		}
		protos[k][t.protocol] = protos[k][t.protocol] || e.healthy
		if !e.healthy {
			lastErr[k] = e.lastErr
		}
	}
	for k := range p.endpoints {
		if !seen[k] {
			delete(p.endpoints, k)
		}
	}
	next := map[mv]VersionHealth{}
	for k, ps := range protos {
		state := healthHealthy
		for _, ok := range ps {
			if !ok {
				state = healthUnhealthy
			}
		}
		vh := VersionHealth{State: state, Since: now}
		if state == healthUnhealthy {
			vh.Error = lastErr[k]
		}
		next[k] = vh
	}
	for _, k := range tlsVersions {
		next[k] = VersionHealth{State: healthUnprobed, Since: now,
			Error: "served over TLS and the control plane has no readable --tls-cert/--tls-key/--upstream-tls-ca to probe it"}
	}
	var changed []string
	for k, vh := range next {
		prev, ok := p.versions[k]
		if ok && prev.State == vh.State {
			vh.Since = prev.Since
			next[k] = vh
			continue
		}
		if ok || vh.State != healthHealthy {
			changed = append(changed, k.model+"/"+k.version+" "+vh.State)
			s.log.Info().Str("model", k.model).Str("version", k.version).Str("health", vh.State).Str("error", vh.Error).
				Msg("version health changed")
		}
	}
	p.versions = next
	unhealthy := map[string]map[string]bool{}
	for k, vh := range next {
		if vh.State == healthUnhealthy {
			if unhealthy[k.model] == nil {
				unhealthy[k.model] = map[string]bool{}
			}
			unhealthy[k.model][k.version] = true
		}
	}
	p.mu.Unlock()

	s.mu.Lock()
	defer s.mu.Unlock()
	if sameUnhealthy(s.state.unhealthy, unhealthy) {
		return
	}
	prevUnhealthy := s.state.unhealthy
	s.state.unhealthy = unhealthy
	if s.state.files == nil {
		return
	}
	sort.Strings(changed)
	if err := s.applyLocked(ctx); err != nil {
		// Put the old view back so the next round sees the change again and retries.
		s.state.unhealthy = prevUnhealthy
		s.log.Error().Err(err).Strs("changed", changed).Msg("version health changed but the config could not be applied; retried next round")
		return
	}
	s.log.Info().Strs("changed", changed).Str("config_version", s.state.built.Version).
		Msg("split follows version health: unhealthy versions' slots lent to healthy ones")
}

func sameUnhealthy(a, b map[string]map[string]bool) bool {
	if len(a) != len(b) {
		return false
	}
	for m, vs := range a {
		if len(vs) != len(b[m]) {
			return false
		}
		for v := range vs {
			if !b[m][v] {
				return false
			}
		}
	}
	return true
}

// probe checks one endpoint of one version and protocol.
func (p *prober) probe(ctx context.Context, t probeTarget) error {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	var tcfg *tls.Config
	if t.tls {
		tcfg = p.tls.ClientConfig(t.serverName)
	}
	if t.protocol == rollout.GRPC {
		conn, err := dialVersion(t.addr, tcfg)
		if err != nil {
			return err
		}
		defer conn.Close()
		resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: t.service})
		if err != nil {
			return err
		}
		if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			return fmt.Errorf("health service %q: %s", t.service, resp.GetStatus())
		}
		return nil
	}
	client, scheme := p.plain, "http"
	if tcfg != nil {
		client = &http.Client{Transport: &http.Transport{DisableKeepAlives: true, TLSClientConfig: tcfg}}
		scheme = "https"
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, scheme+"://"+t.addr+"/v2/models/"+t.model+"/versions/"+t.version+"/ready", nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: HTTP %d", req.URL.Path, resp.StatusCode)
	}
	return nil
}

// dialVersion is a gRPC client of one version endpoint (the prober's health checks, the
// contract check's ModelMetadata): plaintext, or TLS with a copy of tlsCfg speaking h2.
func dialVersion(addr string, tlsCfg *tls.Config, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	creds := insecure.NewCredentials()
	if tlsCfg != nil {
		tlsCfg = tlsCfg.Clone()
		tlsCfg.NextProtos = []string{"h2"}
		creds = credentials.NewTLS(tlsCfg)
	}
	return grpc.NewClient("passthrough:///"+addr, append([]grpc.DialOption{grpc.WithTransportCredentials(creds)}, opts...)...)
}

// versionHealth returns the probed health of each version (model -> version).
func (s *Server) versionHealth() map[string]map[string]VersionHealth {
	out := map[string]map[string]VersionHealth{}
	if s.prober == nil {
		return out
	}
	s.prober.mu.Lock()
	defer s.prober.mu.Unlock()
	for k, vh := range s.prober.versions {
		if out[k.model] == nil {
			out[k.model] = map[string]VersionHealth{}
		}
		out[k.model][k.version] = vh
	}
	return out
}

// servingRunsLocked is the model's split as served, when it differs from its slot map.
func (s *Server) servingRunsLocked(r *rollout.Rollout) []translate.Run {
	if len(s.state.unhealthy[r.Model]) == 0 {
		return nil
	}
	in := &translate.Input{Slots: s.state.slots, Unhealthy: s.state.unhealthy}
	return in.ServingSlots(r).Runs()
}
