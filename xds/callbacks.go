package xds

import (
	"context"
	"sync"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

type metrics struct {
	pushes       metric.Int64Counter
	nacks        metric.Int64Counter
	rejected     metric.Int64Counter
	applies      metric.Int64Counter
	rollbacks    metric.Int64Counter
	applySeconds metric.Float64Histogram
	clients      *clientCounts
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
	out.applies, err = m.Int64Counter("patchbay_xds_config_applies", metric.WithDescription("configs applied"))
	all = append(all, err)
	out.rollbacks, err = m.Int64Counter("patchbay_xds_rollbacks", metric.WithDescription("rollbacks through the admin API"))
	all = append(all, err)
	out.applySeconds, err = m.Float64Histogram("patchbay_xds_apply_seconds", metric.WithDescription("time to translate, validate and set a config"), metric.WithUnit("s"))
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

// callbacks count clients, pushes and NACKs, and log NACKs once each.
func (s *Server) callbacks() serverv3.Callbacks {
	c := s.metrics.clients
	seen := func(id int64, n *corev3.Node) Flavour {
		c.mu.Lock()
		defer c.mu.Unlock()
		f, ok := c.streams[id]
		if !ok && n != nil {
			f = FlavourOf(n)
			c.streams[id] = f
		}
		return f
	}
	closed := func(id int64) {
		c.mu.Lock()
		delete(c.streams, id)
		c.mu.Unlock()
	}
	nack := func(id int64, n *corev3.Node, typeURL, nonce, msg string) {
		f := seen(id, n)
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
		StreamClosedFunc: func(id int64, _ *corev3.Node) { closed(id) },
		StreamRequestFunc: func(id int64, r *discoveryv3.DiscoveryRequest) error {
			seen(id, r.GetNode())
			if r.GetErrorDetail() != nil {
				nack(id, r.GetNode(), r.GetTypeUrl(), r.GetResponseNonce(), r.GetErrorDetail().GetMessage())
			}
			return nil
		},
		StreamResponseFunc: func(_ context.Context, id int64, _ *discoveryv3.DiscoveryRequest, r *discoveryv3.DiscoveryResponse) {
			push(id, r.GetTypeUrl())
		},
		// Delta streams are numbered apart from SotW ones: keep them apart in the map.
		DeltaStreamClosedFunc: func(id int64, _ *corev3.Node) { closed(-id) },
		StreamDeltaRequestFunc: func(id int64, r *discoveryv3.DeltaDiscoveryRequest) error {
			seen(-id, r.GetNode())
			if r.GetErrorDetail() != nil {
				nack(-id, r.GetNode(), r.GetTypeUrl(), r.GetResponseNonce(), r.GetErrorDetail().GetMessage())
			}
			return nil
		},
		StreamDeltaResponseFunc: func(id int64, _ *discoveryv3.DeltaDiscoveryRequest, r *discoveryv3.DeltaDiscoveryResponse) {
			push(-id, r.GetTypeUrl())
		},
	}
}
