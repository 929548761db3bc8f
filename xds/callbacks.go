package xds

import (
	"context"
	"sync"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
)

type metrics struct {
	pushes       metric.Int64Counter
	nacks        metric.Int64Counter
	rejected     metric.Int64Counter
	applies      metric.Int64Counter
	rollbacks    metric.Int64Counter
	emptyRefused metric.Int64Counter
	refused      metric.Int64Counter
	applySeconds metric.Float64Histogram
	clients      *clientCounts
	// analysisDecisions counts analysis evaluations by model and decision.
	analysisDecisions metric.Int64Counter
}

func metricModelDecision(model, decision string) metric.AddOption {
	return metric.WithAttributes(attribute.String("model", model), attribute.String("decision", decision))
}

type clientCounts struct {
	mu      sync.Mutex
	streams map[int64]Flavour
}

func (c *clientCounts) byFlavour() map[Flavour]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[Flavour]int{}
	for _, f := range c.streams {
		out[f]++
	}
	return out
}

// applySecondsBuckets are patchbay_xds_apply_seconds' bounds, in seconds: from half a
// millisecond (a small config) to 10 s (thousands of models on a slow machine). The SDK's
// default bounds (0, 5, 10, … 10000) are meant for milliseconds.
var applySecondsBuckets = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}

func newMetrics(m metric.Meter, s *Server) (*metrics, error) {
	var (
		out = &metrics{clients: &clientCounts{streams: map[int64]Flavour{}}}
		err error
		all []error
	)
	out.pushes, err = m.Int64Counter("patchbay_xds_pushes", metric.WithDescription("xDS responses sent, by client flavour and type"))
	all = append(all, err)
	out.nacks, err = m.Int64Counter("patchbay_xds_nacks", metric.WithDescription("xDS responses rejected by clients, by flavour and type"))
	all = append(all, err)
	out.rejected, err = m.Int64Counter("patchbay_xds_rejected_configs", metric.WithDescription("rollout configs refused (bad files or failed validation); the last good config kept serving"))
	all = append(all, err)
	out.emptyRefused, err = m.Int64Counter("patchbay_xds_empty_reloads_refused", metric.WithDescription("reloads refused because they found no rollout at all (start with --allow-empty to allow)"))
	all = append(all, err)
	out.refused, err = m.Int64Counter("patchbay_xds_streams_refused", metric.WithDescription("xDS streams closed because the client's identity may not have what it asked for, by role"))
	all = append(all, err)
	_, err = m.Int64ObservableGauge("patchbay_xds_unresolved_endpoint_names", metric.WithDescription("endpoint host names that do not resolve (state unresolved: never did; stale: last known addresses kept), by model, version and host"),
		metric.WithInt64Callback(func(_ context.Context, o metric.Int64Observer) error {
			for _, p := range s.nameProblems() {
				o.Observe(1, metric.WithAttributes(attribute.String("model", p.model), attribute.String("version", p.version),
					attribute.String("host", p.host), attribute.String("state", p.state)))
			}
			return nil
		}))
	all = append(all, err)
	_, err = m.Int64ObservableGauge("patchbay_xds_version_healthy", metric.WithDescription("1 while a probed version is healthy (or unprobed: over TLS without readable files), 0 while unhealthy and its slots are lent to healthy versions, by model and version"),
		metric.WithInt64Callback(func(_ context.Context, o metric.Int64Observer) error {
			for m, vs := range s.versionHealth() {
				for v, vh := range vs {
					n := int64(1)
					if vh.State == healthUnhealthy {
						n = 0
					}
					o.Observe(n, metric.WithAttributes(attribute.String("model", m), attribute.String("version", v)))
				}
			}
			return nil
		}))
	all = append(all, err)
	out.analysisDecisions, err = m.Int64Counter("patchbay_xds_analysis_decisions", metric.WithDescription("canary analysis evaluations, by model and decision (advance, wait, fail, done)"))
	all = append(all, err)
	_, err = m.Int64ObservableGauge("patchbay_xds_analysis_step", metric.WithDescription("the step (1-based) a model's canary analysis is at, by model"),
		metric.WithInt64Callback(func(_ context.Context, o metric.Int64Observer) error {
			steps, _ := s.analysisGauges()
			for m, n := range steps {
				o.Observe(int64(n), metric.WithAttributes(attribute.String("model", m)))
			}
			return nil
		}))
	all = append(all, err)
	_, err = m.Float64ObservableGauge("patchbay_xds_analysis_gate_value", metric.WithDescription("the last value of each gate of a model's canary analysis (error rate, seconds, ratio, PSI, agreement), by model and gate"),
		metric.WithFloat64Callback(func(_ context.Context, o metric.Float64Observer) error {
			_, gates := s.analysisGauges()
			for k, v := range gates {
				o.Observe(v, metric.WithAttributes(attribute.String("model", k[0]), attribute.String("gate", k[1])))
			}
			return nil
		}))
	all = append(all, err)
	out.applies, err = m.Int64Counter("patchbay_xds_config_applies", metric.WithDescription("configs applied"))
	all = append(all, err)
	out.rollbacks, err = m.Int64Counter("patchbay_xds_rollbacks", metric.WithDescription("rollbacks through the admin API"))
	all = append(all, err)
	out.applySeconds, err = m.Float64Histogram("patchbay_xds_apply_seconds", metric.WithDescription("time to translate, validate and set a config"), metric.WithUnit("s"),
		metric.WithExplicitBucketBoundaries(applySecondsBuckets...))
	all = append(all, err)
	_, err = m.Int64ObservableGauge("patchbay_xds_clients", metric.WithDescription("connected xDS streams by client flavour"),
		metric.WithInt64Callback(func(_ context.Context, o metric.Int64Observer) error {
			counts := out.clients.byFlavour()
			for _, f := range Flavours {
				o.Observe(int64(counts[f]), metric.WithAttributes(attribute.String("flavour", string(f))))
			}
			return nil
		}))
	all = append(all, err)
	_, err = m.Int64ObservableGauge("patchbay_xds_config_info", metric.WithDescription("1, labelled with the config version being served"),
		metric.WithInt64Callback(func(_ context.Context, o metric.Int64Observer) error {
			if v := s.Version(); v != "" {
				o.Observe(1, metric.WithAttributes(attribute.String("version", v)))
			}
			return nil
		}))
	all = append(all, err)
	for _, e := range all {
		if e != nil {
			return nil, e
		}
	}
	return out, nil
}

// callbacks decide each stream's flavour (from its client certificate when identities are
// on, else from its node), refuse what the flavour may not have, and count clients, pushes
// and NACKs, logging NACKs once each.
func (s *Server) callbacks() serverv3.Callbacks {
	c := s.metrics.clients
	var (
		rolesMu sync.Mutex
		roles   = map[int64]string{}
		nodes   = map[int64]*corev3.Node{} // each stream's last node, marked with its flavour
	)
	opened := func(ctx context.Context, id int64) error {
		if !s.identity {
			return nil
		}
		role := s.peers.streamRole(ctx)
		if _, ok := roleFlavour[role]; !ok {
			s.metrics.refused.Add(ctx, 1, metric.WithAttributes(attribute.String("role", role)))
			if role == "" {
				return status.Error(codes.PermissionDenied, "xds: the client certificate carries no patchbay identity (URI SAN "+SPIFFEPrefix+"<role>)")
			}
			return status.Errorf(codes.PermissionDenied, "xds: role %q is not an xDS client", role)
		}
		rolesMu.Lock()
		roles[id] = role
		rolesMu.Unlock()
		return nil
	}
	// decide returns the stream's flavour, fixed by its first request.
	decide := func(id int64, n *corev3.Node) (Flavour, bool) {
		c.mu.Lock()
		defer c.mu.Unlock()
		if f, ok := c.streams[id]; ok {
			return f, true
		}
		var f Flavour
		if s.identity {
			rolesMu.Lock()
			f = roleFlavour[roles[id]]
			rolesMu.Unlock()
		} else if n != nil {
			f = FlavourOf(n)
		} else {
			return "", false
		}
		c.streams[id] = f
		return f, true
	}
	// admit checks the request against the stream's flavour (the ext_proc policy goes to
	// ext_proc only, and ext_proc gets nothing else) and returns the node to serve it with,
	// never nil and always marked with the flavour: a request without a node (a later
	// delta request, or with identities on even the first) gets the stream's last marked
	// node, or a blank one marked with the certificate's flavour. An unmarked node never
	// reaches the cache (nodeHash serves it nothing).
	admit := func(id int64, n *corev3.Node, typeURL string) (*corev3.Node, error) {
		f, ok := decide(id, n)
		if !ok {
			return n, status.Error(codes.InvalidArgument, "xds: the first request of a stream must carry a node")
		}
		if (typeURL == policyv1.TypeURL) != (f == FlavourExtproc) {
			s.metrics.refused.Add(context.Background(), 1, metric.WithAttributes(attribute.String("role", string(f))))
			return n, status.Errorf(codes.PermissionDenied, "xds: %s clients are not served %s", f, typeURL)
		}
		rolesMu.Lock()
		defer rolesMu.Unlock()
		switch {
		case n != nil:
			nodes[id] = withFlavour(n, f)
		case nodes[id] == nil:
			nodes[id] = withFlavour(&corev3.Node{}, f)
		}
		return nodes[id], nil
	}
	closed := func(id int64) {
		c.mu.Lock()
		delete(c.streams, id)
		c.mu.Unlock()
		rolesMu.Lock()
		delete(roles, id)
		delete(nodes, id)
		rolesMu.Unlock()
	}
	nack := func(id int64, n *corev3.Node, typeURL, nonce, msg string) {
		c.mu.Lock()
		f := c.streams[id]
		c.mu.Unlock()
		s.metrics.nacks.Add(context.Background(), 1, metric.WithAttributes(
			attribute.String("flavour", string(f)), attribute.String("type", typeURL)))
		s.log.Warn().Int64("stream", id).Str("node", n.GetId()).Str("flavour", string(f)).
			Str("type", typeURL).Str("nonce", nonce).Str("error", msg).Msg("client rejected config (NACK)")
	}
	push := func(id int64, typeURL string) {
		c.mu.Lock()
		f := c.streams[id]
		c.mu.Unlock()
		s.metrics.pushes.Add(context.Background(), 1, metric.WithAttributes(
			attribute.String("flavour", string(f)), attribute.String("type", typeURL)))
	}
	return serverv3.CallbackFuncs{
		StreamOpenFunc:      func(ctx context.Context, id int64, _ string) error { return opened(ctx, id) },
		DeltaStreamOpenFunc: func(ctx context.Context, id int64, _ string) error { return opened(ctx, -id) },
		StreamClosedFunc:    func(id int64, _ *corev3.Node) { closed(id) },
		StreamRequestFunc: func(id int64, r *discoveryv3.DiscoveryRequest) error {
			// go-control-plane has filled in the stream's node when the request omits it.
			n, err := admit(id, r.GetNode(), r.GetTypeUrl())
			if err != nil {
				return err
			}
			r.Node = n
			if r.GetErrorDetail() != nil {
				nack(id, n, r.GetTypeUrl(), r.GetResponseNonce(), r.GetErrorDetail().GetMessage())
			}
			return nil
		},
		StreamResponseFunc: func(_ context.Context, id int64, _ *discoveryv3.DiscoveryRequest, r *discoveryv3.DiscoveryResponse) {
			if r.GetTypeUrl() != policyv1.TypeURL {
				r.VersionInfo = s.labelVersion(r.GetVersionInfo())
			}
			push(id, r.GetTypeUrl())
		},
		// Delta streams are numbered apart from SotW ones: keep them apart in the map.
		DeltaStreamClosedFunc: func(id int64, _ *corev3.Node) { closed(-id) },
		StreamDeltaRequestFunc: func(id int64, r *discoveryv3.DeltaDiscoveryRequest) error {
			// Here go-control-plane fills in the node after this callback, from the last
			// request that had one: admit gives every request its marked node, so a
			// node-less first request cannot leave the stream with a blank (unmarked) one.
			n, err := admit(-id, r.GetNode(), r.GetTypeUrl())
			if err != nil {
				return err
			}
			r.Node = n
			if r.GetErrorDetail() != nil {
				nack(-id, n, r.GetTypeUrl(), r.GetResponseNonce(), r.GetErrorDetail().GetMessage())
			}
			return nil
		},
		StreamDeltaResponseFunc: func(id int64, _ *discoveryv3.DeltaDiscoveryRequest, r *discoveryv3.DeltaDiscoveryResponse) {
			if r.GetTypeUrl() != policyv1.TypeURL {
				r.SystemVersionInfo = s.labelVersion(r.GetSystemVersionInfo())
			}
			push(-id, r.GetTypeUrl())
		},
		// The unary REST-style fetch is not served (GRPCServer registers ADS only); should
		// anything route a fetch here, it is refused rather than served unadmitted.
		FetchRequestFunc: func(context.Context, *discoveryv3.DiscoveryRequest) error {
			return status.Error(codes.Unimplemented, "xds: fetch is not served; use ADS")
		},
	}
}
