package xds

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/shadow"
	"github.com/patchbay-io/patchbay/xds/store"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// AdminHandler serves /readyz, /metrics, /status and the rollback API.
//
//	POST   /v1/models/{model}/rollback   body optional: {"version": "v7"}
//	DELETE /v1/models/{model}/rollback   release a rollback before the file changes
//
// Without a version, the model goes back to its last known-good split: the most recent
// split its files served that differs from the current one (a second rollback goes one
// step further back). With a version, 100% of the model's traffic goes to it. Either way
// the rest of the model's config is the current file's, experiments and shadows are off,
// it is live at once and it holds until the model's rollout file changes. Both need
// "Authorization: Bearer TOKEN" or a client certificate with role operator (see auth).
func (s *Server) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if err := s.storeCorrupt(); err != nil {
			http.Error(w, "state store unreadable: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		if s.Version() == "" {
			http.Error(w, "no valid config yet", http.StatusServiceUnavailable)
			return
		}
		if s.contractWaiting.Load() {
			http.Error(w, "waiting for the first contract checks before serving ADS (--contract-wait)", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.Handle("GET /metrics", s.cfg.Metrics.Handler)
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, http.StatusOK, s.Status()) })
	mux.HandleFunc("POST /v1/models/{model}/rollback", s.auth(s.handleRollback))
	mux.HandleFunc("DELETE /v1/models/{model}/rollback", s.auth(s.handleRelease))
	return mux
}

// auth guards a mutation: a client certificate with role operator (when client
// certificates are required), or "Authorization: Bearer TOKEN" (the scheme in any case;
// compared in constant time). The model in the path must be a valid model name.
func (s *Server) auth(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if m := r.PathValue("model"); !rollout.ValidModelName(m) {
			writeJSON(w, http.StatusBadRequest, errorBody(fmt.Sprintf("%q is not a model name (a DNS label)", m)))
			return
		}
		if s.identity && r.TLS != nil && s.peers.role(r.TLS) == RoleOperator {
			next(w, r)
			return
		}
		if s.token == nil {
			writeJSON(w, http.StatusForbidden, errorBody("mutations disabled: start patchbay xds with --admin-token-file, or use a client certificate with role operator"))
			return
		}
		scheme, got, _ := strings.Cut(strings.TrimSpace(r.Header.Get("Authorization")), " ")
		ok := false
		if strings.EqualFold(scheme, "Bearer") {
			var err error
			if ok, err = s.token.check(strings.TrimSpace(got)); err != nil {
				s.log.Error().Err(err).Msg("admin token unusable; refusing mutations until it is fixed")
				writeJSON(w, http.StatusServiceUnavailable, errorBody("the admin token file is unusable; see the control plane's log"))
				return
			}
		}
		if !ok {
			w.Header().Set("WWW-Authenticate", `Bearer realm="patchbay"`)
			writeJSON(w, http.StatusUnauthorized, errorBody(`missing or wrong bearer token: send "Authorization: Bearer TOKEN" `+
				"with the token in the control plane's --admin-token-file (patchbay rollout rollback: --token-file FILE, "+
				"or set the PATCHBAY_ADMIN_TOKEN environment variable)"))
			return
		}
		next(w, r)
	}
}

// RollbackResult is the rollback API's answer.
type RollbackResult struct {
	Model   string         `json:"model"`
	Traffic map[string]int `json:"traffic"`
	Version string         `json:"config_version"`
	Reason  string         `json:"reason"`
}

func (s *Server) handleRollback(w http.ResponseWriter, r *http.Request) {
	var body struct {
		Version string `json:"version"`
	}
	b, err := io.ReadAll(io.LimitReader(r.Body, 4096))
	if err == nil && len(strings.TrimSpace(string(b))) > 0 {
		dec := json.NewDecoder(strings.NewReader(string(b)))
		dec.DisallowUnknownFields()
		err = dec.Decode(&body)
	}
	if err != nil {
		writeJSON(w, http.StatusBadRequest, errorBody("body: want {} or {\"version\": \"<version>\"}: "+err.Error()))
		return
	}
	res, code, err := s.Rollback(r.Context(), r.PathValue("model"), body.Version)
	if err != nil {
		writeJSON(w, code, errorBody(err.Error()))
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func (s *Server) handleRelease(w http.ResponseWriter, r *http.Request) {
	model := r.PathValue("model")
	version, code, err := s.Release(r.Context(), model)
	if err != nil {
		writeJSON(w, code, errorBody(err.Error()))
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"model": model, "config_version": version})
}

// Release ends the rollback in force for a model (the spec's split is served again) and
// returns the config version and the HTTP status to answer with.
func (s *Server) Release(ctx context.Context, model string) (string, int, error) {
	version := ""
	code, err := s.changeState(ctx, model, func(cur store.ModelState, spec *rollout.Rollout, fp string) (store.ModelState, error) {
		return releaseState(cur, spec, fp)
	})
	if err == nil {
		s.mu.Lock()
		version = s.state.built.Version
		s.mu.Unlock()
		s.log.Info().Str("model", model).Str("version", version).Msg("rollback released through the admin API")
	}
	return version, code, err
}

// Rollback applies a rollback (see AdminHandler) and returns the HTTP status to answer with.
// Any replica may take it: the target comes from the stored history, it is written
// through the Store, and every replica sharing the Store serves it.
func (s *Server) Rollback(ctx context.Context, model, version string) (*RollbackResult, int, error) {
	at := time.Now().UTC()
	var traffic map[string]int
	var reason string
	code, err := s.changeState(ctx, model, func(cur store.ModelState, spec *rollout.Rollout, fp string) (store.ModelState, error) {
		if version != "" && !hasVersion(spec, version) {
			return cur, &httpError{http.StatusBadRequest, fmt.Errorf("model %q has no version %q", model, version)}
		}
		next, t, err := rollbackState(cur, spec, fp, version, at)
		if err == nil {
			traffic, reason = t, next.Rollback.Reason
		}
		return next, err
	})
	if err != nil {
		return nil, code, err
	}
	s.mu.Lock()
	v := s.state.built.Version
	s.mu.Unlock()
	s.metrics.rollbacks.Add(ctx, 1)
	s.log.Warn().Str("model", model).Str("reason", reason).Interface("traffic", traffic).
		Str("version", v).Msg("rollback applied; holds until the model's rollout changes")
	return &RollbackResult{Model: model, Traffic: traffic, Version: v, Reason: reason}, http.StatusOK, nil
}

// changeState changes one model's stored state by rule (rollbackState, releaseState) and
// serves it: the rule is tried on the state served and the result translated and checked
// first (nothing is written that cannot be served), then written through Store.Update (the
// rule re-run on the stored state), and what the Store kept is served.
func (s *Server) changeState(ctx context.Context, model string,
	rule func(cur store.ModelState, spec *rollout.Rollout, fp string) (store.ModelState, error)) (int, error) {
	// One change at a time, and never between a reload's read of the Store and its write.
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.state.storeErr; err != nil && errors.Is(err, store.ErrCorrupt) {
		return http.StatusServiceUnavailable, fmt.Errorf("the state store cannot be read; recover it first: %w", err)
	}
	if s.state.files == nil || s.state.built == nil {
		return http.StatusServiceUnavailable, errors.New("no config loaded yet")
	}
	spec := s.state.files.Model(model)
	if spec == nil {
		return http.StatusNotFound, fmt.Errorf("unknown model %q", model)
	}
	fp := fingerprint(spec)
	codeOf := func(err error) int {
		var he *httpError
		if errors.As(err, &he) {
			return he.code
		}
		return http.StatusInternalServerError
	}
	planned, err := rule(s.state.models[model], spec, fp)
	if err != nil {
		return codeOf(err), err
	}
	prev := s.saveLocked()
	models := make(map[string]store.ModelState, len(s.state.models))
	for k, v := range s.state.models {
		models[k] = v
	}
	models[model] = planned
	s.state.models = models
	s.deriveLocked()
	built, err := s.buildLocked()
	if err != nil {
		s.restoreLocked(prev)
		return http.StatusInternalServerError, err
	}
	got, err := s.store.Update(ctx, model, func(cur store.ModelState) (store.ModelState, error) {
		next, err := rule(cur, spec, fp)
		if err == nil {
			next.ConfigVersion = built.Version
		}
		return next, err
	})
	if err != nil {
		s.restoreLocked(prev)
		if code := codeOf(err); code != http.StatusInternalServerError {
			return code, err
		}
		return http.StatusServiceUnavailable, fmt.Errorf("write the state store: %w", err)
	}
	models[model] = got
	s.state.synced[model] = fp
	s.deriveLocked()
	if err := s.applyLocked(ctx); err != nil {
		return http.StatusInternalServerError, err
	}
	return http.StatusOK, nil
}

// Status is what /status shows.
type Status struct {
	ConfigVersion string     `json:"config_version"`
	Ready         bool       `json:"ready"`
	AppliedAt     *time.Time `json:"applied_at,omitempty"`
	RolloutsDir   string     `json:"rollouts_dir"`
	// Source names where rollouts come from (a directory, a Kubernetes namespace) and
	// StateStore where slot maps, rollbacks and history are kept.
	Source     string        `json:"source"`
	StateStore string        `json:"state_store"`
	Models     []ModelStatus `json:"models"`
	// CurrentError is why the last reload was refused (the last good config is served);
	// absent once a reload succeeds. Errors is the last distinct rejections with their
	// times, oldest first: history, not the current state.
	CurrentError    *statusError    `json:"current_error,omitempty"`
	Errors          []statusError   `json:"errors"`
	RejectedConfigs int             `json:"rejected_configs"`
	Clients         map[Flavour]int `json:"clients"`
	// Names is every endpoint host name known (served or in a refused config): its
	// addresses and whether it resolves (ok, unresolved, stale).
	Names map[string]NameStatus `json:"names,omitempty"`
	// Shadow is the comparison of shadowed versions' predictions with the live ones
	// (xds/shadow): per model, shadow version and output, from the records the model hosts
	// send (`patchbay modelhost --shadow-records`).
	Shadow *shadow.Status `json:"shadow,omitempty"`
}

// ModelStatus is one model's served state.
type ModelStatus struct {
	Name     string   `json:"name"`
	File     string   `json:"file"`
	Versions []string `json:"versions"`
	// Endpoints shows each version's endpoints and what they resolve to.
	Endpoints   map[string][]EndpointStatus `json:"endpoints"`
	Traffic     map[string]int              `json:"traffic"`
	SlotRuns    []translate.Run             `json:"slot_runs"`
	Experiments []string                    `json:"experiments,omitempty"`
	Shadows     map[string]float64          `json:"shadows,omitempty"`
	Rollback    *RollbackStatus             `json:"rollback,omitempty"`
	// Health is each probed version's health (healthy, unhealthy: its slots are lent to
	// healthy versions, unprobed: over TLS without readable files, counted healthy) and
	// ServingRuns the split as served when some version is unhealthy.
	Health      map[string]VersionHealth `json:"health,omitempty"`
	ServingRuns []translate.Run          `json:"serving_slot_runs,omitempty"`
	// Analysis is the model's canary analysis, if its rollout has one (analysis_loop.go).
	Analysis *AnalysisStatus `json:"analysis,omitempty"`
	// Contract is each version's standing against the model's contract (ok, held with the
	// reason, pending), and ContractFallback what is served when every version with a
	// share is held (contract.go).
	Contract         map[string]ContractStatus `json:"contract,omitempty"`
	ContractFallback string                    `json:"contract_fallback,omitempty"`
}

// RollbackStatus describes a rollback in force.
type RollbackStatus struct {
	Reason string    `json:"reason"`
	At     time.Time `json:"at"`
}

// Status reports the served state.
func (s *Server) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Status{RolloutsDir: s.cfg.RolloutsDir, Source: s.source.Describe(), StateStore: describeStore(s.store), RejectedConfigs: s.state.rejected,
		Clients: s.metrics.clients.byFlavour(), Models: []ModelStatus{}, Errors: append([]statusError{}, s.state.errs...)}
	if e := s.state.curErr; e != nil {
		c := *e
		st.CurrentError = &c
	}
	if len(s.state.dns) > 0 {
		st.Names = map[string]NameStatus{}
		for h, hs := range s.state.dns {
			st.Names[h] = *hs
		}
	}
	if sh := s.shadow.Results(); sh.Records.Received > 0 {
		st.Shadow = &sh
	}
	if s.state.built == nil {
		return st
	}
	st.ConfigVersion, st.Ready = s.state.built.Version, s.state.storeErr == nil || !errors.Is(s.state.storeErr, store.ErrCorrupt)
	at := s.state.applied
	st.AppliedAt = &at
	health := s.versionHealth()
	for _, r := range s.effectiveLocked().Rollouts {
		ms := ModelStatus{Health: health[r.Model], ServingRuns: s.servingRunsLocked(r), Name: r.Model, File: r.Source.File, Traffic: r.Traffic, SlotRuns: s.state.slots[r.Model].Runs(),
			Endpoints: map[string][]EndpointStatus{}}
		for _, v := range r.Versions {
			ms.Versions = append(ms.Versions, v.Name)
			ms.Endpoints[v.Name] = s.endpointStatusLocked(v)
		}
		for _, e := range r.Experiments {
			ms.Experiments = append(ms.Experiments, e.Name)
		}
		if len(r.Shadow) > 0 {
			ms.Shadows = map[string]float64{}
			for _, sh := range r.Shadow {
				ms.Shadows[sh.Version] = sh.Percent
			}
		}
		if o := s.state.overrides[r.Model]; o != nil {
			ms.Rollback = &RollbackStatus{Reason: o.reason, At: o.at}
		}
		ms.Analysis = s.analysisStatusLocked(r)
		ms.Contract, ms.ContractFallback = s.contractStatusLocked(r.Model)
		st.Models = append(st.Models, ms)
	}
	return st
}

// closeDoors marks in a rollback target the versions it leaves at zero as Closed: no
// pinned path (Envoy answers 404 "rolled back"), x-patchbay-version route (Envoy falls
// through to the split; a proxyless caller's pin is refused with FAILED_PRECONDITION before
// anything is sent), mirror, experiment arm or ext_proc pin reaches them (the policy lists
// only the open versions). Their clusters stay: an Envoy applying the change never holds a
// route naming a cluster it no longer has (that window answered 503 "unknown cluster"), and
// grpc-go keeps the cluster a release names again. Experiments and shadows are already off.
func closeDoors(r *rollout.Rollout) {
	traffic := map[string]int{}
	closed := map[string]bool{}
	for _, v := range r.Versions {
		if r.Traffic[v.Name] > 0 {
			traffic[v.Name] = r.Traffic[v.Name]
		} else {
			closed[v.Name] = true
		}
	}
	r.Traffic, r.Closed = traffic, closed
}

func hasVersion(r *rollout.Rollout, v string) bool {
	for _, x := range r.Versions {
		if x.Name == v {
			return true
		}
	}
	return false
}

func versionNames(r *rollout.Rollout) string {
	names := make([]string, len(r.Versions))
	for i, v := range r.Versions {
		names[i] = v.Name
	}
	return strings.Join(names, ", ")
}

// versionsExist reports whether every version with traffic is still in the rollout.
func versionsExist(r *rollout.Rollout, traffic map[string]int) bool {
	for v, w := range traffic {
		if w > 0 && !hasVersion(r, v) {
			return false
		}
	}
	return true
}

// fingerprint identifies a rollout's content (not its position in the file).
func fingerprint(r *rollout.Rollout) string {
	b, _ := json.Marshal(r) // plain structs and maps: cannot fail
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}

func errorBody(msg string) map[string]string { return map[string]string{"error": msg} }

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
