package xds

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	listenerservice "github.com/envoyproxy/go-control-plane/envoy/service/listener/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
	"github.com/patchbay-io/patchbay/internal/tlsfiles"
)

// dialTLS connects to the control plane with a client certificate.
func dialTLS(t *testing.T, c *cp, f tlsfiles.Files) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(c.grpcAddr, grpc.WithTransportCredentials(credentials.NewTLS(clientTLS(t, f))))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// claimingEdge is an Envoy node that says it is an edge, including in the metadata field in
// which the server records the flavour it decided.
func claimingEdge() *corev3.Node {
	n := envoyNode("edge")
	n.Metadata, _ = structpb.NewStruct(map[string]any{flavourKey: string(FlavourEdge)})
	return n
}

// TestFetchIsNotServed: the per-type services' unary Fetch* (and their streams) are not
// served at all: they bypassed the admission that maps a certificate to a flavour, so a
// sidecar, operator or identity-less certificate fetched the edge listener by claiming an
// edge node. Over TLS with client certificates and over plaintext alike.
func TestFetchIsNotServed(t *testing.T) {
	p := newPKI(t)
	dir := t.TempDir()
	writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", map[string]string{"v1": "127.0.0.1:9001"}, "{v1: 100}", ""))
	c := startTLSCP(t, dir, p)
	for _, who := range []string{"sidecar", "operator", "none", "grpc", "edge"} {
		t.Run(who, func(t *testing.T) {
			lds := listenerservice.NewListenerDiscoveryServiceClient(dialTLS(t, c, p.clients[who]))
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			r, err := lds.FetchListeners(ctx, &discoveryv3.DiscoveryRequest{Node: claimingEdge(), TypeUrl: resource.ListenerType})
			if status.Code(err) != codes.Unimplemented {
				t.Fatalf("FetchListeners: %v (%d resources), want Unimplemented", err, len(r.GetResources()))
			}
			s, err := lds.StreamListeners(ctx)
			if err == nil {
				// A stream the server ends at once may fail Send with io.EOF; its status
				// comes from Recv.
				if err = s.Send(&discoveryv3.DiscoveryRequest{Node: claimingEdge(), TypeUrl: resource.ListenerType}); err == nil || errors.Is(err, io.EOF) {
					_, err = s.Recv()
				}
			}
			if status.Code(err) != codes.Unimplemented {
				t.Fatalf("StreamListeners: %v, want Unimplemented", err)
			}
		})
	}
	t.Run("plaintext", func(t *testing.T) {
		plain := startCP(t, dir)
		conn, err := grpc.NewClient(plain.grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err = listenerservice.NewListenerDiscoveryServiceClient(conn).FetchListeners(ctx,
			&discoveryv3.DiscoveryRequest{Node: envoyNode("sidecar"), TypeUrl: resource.ListenerType})
		if status.Code(err) != codes.Unimplemented {
			t.Fatalf("FetchListeners: %v, want Unimplemented", err)
		}
	})
}

// TestMTLSNodelessFirstRequest: with identities on, a stream whose first request carries no
// node is served by its certificate's role, never the edge snapshot a blank node used to
// fall back to; later node-less requests keep that flavour (delta and SotW).
func TestMTLSNodelessFirstRequest(t *testing.T) {
	p := newPKI(t)
	dir := t.TempDir()
	writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", map[string]string{"v1": "127.0.0.1:9001"}, "{v1: 100}", ""))
	c := startTLSCP(t, dir, p)
	delta := func(t *testing.T, who string) discoveryv3.AggregatedDiscoveryService_DeltaAggregatedResourcesClient {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		t.Cleanup(cancel)
		s, err := discoveryv3.NewAggregatedDiscoveryServiceClient(dialTLS(t, c, p.clients[who])).DeltaAggregatedResources(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	deltaNames := func(t *testing.T, s discoveryv3.AggregatedDiscoveryService_DeltaAggregatedResourcesClient, typeURL string) []string {
		t.Helper()
		if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: typeURL}); err != nil {
			t.Fatal(err)
		}
		r, err := s.Recv()
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, res := range r.GetResources() {
			names = append(names, res.GetName())
		}
		return names
	}
	t.Run("delta sidecar", func(t *testing.T) {
		s := delta(t, "sidecar")
		if got := deltaNames(t, s, resource.ListenerType); len(got) != 1 || got[0] != "patchbay_sidecar" {
			t.Fatalf("listeners %v, want [patchbay_sidecar]", got)
		}
		// A second node-less request on the same stream is still a sidecar's.
		if got := deltaNames(t, s, resource.ClusterType); len(got) == 0 {
			t.Fatal("no clusters for the second node-less request")
		}
	})
	t.Run("delta grpc", func(t *testing.T) {
		for _, name := range deltaNames(t, delta(t, "grpc"), resource.ListenerType) {
			if name == "patchbay_edge" || name == "patchbay_sidecar" {
				t.Fatalf("a grpc certificate got Envoy listener %s", name)
			}
		}
	})
	t.Run("delta grpc cannot read the policy", func(t *testing.T) {
		s := delta(t, "grpc")
		if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: policyv1.TypeURL}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Recv(); status.Code(err) != codes.PermissionDenied {
			t.Fatalf("got %v, want PermissionDenied", err)
		}
	})
	t.Run("delta extproc reads the policy", func(t *testing.T) {
		if got := deltaNames(t, delta(t, "extproc"), policyv1.TypeURL); len(got) != 1 {
			t.Fatalf("policy resources %v", got)
		}
	})
	t.Run("sotw sidecar", func(t *testing.T) {
		s := adsStreamTLS(t, c, p.clients["sidecar"])
		if got := listenerName(t, fetch(t, s, nil, resource.ListenerType)); got != "patchbay_sidecar" {
			t.Fatalf("listener %q, want patchbay_sidecar", got)
		}
	})
	t.Run("sotw operator refused", func(t *testing.T) {
		refused(t, adsStreamTLS(t, c, p.clients["operator"]), nil, resource.ListenerType)
	})
}

// TestClientSentFlavourIsIgnored: the metadata field in which the server records a stream's
// flavour is overwritten whatever the client put there: without identities the flavour
// follows the node's user agent and role metadata only, so no node reaches the ext_proc
// policy (or another flavour's listener) by naming a flavour; with identities the
// certificate decides.
func TestClientSentFlavourIsIgnored(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", map[string]string{"v1": "127.0.0.1:9001"}, "{v1: 100}", ""))
	c := startCP(t, dir)
	mark := func(n *corev3.Node, f Flavour) *corev3.Node {
		n.Metadata, _ = structpb.NewStruct(map[string]any{flavourKey: string(f)})
		return n
	}
	refused(t, adsStream(t, c), mark(envoyNode("edge"), FlavourExtproc), policyv1.TypeURL)
	if got := listenerName(t, fetch(t, adsStream(t, c), mark(envoyNode("edge"), FlavourSidecar), resource.ListenerType)); got != "patchbay_edge" {
		t.Fatalf("an edge node naming the sidecar flavour got %q, want patchbay_edge", got)
	}
	p := newPKI(t)
	tc := startTLSCP(t, dir, p)
	if got := listenerName(t, fetch(t, adsStreamTLS(t, tc, p.clients["sidecar"]), claimingEdge(), resource.ListenerType)); got != "patchbay_sidecar" {
		t.Fatalf("a sidecar certificate naming the edge flavour got %q, want patchbay_sidecar", got)
	}
}
