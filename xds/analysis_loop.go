package xds

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/patchbay-io/patchbay/internal/tlsfiles"
	"github.com/patchbay-io/patchbay/xds/analysis"
	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/store"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// The canary analysis loop. A rollout with an analysis section is served, while its
// analysis runs, with the split of its current step (rollout.StepSplit: the canary takes
// its step's share out of the pair's total, other versions keep theirs). Each running
// analysis is evaluated every min(interval/4, 5s): its provider measures canary and
// baseline over the step's window [stepStarted, now], analysis.Decide judges it, and the
// decision is written through Store.Update (changeState, the rollback API's path):
//   - advance: next step, stepStarted = now, slots moved with NextSlotMap (monotone);
//   - fail: the rollback path to 100% baseline, reason "analysis: <gate> ...", held until
//     the file changes; phase failed;
//   - done: phase succeeded, the canary keeps its final share;
//   - wait: phase waiting when blocked (minRequests, no data, capacity, metrics
//     unreadable), running while the step has not lasted its interval; written only when
//     the phase changes.
// A new spec (fingerprint) starts the analysis again at step 0 (planState); the stored
// state resumes after a restart. A rollback in force (the admin API) pauses it.
//
// Capacity: before advancing to share s, for each protocol the served model routes, the
// canary's ready endpoints must be at least analysis.CapacityNeeded(s, baseline's ready
// endpoints) = max(1, ceil(s/100 × baseline ready)). Ready: a resolved endpoint the
// version prober holds healthy; without the prober (--version-health-interval 0) or for a
// version it cannot probe (TLS without files: unprobed) every resolved endpoint counts.

// analysisMaxPeriod bounds the time between two evaluations of one analysis.
const analysisMaxPeriod = 5 * time.Second

// analysisIdle is how often the loop looks for new analyses when it was not kicked.
const analysisIdle = time.Second

// webhookTimeout bounds one webhook POST; webhookQueue the decisions waiting to be sent
// (more are dropped and logged: the loop never waits for a webhook).
const (
	webhookTimeout = 2 * time.Second
	webhookQueue   = 64
)

// errStale aborts a decision written on an analysis state that moved meanwhile (a spec
// edit, another replica, a rollback).
var errStale = errors.New("analysis state changed meanwhile")

// analysisLoop is the loop's memory: the last evaluation of each model (for /status and
// metrics), the providers, the webhook queue. Its mutex is never held while taking
// Server.mu.
type analysisLoop struct {
	mu       sync.Mutex
	last     map[string]analysisEval
	embedded *analysis.Embedded
	proms    map[string]promProvider // by model
	kick     chan struct{}
	hooks    chan webhookEvent
	tls      *tlsfiles.Source // nil: versions over TLS are scraped over plain http (and fail)
	dropped  atomic.Int64     // decisions the full webhook queue dropped
	failed   atomic.Int64     // webhook POSTs that failed
	client   *http.Client
}

type promProvider struct {
	key string
	p   analysis.Provider
}

type analysisEval struct {
	at       time.Time
	step     int
	decision analysis.Decision
	m        analysis.Measurement
	err      string
}

// WebhookEvent is what the webhook is POSTed for each decision.
type webhookEvent struct {
	url   string
	Event AnalysisEvent
}

// AnalysisEvent is one decision as the webhook receives it (JSON).
type AnalysisEvent struct {
	Model    string                `json:"model"`
	At       time.Time             `json:"at"`
	Step     int                   `json:"step"` // 1-based
	Share    int                   `json:"share"`
	Decision string                `json:"decision"`
	Reason   string                `json:"reason,omitempty"`
	Phase    string                `json:"phase"`
	Canary   string                `json:"canary"`
	Baseline string                `json:"baseline"`
	Gates    []analysis.GateResult `json:"gates,omitempty"`
}

func (s *Server) newAnalysisLoop() *analysisLoop {
	l := &analysisLoop{last: map[string]analysisEval{}, proms: map[string]promProvider{}, kick: make(chan struct{}, 1),
		hooks: make(chan webhookEvent, webhookQueue), client: &http.Client{Timeout: webhookTimeout}}
	l.embedded = &analysis.Embedded{Endpoints: s.metricsEndpoints, TLS: s.metricsTLS}
	// Versions served over TLS are scraped with the client files the prober uses
	// (--tls-cert/--tls-key, --upstream-tls-ca; loadUpstreamTLS).
	l.tls = s.upstream
	return l
}

// kickAnalyses wakes the loop (a reload may have started an analysis).
func (s *Server) kickAnalyses() {
	select {
	case s.analyses.kick <- struct{}{}:
	default:
	}
}

// analysisSpec is what serves spec while its analysis a runs: the spec with its step's
// split (StepSplit), or spec itself (no analysis, another spec's, or a failed one: the
// rollback in force then serves the baseline; released, the spec's own split).
func analysisSpec(spec *rollout.Rollout, a *store.AnalysisState, fp string) *rollout.Rollout {
	an := spec.Analysis
	if an == nil || a == nil || a.SpecFingerprint != fp || a.Phase == store.PhaseFailed || len(an.Steps) == 0 {
		return spec
	}
	out := *spec
	out.Traffic = rollout.StepSplit(spec.Traffic, an.Baseline, an.Canary, an.Steps[min(max(a.Step, 0), len(an.Steps)-1)])
	return &out
}

// planAnalysis is the analysis state of spec after cur: kept for the same spec, step 0
// (not started yet: the loop stamps stepStarted) for another, none without an analysis.
func planAnalysis(cur *store.AnalysisState, spec *rollout.Rollout, fp string) *store.AnalysisState {
	if spec.Analysis == nil {
		return nil
	}
	if cur != nil && cur.SpecFingerprint == fp {
		return cur.Clone()
	}
	return &store.AnalysisState{SpecFingerprint: fp, Phase: store.PhaseRunning, Reason: "started"}
}

func sameAnalysis(a, b *store.AnalysisState) bool {
	if a == nil || b == nil {
		return a == b
	}
	if a.SpecFingerprint != b.SpecFingerprint || a.Step != b.Step || !a.StepStarted.Equal(b.StepStarted) || a.Phase != b.Phase || a.Reason != b.Reason {
		return false
	}
	x, y := a.LastDecision, b.LastDecision
	if x == nil || y == nil {
		return x == y
	}
	return x.At.Equal(y.At) && x.Step == y.Step && x.Decision == y.Decision && slices.Equal(x.Gates, y.Gates)
}

// runAnalyses evaluates every running analysis every min(interval/4, 5s) until ctx ends.
func (s *Server) runAnalyses(ctx context.Context) {
	go s.sendWebhooks(ctx)
	due := map[string]time.Time{}
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		case <-s.analyses.kick:
		}
		jobs := s.analysisJobs()
		wait := analysisIdle
		live := map[string]bool{}
		for _, j := range jobs {
			live[j.model] = true
			period := min(j.spec.Analysis.Interval.Duration/4, analysisMaxPeriod)
			if d, ok := due[j.model]; !ok || !time.Now().Before(d) {
				s.evaluateAnalysis(ctx, j)
				due[j.model] = time.Now().Add(period)
			}
			wait = min(wait, time.Until(due[j.model]))
		}
		for m := range due {
			if !live[m] {
				delete(due, m)
			}
		}
		if ctx.Err() != nil {
			return
		}
		timer.Reset(max(wait, time.Millisecond))
	}
}

// analysisJob is one running analysis as the loop evaluates it.
type analysisJob struct {
	model    string
	spec     *rollout.Rollout
	fp       string
	state    store.AnalysisState
	capacity []analysis.Capacity
}

// analysisJobs lists the running analyses (not failed or succeeded, no rollback in force).
func (s *Server) analysisJobs() []analysisJob {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state.files == nil || s.state.built == nil {
		return nil
	}
	var jobs []analysisJob
	for _, r := range s.state.files.Rollouts {
		if r.Analysis == nil {
			continue
		}
		ms := s.state.models[r.Model]
		fp := s.fingerprintLocked(r)
		a := ms.Analysis
		if a == nil || a.SpecFingerprint != fp || (a.Phase != store.PhaseRunning && a.Phase != store.PhaseWaiting) {
			continue
		}
		if ms.Rollback != nil && ms.Rollback.SpecFingerprint == fp {
			continue // a rollback in force pauses the analysis
		}
		jobs = append(jobs, analysisJob{model: r.Model, spec: r, fp: fp, state: *a.Clone(), capacity: s.capacityLocked(r)})
	}
	return jobs
}

// capacityLocked counts the ready endpoints of canary and baseline per protocol the served
// model routes (see the rule at the top of this file).
func (s *Server) capacityLocked(r *rollout.Rollout) []analysis.Capacity {
	an := r.Analysis
	served := analysisSpec(r, s.state.models[r.Model].Analysis, s.fingerprintLocked(r))
	health := s.versionHealth()[r.Model]
	var out []analysis.Capacity
	for _, proto := range []string{rollout.REST, rollout.GRPC} {
		if !served.Serves(proto) {
			continue
		}
		c := analysis.Capacity{Protocol: proto}
		c.Canary = s.readyLocked(r, an.Canary, proto, health)
		c.Baseline = s.readyLocked(r, an.Baseline, proto, health)
		out = append(out, c)
	}
	return out
}

func (s *Server) readyLocked(r *rollout.Rollout, version, proto string, health map[string]VersionHealth) int {
	v := r.Version(version)
	if v == nil {
		return 0
	}
	eps := translate.ResolvedEndpoints(s.state.resolved, v.Addrs(proto))
	if s.prober == nil || health[version].State == healthUnprobed {
		return len(eps)
	}
	s.prober.mu.Lock()
	defer s.prober.mu.Unlock()
	n := 0
	for _, ep := range eps {
		if e := s.prober.endpoints[probeKey{r.Model, version, proto, ep}]; e != nil && e.healthy {
			n++
		}
	}
	return n
}

// providerFor is the analysis's metrics provider.
func (s *Server) providerFor(r *rollout.Rollout) (analysis.Provider, error) {
	an := r.Analysis
	if an.Provider != rollout.ProviderPrometheus {
		return s.analyses.embedded, nil
	}
	key := an.Prometheus.URL + "\x00" + fmt.Sprint(an.Prometheus.Queries)
	s.analyses.mu.Lock()
	defer s.analyses.mu.Unlock()
	if p, ok := s.analyses.proms[r.Model]; ok && p.key == key {
		return p.p, nil
	}
	p, err := analysis.NewPrometheus(analysis.PrometheusConfig{URL: an.Prometheus.URL, Queries: an.Prometheus.Queries})
	if err != nil {
		return nil, err
	}
	s.analyses.proms[r.Model] = promProvider{key: key, p: p}
	return p, nil
}

// metricsEndpoints is the embedded provider's view of a version's metricsEndpoints.
func (s *Server) metricsEndpoints(model, version string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state.files == nil {
		return nil
	}
	if r := s.state.files.Model(model); r != nil {
		if v := r.Version(version); v != nil {
			return v.MetricsEndpoints
		}
	}
	return nil
}

// metricsTLS is the client config to scrape a version over TLS (nil: plain http): the
// prober's (--tls-cert/--tls-key, --upstream-tls-ca) for versions served over TLS.
func (s *Server) metricsTLS(model, version, serverName string) *tls.Config {
	if s.analyses.tls == nil {
		return nil
	}
	s.mu.Lock()
	var useTLS bool
	if s.state.files != nil {
		if r := s.state.files.Model(model); r != nil {
			if v := r.Version(version); v != nil {
				useTLS = translate.UpstreamTLS(*v, s.cfg.Translate)
			}
		}
	}
	s.mu.Unlock()
	if !useTLS {
		return nil
	}
	return s.analyses.tls.ClientConfig(serverName)
}

// evaluateAnalysis measures, decides and writes one analysis's decision.
func (s *Server) evaluateAnalysis(ctx context.Context, j analysisJob) {
	an := j.spec.Analysis
	now := time.Now().UTC()
	if j.state.StepStarted.IsZero() {
		// A new analysis (or a new spec): its first window starts now.
		s.writeAnalysis(ctx, j, func(a *store.AnalysisState) { a.StepStarted = now }, nil)
		s.log.Info().Str("model", j.model).Str("canary", an.Canary).Str("baseline", an.Baseline).Int("step", 1).
			Int("share", an.Steps[0]).Msg("analysis step")
		return
	}
	var (
		m      analysis.Measurement
		d      analysis.Decision
		errMsg string
	)
	// A step that gives the baseline nothing (the canary at 100% of the pair) has no
	// baseline traffic to compare with: it judges the canary alone.
	idle := rollout.StepSplit(j.spec.Traffic, an.Baseline, an.Canary, an.Steps[j.state.Step])[an.Baseline] == 0
	p, err := s.providerFor(j.spec)
	if err == nil {
		m, err = analysis.MeasureStep(ctx, p, an, j.model, j.state.StepStarted, now, s.cfg.ShadowAgreement, idle)
	}
	if err != nil {
		if ctx.Err() != nil {
			return
		}
		errMsg = err.Error()
		d = analysis.Decision{Kind: analysis.Wait, Blocked: true, Reason: "metrics: " + errMsg}
	} else {
		d = analysis.Decide(analysis.Input{Step: j.state.Step, Steps: an.Steps, Elapsed: now.Sub(j.state.StepStarted),
			Interval: an.Interval.Duration, MinRequests: float64(an.MinReq()), Measurement: m, Capacity: j.capacity, BaselineIdle: idle})
	}
	s.analyses.mu.Lock()
	s.analyses.last[j.model] = analysisEval{at: now, step: j.state.Step, decision: d, m: m, err: errMsg}
	s.analyses.mu.Unlock()
	s.metrics.analysisDecisions.Add(ctx, 1, metricModelDecision(j.model, string(d.Kind)))
	rec := &store.Decision{At: now, Step: j.state.Step, Decision: string(d.Kind)}
	for _, g := range m.Gates {
		rec.Gates = append(rec.Gates, store.Gate{Metric: g.Gate, Value: finite(g.Value), Threshold: g.Threshold, Pass: g.Pass})
	}
	phase := j.state.Phase
	step := j.state.Step
	switch d.Kind {
	case analysis.Wait:
		phase = store.PhaseRunning
		if d.Blocked {
			phase = store.PhaseWaiting
		}
		if phase != j.state.Phase {
			s.writeAnalysis(ctx, j, func(a *store.AnalysisState) { a.Phase, a.Reason, a.LastDecision = phase, d.Reason, rec }, nil)
			s.log.Info().Str("model", j.model).Int("step", j.state.Step+1).Str("phase", phase).Str("reason", d.Reason).Msg("analysis " + phase)
		}
	case analysis.Advance:
		phase, step = store.PhaseRunning, j.state.Step+1
		// The next window starts after this evaluation's scrape (taken after now): a
		// provider reads the window's start from its last sample at or before it, and
		// that must be this one, not the one before it, or the next step's window would
		// count a period of this step's split.
		started := time.Now().UTC()
		if s.writeAnalysis(ctx, j, func(a *store.AnalysisState) {
			a.Step, a.StepStarted, a.Phase, a.Reason, a.LastDecision = step, started, phase, d.Reason, rec
		}, nil) {
			s.log.Info().Str("model", j.model).Str("canary", an.Canary).Int("step", step+1).Int("share", an.Steps[step]).
				Str("reason", d.Reason).Msg("analysis step")
		}
	case analysis.Done:
		phase = store.PhaseSucceeded
		if s.writeAnalysis(ctx, j, func(a *store.AnalysisState) { a.Phase, a.Reason, a.LastDecision = phase, d.Reason, rec }, nil) {
			s.log.Info().Str("model", j.model).Str("canary", an.Canary).Int("share", an.Steps[len(an.Steps)-1]).
				Str("reason", d.Reason).Msg("analysis promoted")
		}
	case analysis.Fail:
		phase = store.PhaseFailed
		reason := "analysis: " + d.Reason
		if s.writeAnalysis(ctx, j, func(a *store.AnalysisState) { a.Phase, a.Reason, a.LastDecision = phase, reason, rec }, &reason) {
			s.log.Warn().Str("model", j.model).Str("canary", an.Canary).Str("baseline", an.Baseline).Str("gate", d.Gate).
				Int("step", j.state.Step+1).Str("reason", reason).Msg("analysis rolled back")
		}
	}
	if an.Webhook != "" {
		ev := AnalysisEvent{Model: j.model, At: now, Step: step + 1, Share: an.Steps[step], Decision: string(d.Kind), Reason: d.Reason,
			Phase: phase, Canary: an.Canary, Baseline: an.Baseline, Gates: m.Gates}
		select {
		case s.analyses.hooks <- webhookEvent{url: an.Webhook, Event: ev}:
		default:
			// Logged on the first drop and every 100th after it: a dead webhook is not a
			// log line per evaluation.
			if n := s.analyses.dropped.Add(1); n == 1 || n%100 == 0 {
				s.log.Warn().Str("model", j.model).Str("webhook", an.Webhook).Int64("dropped", n).
					Msg("analysis webhook queue full: decisions dropped (the webhook is slow or down)")
			}
		}
	}
}

// writeAnalysis changes the stored analysis of j (through changeState: built and checked,
// written through Store.Update, served) when it is still the one j was evaluated on. A
// failing decision (rollback non-nil: its reason) also takes the rollback path to 100% of
// the baseline. It reports whether the write happened.
func (s *Server) writeAnalysis(ctx context.Context, j analysisJob, change func(*store.AnalysisState), rollback *string) bool {
	an := j.spec.Analysis
	at := time.Now().UTC()
	_, err := s.changeState(ctx, j.model, func(cur store.ModelState, spec *rollout.Rollout, fp string) (store.ModelState, error) {
		a := cur.Analysis
		if fp != j.fp || a == nil || a.SpecFingerprint != j.fp || a.Step != j.state.Step || a.Phase != j.state.Phase ||
			!a.StepStarted.Equal(j.state.StepStarted) || (cur.Rollback != nil && cur.Rollback.SpecFingerprint == fp) {
			return cur, errStale
		}
		next := cur.Clone()
		if rollback != nil {
			rb, _, err := rollbackState(cur, spec, fp, an.Baseline, at)
			if err != nil {
				return cur, err
			}
			rb.Rollback.Reason = *rollback
			next = rb
			next.Analysis = cur.Analysis.Clone()
		}
		change(next.Analysis)
		if rollback == nil {
			eff := analysisSpec(spec, next.Analysis, fp)
			next.Slots = toRuns(translate.NextSlotMap(toSlotMap(cur.Slots), versionList(eff), eff.Traffic))
			next.History = appendHistory(next.History, eff.Traffic)
		}
		return next, nil
	})
	if err != nil {
		if !errors.Is(err, errStale) && ctx.Err() == nil {
			s.log.Error().Err(err).Str("model", j.model).Msg("analysis decision could not be written; retried next evaluation")
		}
		return false
	}
	return true
}

func finite(v float64) float64 {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return 0
	}
	return v
}

// sendWebhooks POSTs queued decisions one at a time, each bounded by webhookTimeout; a
// failure is logged and dropped (best effort).
func (s *Server) sendWebhooks(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case h := <-s.analyses.hooks:
			b, _ := json.Marshal(h.Event)
			rctx, cancel := context.WithTimeout(ctx, webhookTimeout)
			req, err := http.NewRequestWithContext(rctx, http.MethodPost, h.url, bytes.NewReader(b))
			if err == nil {
				req.Header.Set("Content-Type", "application/json")
				var resp *http.Response
				if resp, err = s.analyses.client.Do(req); err == nil {
					resp.Body.Close()
					if resp.StatusCode/100 != 2 {
						err = fmt.Errorf("HTTP %d", resp.StatusCode)
					}
				}
			}
			cancel()
			if err != nil && ctx.Err() == nil {
				if n := s.analyses.failed.Add(1); n == 1 || n%100 == 0 {
					s.log.Warn().Err(err).Str("model", h.Event.Model).Str("webhook", h.url).Int64("failed", n).
						Msg("analysis webhook failed (best effort: not retried)")
				}
			}
		}
	}
}

// AnalysisStatus is one model's analysis as /status shows it.
type AnalysisStatus struct {
	Phase       string    `json:"phase"`
	Canary      string    `json:"canary"`
	Baseline    string    `json:"baseline"`
	Step        int       `json:"step"` // 1-based
	Steps       []int     `json:"steps"`
	Share       int       `json:"share"` // the canary's step share
	StepStarted time.Time `json:"step_started,omitzero"`
	Reason      string    `json:"reason,omitempty"`
	// Decision is the last evaluation's (this process's; else the last stored one).
	Decision    string             `json:"decision,omitempty"`
	DecisionWhy string             `json:"decision_reason,omitempty"`
	EvaluatedAt time.Time          `json:"evaluated_at,omitzero"`
	Requests    map[string]float64 `json:"requests,omitempty"` // per version, in the window
	Gates       []GateStatus       `json:"gates,omitempty"`
}

// GateStatus is one gate bound's last value.
type GateStatus struct {
	Gate      string  `json:"gate"`
	Metric    string  `json:"metric"`
	Value     float64 `json:"value"`
	Threshold float64 `json:"threshold"`
	Pass      bool    `json:"pass"`
	NoData    string  `json:"no_data,omitempty"`
	// Skipped: a gate comparing with the baseline at a step that gives it no share.
	Skipped string `json:"skipped,omitempty"`
}

// analysisStatusLocked is the analysis of served (a model's rollout as served) for
// /status (nil without one).
func (s *Server) analysisStatusLocked(served *rollout.Rollout) *AnalysisStatus {
	if served.Analysis == nil {
		return nil // most models: no lookup
	}
	model := served.Model
	r := s.state.files.Model(model)
	if r == nil || r.Analysis == nil {
		return nil
	}
	an := r.Analysis
	a := s.state.models[model].Analysis
	if a == nil || a.SpecFingerprint != s.fingerprintLocked(r) {
		return &AnalysisStatus{Phase: "pending", Canary: an.Canary, Baseline: an.Baseline, Steps: an.Steps, Step: 1, Share: an.Steps[0]}
	}
	step := min(max(a.Step, 0), len(an.Steps)-1)
	st := &AnalysisStatus{Phase: a.Phase, Canary: an.Canary, Baseline: an.Baseline, Step: step + 1, Steps: an.Steps, Share: an.Steps[step],
		StepStarted: a.StepStarted, Reason: a.Reason}
	s.analyses.mu.Lock()
	ev, ok := s.analyses.last[model]
	s.analyses.mu.Unlock()
	if ok && !ev.at.Before(a.StepStarted) {
		st.Decision, st.DecisionWhy, st.EvaluatedAt = string(ev.decision.Kind), ev.decision.Reason, ev.at
		if ev.err == "" {
			st.Requests = map[string]float64{an.Canary: ev.m.CanaryRequests, an.Baseline: ev.m.BaselineRequests}
		}
		for _, g := range ev.m.Gates {
			st.Gates = append(st.Gates, GateStatus{Gate: g.Gate, Metric: g.Metric, Value: finite(g.Value), Threshold: g.Threshold, Pass: g.Pass, NoData: g.NoData, Skipped: g.Skipped})
		}
	} else if d := a.LastDecision; d != nil {
		st.Decision, st.EvaluatedAt = d.Decision, d.At
		for _, g := range d.Gates {
			st.Gates = append(st.Gates, GateStatus{Gate: g.Metric, Value: g.Value, Threshold: g.Threshold, Pass: g.Pass})
		}
	}
	return st
}

// analysisGauges are the values of patchbay_xds_analysis_step and _gate_value.
func (s *Server) analysisGauges() (steps map[string]int, gates map[[2]string]float64) {
	s.mu.Lock()
	steps = map[string]int{}
	if s.state.files != nil {
		for _, r := range s.state.files.Rollouts {
			if a := s.state.models[r.Model].Analysis; r.Analysis != nil && a != nil {
				steps[r.Model] = a.Step + 1
			}
		}
	}
	s.mu.Unlock()
	gates = map[[2]string]float64{}
	s.analyses.mu.Lock()
	defer s.analyses.mu.Unlock()
	for m, ev := range s.analyses.last {
		if _, ok := steps[m]; !ok {
			continue
		}
		for _, g := range ev.m.Gates {
			if g.NoData == "" && g.Skipped == "" {
				gates[[2]string{m, g.Gate}] = finite(g.Value)
			}
		}
	}
	return steps, gates
}
