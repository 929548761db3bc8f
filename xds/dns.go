package xds

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// Endpoint host names. The control plane resolves them itself (every flavour gets EDS with
// IP addresses) and re-resolves them every DNSRefresh. The rules:
//   - a name that has never resolved is "unresolved": it gives its version no endpoint;
//   - a config in which a version with a share (baseline traffic > 0, or an arm of an
//     experiment with allocation > 0) has no resolved endpoint at all is refused like any
//     bad config: the last good config keeps serving, the error is on /status, and the
//     config is tried again whenever a name's addresses change;
//   - a name that resolved before and fails now is "stale": its last known addresses are
//     kept and served;
//   - /status shows each name's state per model and version, and the gauge
//     patchbay_xds_unresolved_endpoint_names counts the names not "ok".

// errUnresolved marks a config refused only because names do not resolve (yet).
var errUnresolved = errors.New("endpoint names do not resolve")

const (
	dnsOK         = "ok"
	dnsUnresolved = "unresolved"
	dnsStale      = "stale"
)

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
	errs := make([]error, len(hosts))
	var wg sync.WaitGroup
	for i, h := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			answers[i], errs[i] = s.lookup(ctx, h)
			if errs[i] != nil {
				s.log.Warn().Err(errs[i]).Str("host", h).Msg("endpoint name does not resolve; a version with a share and no other endpoint is refused until it does")
			}
		}()
	}
	wg.Wait()
	s.mu.Lock()
	for i, h := range hosts {
		if _, ok := s.state.resolved[h]; !ok {
			s.noteLookupLocked(h, answers[i], errs[i])
		}
	}
	s.mu.Unlock()
}

// noteLookupLocked records one lookup's answer and reports whether the addresses served
// for the name changed. A failure keeps the last known addresses (stale) if there are any.
func (s *Server) noteLookupLocked(host string, ips []string, err error) bool {
	st := s.state.dns[host]
	if st == nil {
		st = &NameStatus{Addresses: []string{}, State: dnsUnresolved, Since: time.Now().UTC()}
		s.state.dns[host] = st
	}
	if _, ok := s.state.resolved[host]; !ok {
		s.state.resolved[host] = []string{}
	}
	if err != nil {
		next := dnsUnresolved
		if len(st.Addresses) > 0 {
			next = dnsStale
		}
		if st.State != next {
			st.State, st.Since = next, time.Now().UTC()
		}
		st.Error = err.Error()
		return false
	}
	if st.State != dnsOK {
		st.State, st.Since = dnsOK, time.Now().UTC()
	}
	st.Error = ""
	if slices.Equal(s.state.resolved[host], ips) {
		return false
	}
	st.Addresses = ips
	s.state.resolved[host] = ips
	return true
}

func (s *Server) lookup(ctx context.Context, host string) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	ips, err := s.cfg.LookupHost(ctx, host)
	if err != nil {
		return nil, err
	}
	if len(ips) == 0 {
		return nil, fmt.Errorf("lookup %s: no addresses", host)
	}
	sort.Strings(ips)
	return ips, nil
}

// ResolveNow makes the control plane re-resolve every endpoint name at once rather than
// at the next DNSRefresh, and apply what changed: an EndpointSlice was added, changed or
// deleted (wire it to xds/endpointslice's Options.OnChange), so a pod that stops being
// ready leaves EDS within a round trip to the resolver instead of a refresh period. It
// does not wait: the lookups run in the refresh loop, outside the state lock, and calls
// made while a round is pending coalesce into it. Calls before Run are kept for its first
// round.
func (s *Server) ResolveNow() {
	select {
	case s.resolveKick <- struct{}{}:
	default:
	}
}

// refreshDNS re-resolves every endpoint name periodically, and at once when ResolveNow
// asks, and re-applies when any name's addresses changed (trying again a config refused
// for unresolved names).
func (s *Server) refreshDNS(ctx context.Context) {
	t := time.NewTicker(s.cfg.DNSRefresh)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.resolveKick:
		}
		s.mu.Lock()
		hosts := s.knownHostsLocked()
		s.mu.Unlock()
		ips := make([][]string, len(hosts))
		errs := make([]error, len(hosts))
		for i, h := range hosts {
			ips[i], errs[i] = s.lookup(ctx, h)
		}
		if ctx.Err() != nil {
			return
		}
		// Applied as a reload is (one at a time, never between a reload's read of the Store
		// and its write), and reported before the next reload can report.
		s.reloadMu.Lock()
		s.mu.Lock()
		diff := false
		for i, h := range hosts {
			if errs[i] != nil && s.state.dns[h] != nil && s.state.dns[h].State == dnsOK {
				s.log.Warn().Err(errs[i]).Str("host", h).Msg("re-resolve failed; keeping the last addresses (stale)")
			}
			if s.noteLookupLocked(h, ips[i], errs[i]) {
				diff = true
			}
		}
		if diff {
			if cand := s.state.candidate; cand != nil {
				s.applyFilesLocked(ctx, cand, "endpoint names resolved", s.state.models)
			} else if s.state.files != nil {
				if err := s.applyLocked(ctx); err != nil {
					s.rejectLocked(ctx, err)
					s.problemOfAllLocked(err)
				} else {
					s.clearProblemOfAllLocked()
					s.log.Info().Str("version", s.state.built.Version).Msg("endpoint addresses changed")
				}
			}
		}
		s.mu.Unlock()
		if diff {
			s.report(ctx)
		}
		s.reloadMu.Unlock()
	}
}

// knownHostsLocked lists the names of the served files and of a refused candidate.
func (s *Server) knownHostsLocked() []string {
	seen := map[string]bool{}
	var out []string
	for _, set := range []*rollout.Set{s.state.files, s.state.candidate} {
		if set == nil {
			continue
		}
		for _, h := range translate.Hostnames(set) {
			if !seen[h] {
				seen[h] = true
				out = append(out, h)
			}
		}
	}
	sort.Strings(out)
	return out
}

// checkResolvedLocked refuses a set in which a version with a share has no resolved endpoint.
func (s *Server) checkResolvedLocked(set *rollout.Set) error {
	var errs []error
	for _, r := range set.Rollouts {
		for _, v := range r.Versions {
			share := sharesOf(r, v.Name)
			if share == "" || s.resolvedCountLocked(v) > 0 {
				continue
			}
			var names []string
			for _, ep := range v.AllEndpoints() {
				host, _, _ := net.SplitHostPort(ep)
				msg := ep
				if st := s.state.dns[host]; st != nil && st.Error != "" {
					msg += " (" + st.Error + ")"
				}
				names = append(names, msg)
			}
			errs = append(errs, fmt.Errorf("%s: model %q version %q has %s but none of its endpoints resolves: %s",
				r.Source.File, r.Model, v.Name, share, strings.Join(names, ", ")))
		}
	}
	if len(errs) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %w", errUnresolved, errors.Join(errs...))
}

// sharesOf describes the traffic a version is given ("" when none).
func sharesOf(r *rollout.Rollout, version string) string {
	var parts []string
	if p := r.Traffic[version]; p > 0 {
		parts = append(parts, strconv.Itoa(p)+"% of baseline traffic")
	}
	for _, e := range r.Experiments {
		if e.Allocation <= 0 {
			continue
		}
		for _, a := range e.Arms {
			if a.Version == version {
				parts = append(parts, "arm "+e.Name+"="+a.Name)
			}
		}
	}
	return strings.Join(parts, " and ")
}

// resolvedCountLocked counts the addresses a version's endpoints give now.
func (s *Server) resolvedCountLocked(v rollout.Version) int {
	n := 0
	for _, ep := range v.AllEndpoints() {
		host, _, err := net.SplitHostPort(ep)
		if err != nil {
			continue
		}
		if net.ParseIP(host) != nil {
			n++
			continue
		}
		n += len(s.state.resolved[host])
	}
	return n
}

// EndpointStatus is one endpoint of a version as /status shows it.
type EndpointStatus struct {
	Endpoint  string   `json:"endpoint"`
	Addresses []string `json:"addresses"`
	// State is "ip" for an address literal, else the name's state: ok, unresolved, stale.
	State string `json:"state"`
	Error string `json:"error,omitempty"`
	// Zones maps each address with a known zone (Config.Zones: EndpointSlices) to it, as
	// the last config built serves it: one EDS locality per zone.
	Zones map[string]string `json:"zones,omitempty"`
}

func (s *Server) endpointStatusLocked(v rollout.Version) []EndpointStatus {
	var out []EndpointStatus
	for _, ep := range v.AllEndpoints() {
		host, port, err := net.SplitHostPort(ep)
		if err != nil {
			continue
		}
		if net.ParseIP(host) != nil {
			out = append(out, EndpointStatus{Endpoint: ep, Addresses: []string{ep}, State: "ip"})
			continue
		}
		es := EndpointStatus{Endpoint: ep, Addresses: []string{}, State: dnsUnresolved}
		if st := s.state.dns[host]; st != nil {
			es.State, es.Error = st.State, st.Error
		}
		for _, ip := range s.state.resolved[host] {
			a := net.JoinHostPort(ip, port)
			es.Addresses = append(es.Addresses, a)
			if z := s.state.zones[ip]; z != "" {
				if es.Zones == nil {
					es.Zones = map[string]string{}
				}
				es.Zones[a] = z
			}
		}
		out = append(out, es)
	}
	return out
}

// nameProblem is one endpoint name that is not "ok", for the metric.
type nameProblem struct{ model, version, host, state string }

func (s *Server) nameProblems() []nameProblem {
	s.mu.Lock()
	defer s.mu.Unlock()
	seen := map[nameProblem]bool{}
	var out []nameProblem
	for _, set := range []*rollout.Set{s.state.files, s.state.candidate} {
		if set == nil {
			continue
		}
		for _, r := range set.Rollouts {
			for _, v := range r.Versions {
				for _, ep := range v.AllEndpoints() {
					host, _, err := net.SplitHostPort(ep)
					if err != nil || net.ParseIP(host) != nil {
						continue
					}
					state := dnsUnresolved
					if st := s.state.dns[host]; st != nil {
						state = st.State
					}
					p := nameProblem{r.Model, v.Name, host, state}
					if state != dnsOK && !seen[p] {
						seen[p] = true
						out = append(out, p)
					}
				}
			}
		}
	}
	return out
}
