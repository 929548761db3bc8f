package modelhost

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	shadowv1 "github.com/patchbay-io/patchbay/api/shadow/v1"
	"github.com/patchbay-io/patchbay/internal/tlsfiles"
	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

const (
	// DefaultShadowSample is the share of requests (by request id) whose predictions are
	// sent to the control plane's shadow comparison.
	DefaultShadowSample = 0.1
	// DefaultShadowQueue bounds the records waiting for the stream; more are dropped.
	DefaultShadowQueue = 1024
	// shadowValues is how many values of each output a record carries.
	shadowValues = 16
)

// shadowSender samples predictions by request id and streams them to the control plane
// (patchbay.shadow.v1.Records/Send) through a bounded queue: when the stream is slow or
// down, records are dropped and counted, never waited for.
type shadowSender struct {
	s         *Server
	addr      string
	threshold uint64 // a request is sampled when mix(hash(id)) < threshold
	all       bool   // sample == 1
	queue     chan *shadowv1.Record
	creds     credentials.TransportCredentials
}

func newShadowSender(s *Server) (*shadowSender, error) {
	cfg := s.cfg
	if cfg.ShadowSample < 0 || cfg.ShadowSample > 1 || math.IsNaN(cfg.ShadowSample) {
		return nil, fmt.Errorf("shadow sample %v: want a share between 0 and 1", cfg.ShadowSample)
	}
	sample := cfg.ShadowSample
	if sample == 0 {
		sample = DefaultShadowSample
	}
	q := cfg.ShadowQueue
	if q <= 0 {
		q = DefaultShadowQueue
	}
	sh := &shadowSender{s: s, addr: cfg.ShadowRecords, queue: make(chan *shadowv1.Record, q), all: sample >= 1,
		threshold: uint64(sample * (1 << 63) * 2), creds: insecure.NewCredentials()}
	if cfg.TLS != nil {
		// The host's certificate is its client certificate; its CA (--client-ca) verifies
		// the control plane.
		sh.creds = credentials.NewTLS(cfg.TLS.ClientConfig(tlsfiles.ServerNameOf(cfg.ShadowRecords)))
	}
	return sh, nil
}

// sampled decides by the request id alone, so the primary's host and the shadow's host
// pick the same requests: FNV-1a, then a 64-bit finaliser (splitmix64) to spread short ids.
func (sh *shadowSender) sampled(id string) bool {
	if sh.all {
		return true
	}
	h := uint64(14695981039346656037)
	for i := 0; i < len(id); i++ {
		h ^= uint64(id[i])
		h *= 1099511628211
	}
	h ^= h >> 30
	h *= 0xbf58476d1ce4e5b9
	h ^= h >> 27
	h *= 0x94d049bb133111eb
	h ^= h >> 31
	return h < sh.threshold
}

// offer queues a record of a successful inference when its request is sampled; a full
// queue drops it (counted). Requests without an id cannot be paired and are not sent.
func (sh *shadowSender) offer(v *version, id string, tr traffic, outs []*tensor.Tensor, start time.Time) {
	if id == "" || len(id) > 256 || !sh.sampled(id) {
		return
	}
	now := time.Now()
	rec := &shadowv1.Record{RequestId: id, Model: v.spec.Model, Version: v.spec.Version, Traffic: shadowv1.Traffic_TRAFFIC_LIVE,
		LatencySeconds: now.Sub(start).Seconds(), UnixNanos: now.UnixNano(), Outputs: make([]*shadowv1.Output, 0, len(outs))}
	if tr == shadow {
		rec.Traffic = shadowv1.Traffic_TRAFFIC_SHADOW
	}
	for _, o := range outs {
		rec.Outputs = append(rec.Outputs, recordOutput(o))
	}
	select {
	case sh.queue <- rec:
	default:
		sh.s.inst.shadowDropped.Add(context.Background(), 1)
	}
}

// recordOutput keeps the first values of a tensor and, for a class output, its class: the
// value of an integer output (a label), or the argmax of the first row of a rank >= 2
// output whose last dimension is above 1 (per-class scores). A one-score-per-row output
// has no class; the comparison uses its values.
func recordOutput(t *tensor.Tensor) *shadowv1.Output {
	o := &shadowv1.Output{Name: t.Name}
	// One switch picks the slice: its length and the reader of its values.
	var n int
	var at func(i int) float64
	switch {
	case t.F32 != nil:
		n, at = len(t.F32), func(i int) float64 { return float64(t.F32[i]) }
	case t.F64 != nil:
		n, at = len(t.F64), func(i int) float64 { return t.F64[i] }
	case t.F16 != nil:
		n, at = len(t.F16), func(i int) float64 { return tensor.F16ToFloat64(t.F16[i]) }
	case t.I64 != nil:
		n, at = len(t.I64), func(i int) float64 { return float64(t.I64[i]) }
	case t.U64 != nil:
		n, at = len(t.U64), func(i int) float64 { return float64(t.U64[i]) }
	default:
		return o
	}
	o.Values = make([]float64, min(n, shadowValues))
	for i := range o.Values {
		o.Values[i] = at(i)
	}
	switch {
	case n == 0:
	case t.I64 != nil || t.U64 != nil:
		o.HasClass, o.ClassIndex = true, int64(at(0))
	case len(t.Shape) >= 2 && t.Shape[len(t.Shape)-1] > 1:
		row := int(t.Shape[len(t.Shape)-1])
		best := 0
		for i := 1; i < row && i < n; i++ {
			if at(i) > at(best) || math.IsNaN(at(best)) {
				best = i
			}
		}
		o.HasClass, o.ClassIndex = true, int64(best)
	}
	return o
}

// run streams queued records until ctx ends, reopening the stream (with backoff) after a
// failure; at the end it flushes what is queued for at most a second.
func (sh *shadowSender) run(ctx context.Context) {
	log := sh.s.log.With().Str("shadow_records", sh.addr).Logger()
	conn, err := grpc.NewClient(sh.addr, grpc.WithTransportCredentials(sh.creds))
	if err != nil {
		log.Error().Err(err).Msg("shadow records: no client; records are dropped")
		sh.drain(ctx)
		return
	}
	defer conn.Close()
	client := shadowv1.NewRecordsClient(conn)
	const minBackoff, maxBackoff = 100 * time.Millisecond, 5 * time.Second
	backoff := minBackoff
	for ctx.Err() == nil {
		err := sh.stream(ctx, client, &backoff, minBackoff)
		if err == nil {
			return
		}
		if backoff == minBackoff { // once per outage: backoff grows until a record goes through
			log.Warn().Err(err).Msg("shadow records stream failed; reconnecting (records are dropped while the queue is full)")
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
		case <-t.C:
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// stream runs one Send stream; nil means ctx ended (and the queue was flushed).
func (sh *shadowSender) stream(ctx context.Context, client shadowv1.RecordsClient, backoff *time.Duration, minBackoff time.Duration) error {
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	st, err := client.Send(sctx)
	if err != nil {
		return err
	}
	for {
		select {
		case <-ctx.Done():
			stop := time.AfterFunc(time.Second, cancel)
			defer stop.Stop()
			for flushing := true; flushing; {
				select {
				case r := <-sh.queue:
					if st.Send(r) != nil {
						return nil
					}
					sh.s.inst.shadowSent.Add(context.Background(), 1)
				default:
					flushing = false
				}
			}
			_, _ = st.CloseAndRecv()
			return nil
		case r := <-sh.queue:
			if err := st.Send(r); err != nil {
				sh.s.inst.shadowDropped.Add(context.Background(), 1)
				if _, rerr := st.CloseAndRecv(); rerr != nil {
					err = rerr
				}
				if errors.Is(err, context.Canceled) && ctx.Err() != nil {
					return nil
				}
				return err
			}
			sh.s.inst.shadowSent.Add(context.Background(), 1)
			*backoff = minBackoff
		}
	}
}

// drain drops records until ctx ends (no client could be made).
func (sh *shadowSender) drain(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-sh.queue:
			sh.s.inst.shadowDropped.Add(context.Background(), 1)
		}
	}
}
