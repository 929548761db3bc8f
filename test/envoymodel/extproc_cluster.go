package envoymodel

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// ErrNoHealthyUpstream is how the model fails an ext_proc stream when the ext_proc
// cluster has no usable host: Envoy's router answers the async client's stream "503 no
// healthy upstream" at once (source/common/router/router.cc, Filter::decodeHeaders), the
// gRPC async client closes it as UNAVAILABLE (source/common/grpc/async_client_impl.cc),
// and ext_proc's onRemoteClose → Filter::onGrpcError fails open under failure_mode_allow
// (source/extensions/filters/http/ext_proc/client_impl.cc, ext_proc.cc).
var ErrNoHealthyUpstream = status.Error(codes.Unavailable, "no healthy upstream")

// extprocHost models one patchbay_extproc host as Envoy's cluster manager sees it when the
// bootstrap's cluster (Config.ExtprocCluster) carries an active gRPC health check, outlier
// detection and a panic threshold. Nil (no cluster given): every call goes to the host,
// as before. One host only: the bootstraps name one address (a Service).
type extprocHost struct {
	cluster   *clusterv3.Cluster
	hc        *corev3.HealthCheck // the gRPC health check, or nil
	panicZero bool                // healthy_panic_threshold is 0: no panic routing

	// Active health checking (source/extensions/health_checkers/grpc/health_checker_impl.cc
	// and source/common/upstream/health_checker_impl.cc): the host starts failed until a
	// check passes; NOT_SERVING fails it at once; timeouts and connection errors fail it
	// after unhealthy_threshold in a row; healthy_threshold passes bring it back.
	activeOK atomic.Bool

	// Outlier detection (source/common/upstream/outlier_detection_impl.cc): with
	// split_external_local_origin_errors, consecutive local-origin failures (connect
	// refused/timed out, reset) past consecutive_local_origin_failure eject the host for
	// base_ejection_time × times ejected (capped by max_ejection_time, default 300 s) when
	// enforcing; without the split they count as consecutive 5xx/gateway failures.
	mu           sync.Mutex
	consecLocal  uint32
	ejections    int64
	ejectedUntil time.Time

	skipped atomic.Int64 // streams failed at once for want of a healthy host
}

// newExtprocHost reads c (nil: no model) and starts the health checker on its own
// connection to addr, until ctx ends.
func newExtprocHost(ctx context.Context, c *clusterv3.Cluster, addr string) (*extprocHost, error) {
	if c == nil {
		return nil, nil
	}
	h := &extprocHost{cluster: c}
	// Envoy's default panic threshold is 50 % (common_lb_config unset); only an explicit 0
	// turns panic routing off (LoadBalancerBase::isHostSetInPanic).
	if p := c.GetCommonLbConfig().GetHealthyPanicThreshold(); p != nil && p.GetValue() == 0 {
		h.panicZero = true
	}
	for _, hc := range c.GetHealthChecks() {
		if hc.GetGrpcHealthCheck() != nil {
			h.hc = hc
		}
	}
	if h.hc == nil {
		h.activeOK.Store(true) // no active checking: the host is healthy as far as HC goes
		return h, nil
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	go h.healthLoop(ctx, conn)
	return h, nil
}

func (h *extprocHost) healthLoop(ctx context.Context, conn *grpc.ClientConn) {
	defer conn.Close()
	hc := h.hc
	interval := hc.GetInterval().AsDuration()
	if nt := hc.GetNoTrafficInterval(); nt != nil && nt.AsDuration() < interval {
		interval = nt.AsDuration() // the model is busy from the start; use the shorter one
	} else if nt == nil && interval > 60*time.Second {
		interval = 60 * time.Second
	}
	timeout := hc.GetTimeout().AsDuration()
	unhealthyAfter, healthyAfter := max(hc.GetUnhealthyThreshold().GetValue(), 1), max(hc.GetHealthyThreshold().GetValue(), 1)
	client := healthpb.NewHealthClient(conn)
	var fails, passes uint32
	for {
		cctx, cancel := context.WithTimeout(ctx, timeout)
		resp, err := client.Check(cctx, &healthpb.HealthCheckRequest{Service: hc.GetGrpcHealthCheck().GetServiceName()}, grpc.WaitForReady(true))
		cancel()
		if ctx.Err() != nil {
			return
		}
		switch {
		case err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING:
			fails, passes = 0, passes+1
			if passes >= healthyAfter {
				h.activeOK.Store(true)
			}
		case err == nil: // NOT_SERVING and the like: unhealthy at once
			fails, passes = fails+1, 0
			h.activeOK.Store(false)
		default: // timeout, refused, reset: counts toward the threshold
			fails, passes = fails+1, 0
			if fails >= unhealthyAfter {
				h.activeOK.Store(false)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(interval):
		}
	}
}

// usable reports whether the load balancer would pick the host: healthy by active
// checks and not ejected, or any host when panic routing is on (one host unhealthy is
// 0 % healthy, below any non-zero threshold).
func (h *extprocHost) usable(now time.Time) bool {
	if h == nil || !h.panicZero {
		return true
	}
	h.mu.Lock()
	ejected := now.Before(h.ejectedUntil)
	h.mu.Unlock()
	return h.activeOK.Load() && !ejected
}

// observe feeds one stream's outcome to outlier detection. Only local-origin failures
// reach it here: the ext_proc filter's own message_timeout resets the stream from the
// downstream side, which Envoy does not count against the host.
func (h *extprocHost) observe(err error, now time.Time) {
	if h == nil || h.cluster.GetOutlierDetection() == nil {
		return
	}
	od := h.cluster.GetOutlierDetection()
	local := err != nil && !errors.Is(err, context.DeadlineExceeded) && status.Code(err) == codes.Unavailable
	h.mu.Lock()
	defer h.mu.Unlock()
	if !local {
		if err == nil {
			h.consecLocal = 0
		}
		return
	}
	h.consecLocal++
	threshold, enforcing := od.GetConsecutiveLocalOriginFailure().GetValue(), od.GetEnforcingConsecutiveLocalOriginFailure()
	if !od.GetSplitExternalLocalOriginErrors() {
		// Unsplit, a connect failure is a 5xx/gateway failure (consecutive_5xx default 5,
		// enforcing 100; consecutive_gateway_failure enforcing default 0).
		threshold, enforcing = od.GetConsecutive_5Xx().GetValue(), od.GetEnforcingConsecutive_5Xx()
		if threshold == 0 {
			threshold = 5
		}
	} else if threshold == 0 {
		threshold = 5
	}
	if enforcing != nil && enforcing.GetValue() == 0 || h.consecLocal < threshold || now.Before(h.ejectedUntil) {
		return
	}
	base := od.GetBaseEjectionTime().AsDuration()
	if base == 0 {
		base = 30 * time.Second
	}
	maxEj := od.GetMaxEjectionTime().AsDuration()
	if maxEj == 0 {
		maxEj = 300 * time.Second
	}
	h.ejections++
	h.ejectedUntil = now.Add(min(base*time.Duration(h.ejections), maxEj))
	h.consecLocal = 0
}

// ExtprocSkipped counts ext_proc streams failed at once because the ext_proc cluster had
// no usable host (the requests went on, failing open, without waiting).
func (p *Proxy) ExtprocSkipped() int64 {
	if p.epHost == nil {
		return 0
	}
	return p.epHost.skipped.Load()
}

// ExtprocUsable reports whether the ext_proc cluster's host would be picked now.
func (p *Proxy) ExtprocUsable() bool { return p.epHost.usable(time.Now()) }

// extprocCall is callExtproc behind the ext_proc cluster's host selection: with no
// usable host the stream fails at once, and local-origin failures feed outlier detection.
func (p *Proxy) extprocCall(ctx context.Context, cfg *extprocfilterv3.ExternalProcessor, req *http.Request, h http.Header, body *[]byte) (*extprocv3.ImmediateResponse, error) {
	if !p.epHost.usable(time.Now()) {
		p.epHost.skipped.Add(1)
		return nil, ErrNoHealthyUpstream
	}
	imm, err := p.callExtproc(ctx, cfg, req, h, body)
	p.epHost.observe(err, time.Now())
	return imm, err
}
