package extproc

import (
	"fmt"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/patchbay-io/patchbay/extproc/internal/assign"
	"github.com/patchbay-io/patchbay/extproc/internal/policy"
)

// instruments are the server's OpenTelemetry instruments.
type instruments struct {
	decisions metric.Int64Counter
	exposures metric.Int64Counter
	anonymous metric.Int64Counter
	rejected  metric.Int64Counter
	body      metric.Int64Counter
	updates   metric.Int64Counter
	latency   metric.Float64Histogram

	rejectOpts [assign.ModelConflict + 1][]metric.AddOption
	bodyOpts   [bodyResults][]metric.AddOption
	acceptOpt  []metric.AddOption
	rejectOpt  []metric.AddOption
}

// Body-mode results, labels of patchbay_extproc_body_total.
const (
	bodyIdentity = iota // identity read from the body
	bodyNone            // body read, no identity in it
	bodyUnusable        // Envoy will not buffer the body (see README)
	bodyResults
)

func newInstruments(m metric.Meter) (*instruments, error) {
	var in instruments
	var errs [7]error
	in.decisions, errs[0] = m.Int64Counter("patchbay_extproc_decisions",
		metric.WithDescription("Routed decisions by model, decided version (empty: Envoy's weighted split) and source (split, experiment, pin)."))
	in.exposures, errs[1] = m.Int64Counter("patchbay_extproc_exposures",
		metric.WithDescription("Experiment exposures by model, experiment and arm."))
	in.anonymous, errs[2] = m.Int64Counter("patchbay_extproc_anonymous",
		metric.WithDescription("Decisions without identity (random, non-sticky bucket, no experiments) by model."))
	in.rejected, errs[3] = m.Int64Counter("patchbay_extproc_rejected",
		metric.WithDescription("Requests answered with an error by reason (unknown_model, unknown_version, pin_forbidden)."))
	in.body, errs[4] = m.Int64Counter("patchbay_extproc_body",
		metric.WithDescription("Body-mode requests by result (identity, none, unusable)."))
	in.updates, errs[5] = m.Int64Counter("patchbay_extproc_policy_updates",
		metric.WithDescription("Policy resources received from the control plane by result (accepted, rejected)."))
	in.latency, errs[6] = m.Float64Histogram("patchbay_extproc_decision_duration_seconds",
		metric.WithDescription("Time to decide and build the answer for one request headers message."),
		metric.WithUnit("s"),
		metric.WithExplicitBucketBoundaries(2.5e-7, 5e-7, 1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 1e-2, 0.1))
	for _, err := range errs {
		if err != nil {
			return nil, fmt.Errorf("extproc metrics: %w", err)
		}
	}
	in.rejectOpts[assign.UnknownModel] = opts(attribute.String("reason", "unknown_model"))
	in.rejectOpts[assign.UnknownVersion] = opts(attribute.String("reason", "unknown_version"))
	in.rejectOpts[assign.PinForbidden] = opts(attribute.String("reason", "pin_forbidden"))
	in.rejectOpts[assign.ModelConflict] = opts(attribute.String("reason", "model_conflict"))
	in.bodyOpts[bodyIdentity] = opts(attribute.String("result", "identity"))
	in.bodyOpts[bodyNone] = opts(attribute.String("result", "none"))
	in.bodyOpts[bodyUnusable] = opts(attribute.String("result", "unusable"))
	in.acceptOpt = opts(attribute.String("result", "accepted"))
	in.rejectOpt = opts(attribute.String("result", "rejected"))
	return &in, nil
}

func opts(kv ...attribute.KeyValue) []metric.AddOption {
	return []metric.AddOption{metric.WithAttributeSet(attribute.NewSet(kv...))}
}

// labels are the precomputed attribute options of one policy table, indexed by the
// table's model, version and arm IDs, so that recording a decision builds nothing.
type labels struct {
	split     [][]metric.AddOption // by model ID
	anonymous [][]metric.AddOption // by model ID
	byExp     [][]metric.AddOption // by version ID: decided by an experiment
	byPin     [][]metric.AddOption // by version ID: decided by a pin
	exposure  [][]metric.AddOption // by arm ID
}

func newLabels(t *policy.Table) *labels {
	l := &labels{
		split:     make([][]metric.AddOption, len(t.Models)),
		anonymous: make([][]metric.AddOption, len(t.Models)),
		byExp:     make([][]metric.AddOption, t.NVersions),
		byPin:     make([][]metric.AddOption, t.NVersions),
		exposure:  make([][]metric.AddOption, t.NArms),
	}
	for _, m := range t.Models {
		model := attribute.String("model", m.Name)
		l.split[m.ID] = opts(model, attribute.String("version", ""), attribute.String("source", "split"))
		l.anonymous[m.ID] = opts(model)
		for _, v := range m.Versions {
			l.byExp[v.ID] = opts(model, attribute.String("version", v.Name), attribute.String("source", "experiment"))
			l.byPin[v.ID] = opts(model, attribute.String("version", v.Name), attribute.String("source", "pin"))
		}
		for _, e := range m.Experiments {
			for _, a := range e.Arms {
				l.exposure[a.ID] = opts(model, attribute.String("experiment", e.Name), attribute.String("arm", a.Name))
			}
		}
	}
	return l
}
