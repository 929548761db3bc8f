package fanout

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"

	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
	"github.com/patchbay-io/patchbay/test/bench/xdsscale"
)

// liteWatcher is a reconnecting proxyless or ext_proc client for the restart benchmark:
// SotW, one type, ACKing; it counts streams, responses, and responses that held no
// resource (an empty config) — of which there must be none.
type liteWatcher struct {
	streams, responses, empty atomic.Int64
	lastStream                atomic.Int64 // stream number of the last response
}

func (w *liteWatcher) run(ctx context.Context, cc *grpc.ClientConn, i int, k Kind, model string) {
	typ, names := resource.ListenerType, []string{model}
	if k == Extproc {
		typ, names = policyv1.TypeURL, []string{policyv1.ResourceName}
	}
	for ctx.Err() == nil {
		s, err := cc.NewStream(ctx, sotwDesc, sotwMethod, grpc.WaitForReady(true))
		if err != nil {
			time.Sleep(50 * time.Millisecond)
			continue
		}
		n := w.streams.Add(1)
		var req proto.Message = &discoveryv3.DiscoveryRequest{Node: k.node(i), TypeUrl: typ, ResourceNames: names}
		for s.SendMsg(req) == nil {
			var r lite
			if s.RecvMsg(&r) != nil {
				break
			}
			w.responses.Add(1)
			if r.resources == 0 {
				w.empty.Add(1)
			}
			w.lastStream.Store(n)
			req = &discoveryv3.DiscoveryRequest{TypeUrl: typ, ResourceNames: names, VersionInfo: r.version, ResponseNonce: r.nonce}
		}
	}
}

// BenchmarkRestart: N clients (PATCHBAY_RESTART_CLIENTS, default 1,000: a quarter each
// Envoy-like delta and SotW clients holding the whole edge config — xdsscale.Envoy —,
// proxyless on model 0's listener, ext_proc on the policy) connected to the shipped
// control plane with PATCHBAY_RESTART_MODELS (default 20) models; the process is killed
// (SIGKILL) and started again on the same ports and rollout directory. Reports the time
// from the kill until each client holds a complete config on a new stream (p50, p99, max)
// and from the restarted process's /readyz; fails if any client saw an empty or partial
// config: a delta removal, a SotW LDS, CDS or SRDS response with fewer resources than before, a
// proxyless or ext_proc response without its resource, or a full client whose resources
// after the resync differ in number from before. Clients reconnect with Envoy's ADS
// back-off (500 ms base, jittered) over gRPC's reconnect; that back-off is in the times.
// The same-run baseline is the initial sync (connect → all synced).
func BenchmarkRestart(b *testing.B) {
	raiseFDLimit(b)
	bin := xdsscale.Binary(b)
	models, clients := envInt("PATCHBAY_RESTART_MODELS", 20), envInt("PATCHBAY_RESTART_CLIENTS", 1000)
	for n := 0; n < b.N; n++ {
		dir := b.TempDir()
		xdsscale.WriteModels(b, dir, models, edited)
		p := xdsscale.Start(b, bin, dir, 5*time.Minute, xdsscale.HealthOff)
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
		defer cancel()
		var envoys []*xdsscale.Envoy
		var lites []*liteWatcher
		conns := map[int]*grpc.ClientConn{}
		dial := func(i int) *grpc.ClientConn {
			c := i / 4 // four clients (one of each kind) per TCP connection
			if conns[c] == nil {
				cc, err := grpc.NewClient(p.ADS, grpc.WithTransportCredentials(insecure.NewCredentials()),
					grpc.WithDefaultCallOptions(grpc.ForceCodec(liteCodec{})),
					grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 500 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 30 * time.Second}}))
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { cc.Close() })
				conns[c] = cc
			}
			return conns[c]
		}
		start := time.Now()
		for i := 0; i < clients; i++ {
			switch k := Kind(i % int(kinds)); k {
			case EnvoyDelta, EnvoySotW:
				e, err := xdsscale.DialEnvoy(ctx, p.ADS, fmt.Sprintf("envoy-restart-%d", i), k == EnvoyDelta)
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(e.Close)
				envoys = append(envoys, e)
			default:
				w := &liteWatcher{}
				go w.run(ctx, dial(i), i, k, xdsscale.ModelName(edited))
				lites = append(lites, w)
			}
		}
		// Wait until every client holds its config on stream `stream`; return each one's time.
		waitAll := func(what string, stream int64, since time.Time) []time.Duration {
			var (
				mu  sync.Mutex
				lat []time.Duration
				wg  sync.WaitGroup
				bad atomic.Int64
			)
			for _, e := range envoys {
				wg.Add(1)
				go func() {
					defer wg.Done()
					_, err := e.Wait(ctx, func(s xdsscale.Snapshot) bool { return s.Stats.Streams >= int(stream) && s.Complete() })
					if err != nil {
						bad.Add(1)
						return
					}
					mu.Lock()
					lat = append(lat, time.Since(since))
					mu.Unlock()
				}()
			}
			for _, w := range lites {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for w.lastStream.Load() < stream {
						if ctx.Err() != nil {
							bad.Add(1)
							return
						}
						time.Sleep(2 * time.Millisecond)
					}
					mu.Lock()
					lat = append(lat, time.Since(since))
					mu.Unlock()
				}()
			}
			wg.Wait()
			if bad.Load() > 0 {
				b.Fatalf("%s: %d of %d clients never held a complete config", what, bad.Load(), clients)
			}
			return lat
		}
		initial := waitAll("initial sync", 1, start)
		counts := make([]map[string]int, len(envoys))
		for j, e := range envoys {
			s := e.Snap()
			counts[j] = map[string]int{}
			for t, m := range s.Res {
				counts[j][t] = len(m)
			}
		}
		kill := time.Now()
		p.Kill()
		p.Restart(b, 5*time.Minute)
		ready := time.Now()
		lat := waitAll("resync", 2, kill)
		out := map[string]float64{"models": float64(models), "clients": float64(clients)}
		out["initial-sync-p99-ms"] = ms(pct(initial, 0.99))
		out["resync-p50-ms"] = ms(pct(lat, 0.5))
		out["resync-p99-ms"] = ms(pct(lat, 0.99))
		out["resync-max-ms"] = ms(pct(lat, 1))
		out["restart-ready-ms"] = ms(ready.Sub(kill))
		out["resync-after-ready-max-ms"] = ms(pct(lat, 1) - ready.Sub(kill))
		out["resync-max-x-initial-sync"] = float64(pct(lat, 1)) / float64(max(pct(initial, 1), 1))
		// No client saw an empty or partial config.
		var problems []string
		for j, e := range envoys {
			s := e.Snap()
			if len(s.Stats.Removed) > 0 {
				problems = append(problems, fmt.Sprintf("delta client %d told to remove %v", j, s.Stats.Removed[:min(3, len(s.Stats.Removed))]))
			}
			if len(s.Stats.SotWShort) > 0 {
				problems = append(problems, fmt.Sprintf("SotW client %d: short LDS/CDS/SRDS responses %v", j, s.Stats.SotWShort))
			}
			for t, c := range counts[j] {
				if len(s.Res[t]) != c {
					problems = append(problems, fmt.Sprintf("client %d (delta=%v): %d resources of %s after the resync, %d before", j, e.Delta, len(s.Res[t]), t, c))
				}
			}
		}
		for j, w := range lites {
			if w.empty.Load() > 0 {
				problems = append(problems, fmt.Sprintf("lite client %d: %d empty responses", j, w.empty.Load()))
			}
		}
		out["partial-or-empty"] = float64(len(problems))
		report(b, out)
		if len(problems) > 0 {
			b.Fatalf("%d clients saw an empty or partial config; first: %v", len(problems), problems[:min(5, len(problems))])
		}
	}
}

func report(b *testing.B, out map[string]float64) {
	for k, v := range out {
		b.ReportMetric(v, k)
	}
}
