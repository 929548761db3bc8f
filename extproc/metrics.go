package extproc

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/patchbay-io/patchbay/extproc/internal/assign"
	"github.com/patchbay-io/patchbay/extproc/internal/policy"
)

// Counters are counted on the decision path with one atomic add each and exported by
// OpenTelemetry observable counters, read at collection time (a /metrics scrape). The
// SDK's synchronous counters cost ~0.4–1 µs per decision here (attribute-set lookup,
// exemplar filter reading the stream's context, per-instrument bookkeeping), ~3.5% of
// the process's CPU; see extproc/README.md, "Hot path".

// counter is one series (one attribute set) of a counter, alone on its cache line so
// that series hit by different decisions at once do not share one.
type counter struct {
	n atomic.Int64
	_ [56]byte
}

func (c *counter) inc() { c.n.Add(1) }

// series is a counter with its attribute set.
type series struct {
	attrs attribute.Set
	c     *counter
}

// family is every series of one counter metric for the process's life: a cumulative
// counter keeps a series once counted, across policy swaps, as the SDK's synchronous
// counters do; a series never counted is not exported (as before: a synchronous
// counter's series appears with its first Add).
type family struct {
	inst metric.Int64ObservableCounter
	mu   sync.Mutex
	by   map[attribute.Distinct]*counter
	list []series // append-only
}

// get returns the series of kv, creating it on first use (policy compilation, not the
// decision path).
func (f *family) get(kv ...attribute.KeyValue) *counter {
	set := attribute.NewSet(kv...)
	f.mu.Lock()
	defer f.mu.Unlock()
	if c, ok := f.by[set.Equivalent()]; ok {
		return c
	}
	c := new(counter)
	f.by[set.Equivalent()] = c
	f.list = append(f.list, series{attrs: set, c: c})
	return c
}

func (f *family) observe(o metric.Observer) {
	f.mu.Lock()
	list := f.list
	f.mu.Unlock()
	for _, s := range list {
		if v := s.c.n.Load(); v > 0 {
			o.ObserveInt64(f.inst, v, metric.WithAttributeSet(s.attrs))
		}
	}
}

// instruments are the server's OpenTelemetry instruments.
type instruments struct {
	decisions, exposures, anonymous, rejected, body, updates family
	// latency stays a synchronous histogram (OpenTelemetry has no observable one); it
	// is lock-free in the SDK and recorded with a context only when tracing is on.
	latency metric.Float64Histogram

	rejects  [assign.ModelConflict + 1]*counter
	bodies   [bodyResults]*counter
	accepted *counter
	refused  *counter
}

// Body-mode results, labels of patchbay_extproc_body_total.
const (
	bodyIdentity = iota // identity read from the body
	bodyNone            // body read, no identity in it
	bodyUnusable        // Envoy will not buffer the body (see README)
	bodyResults
)

func newInstruments(m metric.Meter) (*instruments, error) {
	in := &instruments{}
	var errs [8]error
	counter := func(f *family, err *error, name, desc string) {
		f.by = map[attribute.Distinct]*counter{}
		f.inst, *err = m.Int64ObservableCounter(name, metric.WithDescription(desc))
	}
	counter(&in.decisions, &errs[0], "patchbay_extproc_decisions",
		"Routed decisions by model, decided version (empty: Envoy's weighted split) and source (split, experiment, pin).")
	counter(&in.exposures, &errs[1], "patchbay_extproc_exposures",
		"Experiment exposures by model, experiment and arm.")
	counter(&in.anonymous, &errs[2], "patchbay_extproc_anonymous",
		"Decisions without identity (random, non-sticky bucket, no experiments) by model.")
	counter(&in.rejected, &errs[3], "patchbay_extproc_rejected",
		"Requests answered with an error by reason (unknown_model, unknown_version, pin_forbidden).")
	counter(&in.body, &errs[4], "patchbay_extproc_body",
		"Body-mode requests by result (identity, none, unusable).")
	counter(&in.updates, &errs[5], "patchbay_extproc_policy_updates",
		"Policy resources received from the control plane by result (accepted, rejected).")
	in.latency, errs[6] = m.Float64Histogram("patchbay_extproc_decision_duration_seconds",
		metric.WithDescription("Time to decide and build the answer for one request headers message."),
		metric.WithUnit("s"),
		metric.WithExplicitBucketBoundaries(2.5e-7, 5e-7, 1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 1e-2, 0.1))
	fams := []*family{&in.decisions, &in.exposures, &in.anonymous, &in.rejected, &in.body, &in.updates}
	var obs []metric.Observable
	for _, f := range fams {
		if f.inst != nil {
			obs = append(obs, f.inst)
		}
	}
	if errs[0] == nil && errs[6] == nil {
		// The registration lives as long as the meter provider (one per process).
		_, errs[7] = m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
			for _, f := range fams {
				f.observe(o)
			}
			return nil
		}, obs...)
	}
	for _, err := range errs {
		if err != nil {
			return nil, fmt.Errorf("extproc metrics: %w", err)
		}
	}
	in.rejects[assign.UnknownModel] = in.rejected.get(attribute.String("reason", "unknown_model"))
	in.rejects[assign.UnknownVersion] = in.rejected.get(attribute.String("reason", "unknown_version"))
	in.rejects[assign.PinForbidden] = in.rejected.get(attribute.String("reason", "pin_forbidden"))
	in.rejects[assign.ModelConflict] = in.rejected.get(attribute.String("reason", "model_conflict"))
	in.bodies[bodyIdentity] = in.body.get(attribute.String("result", "identity"))
	in.bodies[bodyNone] = in.body.get(attribute.String("result", "none"))
	in.bodies[bodyUnusable] = in.body.get(attribute.String("result", "unusable"))
	in.accepted = in.updates.get(attribute.String("result", "accepted"))
	in.refused = in.updates.get(attribute.String("result", "rejected"))
	return in, nil
}

// labels are the counters of one policy table, indexed by the table's model, version and
// arm IDs, so that counting a decision looks nothing up and builds nothing. A series
// shared with an earlier policy is the same counter.
type labels struct {
	split     []*counter // by model ID
	anonymous []*counter // by model ID
	byExp     []*counter // by version ID: decided by an experiment
	byPin     []*counter // by version ID: decided by a pin
	exposure  []*counter // by arm ID
}

func (in *instruments) newLabels(t *policy.Table) *labels {
	l := &labels{
		split:     make([]*counter, len(t.Models)),
		anonymous: make([]*counter, len(t.Models)),
		byExp:     make([]*counter, t.NVersions),
		byPin:     make([]*counter, t.NVersions),
		exposure:  make([]*counter, t.NArms),
	}
	for _, m := range t.Models {
		model := attribute.String("model", m.Name)
		l.split[m.ID] = in.decisions.get(model, attribute.String("version", ""), attribute.String("source", "split"))
		l.anonymous[m.ID] = in.anonymous.get(model)
		for _, v := range m.Versions {
			l.byExp[v.ID] = in.decisions.get(model, attribute.String("version", v.Name), attribute.String("source", "experiment"))
			l.byPin[v.ID] = in.decisions.get(model, attribute.String("version", v.Name), attribute.String("source", "pin"))
		}
		for _, e := range m.Experiments {
			for _, a := range e.Arms {
				l.exposure[a.ID] = in.exposures.get(model, attribute.String("experiment", e.Name), attribute.String("arm", a.Name))
			}
		}
	}
	return l
}
