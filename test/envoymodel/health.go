package envoymodel

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// Active health checking and host selection, as Envoy does them:
//
//   - A cluster with health_checks starts every host as failed (FAILED_ACTIVE_HC) and checks it
//     at once; the first success makes it healthy, later it takes healthy_threshold successes.
//     A failed answer (HTTP status outside expected_statuses — 200 by default — or a gRPC
//     health answer other than SERVING, or a non-OK gRPC status) makes it unhealthy at once;
//     a network failure or timeout only after unhealthy_threshold in a row (envoy
//     source/common/upstream/health_checker_impl.cc and health_checker_base_impl.cc,
//     ActiveHealthCheckSession::handleSuccess / setUnhealthy).
//   - The next check runs after interval (unhealthy_interval when unhealthy and set), or
//     no_traffic_interval (default 60 s) while the cluster has carried no request.
//   - An HTTP check is GET path on the cluster's upstream protocol with Host = the cluster
//     name unless host is set (source/extensions/health_checkers/http/health_checker_impl.cc).
//     A gRPC check calls grpc.health.v1.Health/Check with service_name over HTTP/2, and a
//     gRPC check on a cluster without HTTP/2 is a config error: Envoy rejects the cluster
//     ("cluster must support HTTP/2 for gRPC healthchecking",
//     source/common/upstream/health_checker_impl.cc, HealthCheckerFactory::create); the model
//     records it and fails requests to that cluster.
//   - The load balancer uses healthy hosts only, unless the healthy share is below the panic
//     threshold (common_lb_config.healthy_panic_threshold, default 50%; 0 disables panic):
//     then it balances over all hosts, unhealthy ones included (source/common/upstream/
//     load_balancer_impl.cc, LoadBalancerBase::isHostSetInPanic). With panic disabled and no
//     healthy host, the router answers 503 "no healthy upstream" (source/common/router/
//     router.cc, Filter::sendNoHealthyUpstreamResponse). Weighted clusters are picked by
//     weight alone: a cluster whose hosts are all unhealthy keeps its share of the split
//     (source/common/router/config_impl.cc, RouteEntryImplBase::pickWeightedCluster).

// healthState is the health of every host of every health-checked cluster.
type healthState struct {
	mu       sync.Mutex
	clusters map[string]*clusterHealth
}

type clusterHealth struct {
	hc     *corev3.HealthCheck
	used   atomic.Bool // the cluster has carried a request (no_traffic_interval until then)
	hosts  map[string]*hostHealth
	cfgErr error // the cluster was rejected
}

type hostHealth struct {
	healthy atomic.Bool
	cancel  context.CancelFunc
}

// HostHealthy reports whether the model's health checking holds the host healthy (true
// for a cluster without health checks).
func (p *Proxy) HostHealthy(cluster, addr string) bool {
	p.health.mu.Lock()
	defer p.health.mu.Unlock()
	ch := p.health.clusters[cluster]
	if ch == nil {
		return true
	}
	h := ch.hosts[addr]
	return h != nil && h.healthy.Load()
}

// ClusterError is the reason the model rejected a cluster, as Envoy would, or nil.
func (p *Proxy) ClusterError(cluster string) error {
	p.health.mu.Lock()
	defer p.health.mu.Unlock()
	if ch := p.health.clusters[cluster]; ch != nil {
		return ch.cfgErr
	}
	return nil
}

// clusterHTTP2 reports whether the cluster's upstream protocol is HTTP/2.
func clusterHTTP2(c *clusterv3.Cluster) (bool, error) {
	h2 := c.GetHttp2ProtocolOptions() != nil
	if a, ok := c.GetTypedExtensionProtocolOptions()[httpOptionsKey]; ok {
		opts := &upstreamhttpv3.HttpProtocolOptions{}
		if err := a.UnmarshalTo(opts); err != nil {
			return false, err
		}
		h2 = h2 || opts.GetExplicitHttpConfig().GetHttp2ProtocolOptions() != nil
	}
	return h2, nil
}

// syncHealth starts and stops health checkers to match the clusters and endpoints of s.
func (p *Proxy) syncHealth(ctx context.Context, s *state) {
	p.health.mu.Lock()
	defer p.health.mu.Unlock()
	if p.health.clusters == nil {
		p.health.clusters = map[string]*clusterHealth{}
	}
	for name, ch := range p.health.clusters {
		c := s.clusters[name]
		if c == nil || len(c.GetHealthChecks()) == 0 || !proto.Equal(c.GetHealthChecks()[0], ch.hc) {
			for _, h := range ch.hosts {
				h.cancel()
			}
			delete(p.health.clusters, name)
		}
	}
	for name, c := range s.clusters {
		if len(c.GetHealthChecks()) == 0 {
			continue
		}
		ch := p.health.clusters[name]
		if ch == nil {
			ch = &clusterHealth{hc: c.GetHealthChecks()[0], hosts: map[string]*hostHealth{}}
			p.health.clusters[name] = ch
			ch.cfgErr = checkHealthConfig(c)
		}
		if ch.cfgErr != nil {
			continue
		}
		want := map[string]bool{}
		for _, addr := range clusterAddrs(s, name) {
			want[addr] = true
			if ch.hosts[addr] == nil {
				hctx, cancel := context.WithCancel(ctx)
				h := &hostHealth{cancel: cancel} // starts failed, as FAILED_ACTIVE_HC
				ch.hosts[addr] = h
				go p.checkLoop(hctx, c, ch, h, addr)
			}
		}
		for addr, h := range ch.hosts {
			if !want[addr] {
				h.cancel()
				delete(ch.hosts, addr)
			}
		}
	}
}

// checkHealthConfig refuses what Envoy refuses and what the model does not model.
func checkHealthConfig(c *clusterv3.Cluster) error {
	if len(c.GetHealthChecks()) > 1 {
		return fmt.Errorf("cluster %q: more than one health check is not modelled", c.GetName())
	}
	hc := c.GetHealthChecks()[0]
	switch {
	case hc.GetGrpcHealthCheck() != nil:
		h2, err := clusterHTTP2(c)
		if err != nil {
			return err
		}
		if !h2 {
			return fmt.Errorf("%s cluster must support HTTP/2 for gRPC healthchecking", c.GetName())
		}
	case hc.GetHttpHealthCheck() != nil:
		hh := hc.GetHttpHealthCheck()
		if hh.GetCodecClientType() != 0 && hh.GetCodecClientType() != typev3.CodecClientType_HTTP1 {
			return fmt.Errorf("cluster %q: http health check codec %v is not modelled", c.GetName(), hh.GetCodecClientType())
		}
		if len(hh.GetRequestHeadersToAdd()) > 0 || hh.GetSend() != nil || len(hh.GetReceive()) > 0 {
			return fmt.Errorf("cluster %q: http health check options beyond path, host and expected_statuses are not modelled", c.GetName())
		}
	default:
		return fmt.Errorf("cluster %q: health checker %T is not modelled", c.GetName(), hc.GetHealthChecker())
	}
	if hc.GetInterval() == nil || hc.GetTimeout() == nil || hc.GetUnhealthyThreshold() == nil || hc.GetHealthyThreshold() == nil {
		return fmt.Errorf("cluster %q: health check needs interval, timeout and both thresholds (Envoy's validation)", c.GetName())
	}
	return nil
}

// clusterAddrs lists the cluster's endpoint addresses (host:port).
func clusterAddrs(s *state, cluster string) []string {
	var addrs []string
	for _, le := range s.endpoints[cluster].GetEndpoints() {
		for _, lb := range le.GetLbEndpoints() {
			sa := lb.GetEndpoint().GetAddress().GetSocketAddress()
			addrs = append(addrs, net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue()))))
		}
	}
	return addrs
}

type checkResult int

const (
	checkOK checkResult = iota
	checkActiveFail
	checkNetworkFail
)

func (p *Proxy) checkLoop(ctx context.Context, c *clusterv3.Cluster, ch *clusterHealth, h *hostHealth, addr string) {
	hc := ch.hc
	first := true
	var okRun, failRun uint32
	for {
		r := p.checkOnce(ctx, c, hc, addr)
		if ctx.Err() != nil {
			return
		}
		switch r {
		case checkOK:
			failRun = 0
			okRun++
			if !h.healthy.Load() && (first || okRun >= hc.GetHealthyThreshold().GetValue()) {
				h.healthy.Store(true)
			}
		default:
			okRun = 0
			if h.healthy.Load() {
				failRun++
				if r == checkActiveFail || failRun >= hc.GetUnhealthyThreshold().GetValue() {
					h.healthy.Store(false)
					failRun = 0
				}
			}
		}
		first = false
		next := hc.GetInterval().AsDuration()
		if !h.healthy.Load() && hc.GetUnhealthyInterval() != nil {
			next = hc.GetUnhealthyInterval().AsDuration()
		}
		if !ch.used.Load() {
			next = 60 * time.Second
			if hc.GetNoTrafficInterval() != nil {
				next = hc.GetNoTrafficInterval().AsDuration()
			}
		}
		t := time.NewTimer(next)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

func (p *Proxy) checkOnce(ctx context.Context, c *clusterv3.Cluster, hc *corev3.HealthCheck, addr string) checkResult {
	ctx, cancel := context.WithTimeout(ctx, hc.GetTimeout().AsDuration())
	defer cancel()
	if g := hc.GetGrpcHealthCheck(); g != nil {
		creds := insecure.NewCredentials()
		if c.GetTransportSocket() != nil {
			cfg, err := p.upstreamTLSConfig(c)
			if err != nil {
				return checkNetworkFail
			}
			creds = credentials.NewTLS(cfg)
		}
		authority := g.GetAuthority()
		if authority == "" {
			authority = c.GetName()
		}
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds), grpc.WithAuthority(authority))
		if err != nil {
			return checkNetworkFail
		}
		defer conn.Close()
		resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: g.GetServiceName()})
		switch {
		case err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING:
			return checkOK
		case err == nil:
			return checkActiveFail
		case status.Code(err) == codes.Unavailable || status.Code(err) == codes.DeadlineExceeded || ctx.Err() != nil:
			// Connection refused or reset, or the timeout: Envoy's NETWORK failure.
			return checkNetworkFail
		default:
			return checkActiveFail // a gRPC status other than OK (NOT_FOUND for an unknown service, UNIMPLEMENTED)
		}
	}
	hh := hc.GetHttpHealthCheck()
	// The HTTP checker speaks codec_client_type (HTTP/1.1 by default), whatever the
	// cluster's upstream protocol, over the cluster's transport socket.
	client, scheme := p.client, "http://"
	if c.GetTransportSocket() != nil {
		cfg, err := p.upstreamTLSConfig(c)
		if err != nil {
			return checkNetworkFail
		}
		cfg.NextProtos = []string{"http/1.1"}
		ps := new(http.Protocols)
		ps.SetHTTP1(true)
		client, scheme = &http.Client{Transport: &http.Transport{TLSClientConfig: cfg, Protocols: ps, DisableKeepAlives: true}}, "https://"
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, scheme+addr+hh.GetPath(), nil)
	if err != nil {
		return checkActiveFail
	}
	req.Host = c.GetName()
	if hh.GetHost() != "" {
		req.Host = hh.GetHost()
	}
	req.Header.Set("User-Agent", "Envoy/HC")
	resp, err := client.Do(req)
	if err != nil {
		return checkNetworkFail
	}
	resp.Body.Close()
	if len(hh.GetExpectedStatuses()) == 0 {
		if resp.StatusCode == http.StatusOK {
			return checkOK
		}
		return checkActiveFail
	}
	for _, r := range hh.GetExpectedStatuses() {
		if int64(resp.StatusCode) >= r.GetStart() && int64(resp.StatusCode) < r.GetEnd() {
			return checkOK
		}
	}
	return checkActiveFail
}

// pickHost is the cluster's load balancer: round robin over the healthy hosts, or over all
// hosts in panic (see the comment at the top of this file). ok is false when no host may
// be used ("no healthy upstream").
func (p *Proxy) pickHost(c *clusterv3.Cluster, addrs []string) (string, error) {
	if len(addrs) == 0 {
		return "", errNoHealthyUpstream
	}
	p.health.mu.Lock()
	ch := p.health.clusters[c.GetName()]
	var healthy []string
	if ch != nil {
		if ch.cfgErr != nil {
			p.health.mu.Unlock()
			return "", ch.cfgErr
		}
		ch.used.Store(true)
		for _, a := range addrs {
			if h := ch.hosts[a]; h != nil && h.healthy.Load() {
				healthy = append(healthy, a)
			}
		}
	} else {
		healthy = addrs
	}
	p.health.mu.Unlock()
	threshold := 50.0
	if t := c.GetCommonLbConfig().GetHealthyPanicThreshold(); t != nil {
		threshold = t.GetValue()
	}
	use := healthy
	if float64(len(healthy))*100/float64(len(addrs)) < threshold {
		if c.GetCommonLbConfig().GetZoneAwareLbConfig().GetFailTrafficOnPanic() {
			return "", errNoHealthyUpstream
		}
		use = addrs // panic: every host, healthy or not
	}
	if len(use) == 0 {
		return "", errNoHealthyUpstream
	}
	return use[p.rr.Add(1)%uint64(len(use))], nil
}

var errNoHealthyUpstream = fmt.Errorf("no healthy upstream")
