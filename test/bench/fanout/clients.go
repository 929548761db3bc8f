// Package fanout measures one control plane serving thousands of xDS clients over real
// gRPC ADS streams: the time until every client holds a one-model edit, and the server's
// CPU and memory per connected client.
package fanout

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// Kind is a simulated client: a flavour the control plane recognises (xds/nodes.go
// FlavourOf: user agent "patchbay-extproc" → ext_proc, "gRPC …" → proxyless, anything
// else without the sidecar role → edge Envoy) and what it subscribes to.
type Kind int

const (
	EnvoySotW  Kind = iota // edge Envoy, SotW ADS, RDS of the edited model's route config and a sample (EnvoyRoutes)
	EnvoyDelta             // edge Envoy, delta ADS, the same RDS names
	Proxyless              // grpc-go proxyless, SotW, LDS of its target model (route inline)
	Extproc                // ext_proc, SotW, the policy
	kinds
)

func (k Kind) String() string {
	return [...]string{"envoy-sotw", "envoy-delta", "proxyless", "extproc"}[k]
}

func (k Kind) node(i int) *corev3.Node {
	switch k {
	case Proxyless:
		return &corev3.Node{Id: fmt.Sprintf("proxyless-%d", i), UserAgentName: "gRPC Go", UserAgentVersionType: &corev3.Node_UserAgentVersion{UserAgentVersion: "1.85.0"}}
	case Extproc:
		return &corev3.Node{Id: fmt.Sprintf("extproc-%d", i), UserAgentName: policyv1.ExtprocUserAgent}
	}
	return &corev3.Node{Id: fmt.Sprintf("envoy-%d", i), Cluster: "patchbay-edge", UserAgentName: "envoy"}
}

// lite is what a simulated client keeps of a response: the envelope, not the resources.
// Decoding every 5 MB route table in 1,000 clients would make the load generator, not the
// server, the bottleneck; the bytes still cross the wire and are framed by gRPC.
type lite struct {
	version, nonce string
	resources      int
	bytes          int
}

// liteCodec marshals requests as protobuf and decodes responses into lite, reading only
// top-level fields (DiscoveryResponse and DeltaDiscoveryResponse share the numbers used:
// 1 version_info / system_version_info, 2 resources, 5 nonce).
type liteCodec struct{}

func (liteCodec) Name() string { return "proto" }

func (liteCodec) Marshal(v any) ([]byte, error) { return proto.Marshal(v.(proto.Message)) }

func (liteCodec) Unmarshal(data []byte, v any) error {
	l, ok := v.(*lite)
	if !ok {
		return proto.Unmarshal(data, v.(proto.Message))
	}
	*l = lite{bytes: len(data)}
	for len(data) > 0 {
		num, typ, n := protowire.ConsumeTag(data)
		if n < 0 {
			return protowire.ParseError(n)
		}
		data = data[n:]
		if typ == protowire.BytesType {
			b, m := protowire.ConsumeBytes(data)
			if m < 0 {
				return protowire.ParseError(m)
			}
			switch num {
			case 1:
				l.version = string(b)
			case 2:
				l.resources++
			case 5:
				l.nonce = string(b)
			}
			data = data[m:]
			continue
		}
		m := protowire.ConsumeFieldValue(num, typ, data)
		if m < 0 {
			return protowire.ParseError(m)
		}
		data = data[m:]
	}
	return nil
}

var (
	sotwDesc  = &grpc.StreamDesc{StreamName: "StreamAggregatedResources", ServerStreams: true, ClientStreams: true}
	deltaDesc = &grpc.StreamDesc{StreamName: "DeltaAggregatedResources", ServerStreams: true, ClientStreams: true}
)

const (
	sotwMethod  = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
	deltaMethod = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
)

// Fleet is N simulated clients on conns TCP connections.
type Fleet struct {
	N, Conns int
	models   int
	// Synced counts clients that hold their first response.
	Synced atomic.Int64
	// Updated counts clients that received a response after Mark.
	Updated atomic.Int64
	// Bytes is what every client received, in total.
	Bytes atomic.Int64

	mark   atomic.Int64 // UnixNano of the edit; 0 before
	mu     sync.Mutex
	lat    []time.Duration
	byKind [kinds][]time.Duration
	errs   []error
	conns  []*grpc.ClientConn
}

// Mark starts the edit clock: each client's next response counts as the edit's arrival.
func (f *Fleet) Mark(t time.Time) { f.mark.Store(t.UnixNano()) }

// Latencies are each client's time from Mark to its first response after it.
func (f *Fleet) Latencies() ([]time.Duration, [kinds][]time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Duration(nil), f.lat...), f.byKind
}

// Errs are the stream errors seen (other than the end of the test).
func (f *Fleet) Errs() []error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]error(nil), f.errs...)
}

// Close closes every connection.
func (f *Fleet) Close() {
	for _, c := range f.conns {
		c.Close()
	}
}

// Connect opens conns client connections to addr and n streams spread over them, client i
// of Kind i%4 (proxyless clients watch model), each ACKing every response as its real
// counterpart does (models: how many are configured, for EnvoyRoutes). It returns at
// once; watch Synced.
func Connect(ctx context.Context, addr string, n, conns, models int, model string) (*Fleet, error) {
	f := &Fleet{N: n, Conns: conns, models: models}
	for c := 0; c < conns; c++ {
		cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<30), grpc.ForceCodec(liteCodec{})))
		if err != nil {
			f.Close()
			return nil, err
		}
		f.conns = append(f.conns, cc)
	}
	for i := 0; i < n; i++ {
		go f.run(ctx, f.conns[i%conns], i, Kind(i%int(kinds)), model)
	}
	return f, nil
}

func (f *Fleet) fail(ctx context.Context, err error) {
	if ctx.Err() != nil {
		return
	}
	f.mu.Lock()
	f.errs = append(f.errs, err)
	f.mu.Unlock()
}

// Sample is how many other models' route configs a simulated Envoy subscribes to besides
// the edited model's.
const Sample = 3

// EnvoyRoutes are the RDS names simulated Envoy i subscribes to: the edited model's
// RouteConfiguration (translate.ModelRouteName) and Sample others among the configured
// models "model-00001".."model-<models-1>" chosen by i (none when models is 1). A real Envoy subscribes to every
// model's (SRDS wildcard, RDS per scope); the simulated ones do not, to keep the load
// generator within the 2 cores (see README).
func EnvoyRoutes(i, models int, model string) []string {
	names := []string{translate.ModelRouteName(model)}
	for k := 1; k <= Sample && models > 1; k++ {
		n := translate.ModelRouteName(fmt.Sprintf("model-%05d", 1+(i*7+k*331)%(models-1)))
		if !slices.Contains(names, n) {
			names = append(names, n)
		}
	}
	return names
}

func (f *Fleet) run(ctx context.Context, cc *grpc.ClientConn, i int, k Kind, model string) {
	delta := k == EnvoyDelta
	desc, method := sotwDesc, sotwMethod
	if delta {
		desc, method = deltaDesc, deltaMethod
	}
	s, err := cc.NewStream(ctx, desc, method, grpc.WaitForReady(true))
	if err != nil {
		f.fail(ctx, err)
		return
	}
	typ, names := resource.RouteType, EnvoyRoutes(i, f.models, model)
	switch k {
	case Proxyless:
		typ, names = resource.ListenerType, []string{model}
	case Extproc:
		typ, names = policyv1.TypeURL, []string{policyv1.ResourceName}
	}
	node := k.node(i)
	var req proto.Message
	if delta {
		req = &discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: typ, ResourceNamesSubscribe: names}
	} else {
		req = &discoveryv3.DiscoveryRequest{Node: node, TypeUrl: typ, ResourceNames: names}
	}
	if err := s.SendMsg(req); err != nil {
		f.fail(ctx, err)
		return
	}
	first, updated := true, false
	for {
		var r lite
		if err := s.RecvMsg(&r); err != nil {
			f.fail(ctx, fmt.Errorf("client %d (%s): %w", i, k, err))
			return
		}
		now := time.Now()
		f.Bytes.Add(int64(r.bytes))
		if first {
			first = false
			f.Synced.Add(1)
		} else if m := f.mark.Load(); m != 0 && !updated {
			updated = true
			d := now.Sub(time.Unix(0, m))
			f.mu.Lock()
			f.lat = append(f.lat, d)
			f.byKind[k] = append(f.byKind[k], d)
			f.mu.Unlock()
			f.Updated.Add(1)
		}
		if delta {
			req = &discoveryv3.DeltaDiscoveryRequest{TypeUrl: typ, ResponseNonce: r.nonce}
		} else {
			req = &discoveryv3.DiscoveryRequest{TypeUrl: typ, ResourceNames: names, VersionInfo: r.version, ResponseNonce: r.nonce}
		}
		if err := s.SendMsg(req); err != nil {
			f.fail(ctx, err)
			return
		}
	}
}
