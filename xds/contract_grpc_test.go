package xds

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	"github.com/patchbay-io/patchbay/api/contract"
	"github.com/patchbay-io/patchbay/api/headers"
	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/internal/tlsfiles"
	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// grpcHost is a real gRPC OIP server for one version: ModelInfer like backend, and
// ModelMetadata answering md with, when optional is set, the patchbay header listing the
// inputs a request may leave out.
type grpcHost struct {
	backend
	md       atomic.Pointer[rollout.Metadata]
	optional atomic.Pointer[string] // nil: no header (another OIP server)
	reads    atomic.Int64
}

func startGRPCHost(t *testing.T, name string, md *rollout.Metadata, optional *string, opts ...grpc.ServerOption) *grpcHost {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := &grpcHost{backend: backend{name: name, addr: lis.Addr().String()}}
	h.md.Store(md)
	h.optional.Store(optional)
	gs := grpc.NewServer(opts...)
	oip.RegisterGRPCInferenceServiceServer(gs, h)
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	return h
}

func (h *grpcHost) ModelMetadata(ctx context.Context, req *oip.ModelMetadataRequest) (*oip.ModelMetadataResponse, error) {
	h.reads.Add(1)
	if o := h.optional.Load(); o != nil {
		if err := grpc.SetHeader(ctx, metadata.Pairs(contract.OptionalInputsHeader, *o)); err != nil {
			return nil, err
		}
	}
	md := h.md.Load()
	conv := func(ts []rollout.Tensor) []*oip.ModelMetadataResponse_TensorMetadata {
		var out []*oip.ModelMetadataResponse_TensorMetadata
		for _, t := range ts {
			out = append(out, &oip.ModelMetadataResponse_TensorMetadata{Name: t.Name, Datatype: t.Datatype, Shape: t.Shape})
		}
		return out
	}
	return &oip.ModelMetadataResponse{Name: req.GetName(), Versions: []string{h.name}, Platform: "test", Inputs: conv(md.Inputs), Outputs: conv(md.Outputs)}, nil
}

// grpcContractDoc: v1 gRPC-only the old way (protocol: grpc), v2 with grpcEndpoints only.
func grpcContractDoc(v1, v2 string) string {
	return fmt.Sprintf(`apiVersion: patchbay.io/v1
kind: Rollout
model: r
versions:
  - {name: v1, protocol: grpc, endpoints: [%q]}
  - {name: v2, grpcEndpoints: [%q]}
traffic: {v1: 50, v2: 50}
pinning: true
contract:
  inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
  outputs: [{name: y, datatype: FP32, shape: [-1, 1]}]
`, v1, v2)
}

// TestContractGRPCOnlyVersions: versions without REST endpoints are checked with gRPC
// ModelMetadata on their gRPC endpoints. v1 (no patchbay header, another OIP server) keeps
// the contract and serves; v2 adds an input its header does not list as optional (so it is
// required) and is held: grpc-go's xDS client never reaches it, by split or pin. Once its
// header lists the added input as optional, v2 is accepted and serves.
func TestContractGRPCOnlyVersions(t *testing.T) {
	none := ""
	h1 := startGRPCHost(t, "v1", keeps, nil)
	h2 := startGRPCHost(t, "v2", addsMask, &none)
	dir := t.TempDir()
	writeFile(t, dir, "r.yaml", grpcContractDoc(h1.addr, h2.addr))
	c := startCPWith(t, dir, func(cfg *Config) { cfg.ContractRetry = 50 * time.Millisecond })
	waitFor(t, 5*time.Second, "v2 held by the contract", func() bool {
		cs, _ := contractOf(c, "v2")
		return cs.State == contractHeld
	})
	if cs, _ := contractOf(c, "v2"); !strings.Contains(cs.Reason, `input "mask" is new and required`) || !strings.Contains(cs.Reason, "grpc://"+h2.addr) {
		t.Fatalf("v2 contract status %+v, want the required added input and its gRPC endpoint named", cs)
	}
	waitFor(t, 5*time.Second, "v1 keeps the contract", func() bool {
		cs, _ := contractOf(c, "v1")
		return cs.State == contractOK
	})
	if h1.reads.Load() == 0 || h2.reads.Load() == 0 {
		t.Fatalf("ModelMetadata reads: v1 %d, v2 %d", h1.reads.Load(), h2.reads.Load())
	}
	waitFor(t, 5*time.Second, "v2's doors closed", func() bool { return len(doors(t, c.srv, "r", "v2")) == 0 })
	noCallsReach(t, c, &h2.backend, "v2")

	mask := "mask"
	h2.optional.Store(&mask)
	waitFor(t, 5*time.Second, "v2 accepted once mask is optional", func() bool {
		cs, _ := contractOf(c, "v2")
		return cs.State == contractOK
	})
	waitFor(t, 5*time.Second, "v2's doors open", func() bool { return len(doors(t, c.srv, "r", "v2")) > 0 })
	allGoTo(t, xdsClient(t, c, "r"), "v2", headers.Version, "v2")
}

// TestContractGRPCOverTLS: gRPC-only versions with tls: true are read over TLS with the
// control plane's client certificate (--tls-cert/--tls-key) against --upstream-tls-ca,
// from hosts that require and verify it: the compatible one is accepted, the breaking one
// held with the datatype named (so its metadata was read, not merely unreachable).
func TestContractGRPCOverTLS(t *testing.T) {
	pki := t.TempDir()
	ca, err := tlsfiles.NewCA("test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	hostFiles, err := ca.WriteLeaf(pki, "host", tlsfiles.Leaf{Name: "host", Hosts: []string{"127.0.0.1"}, URI: "spiffe://patchbay.local/role/modelhost"})
	if err != nil {
		t.Fatal(err)
	}
	cpFiles, err := ca.WriteLeaf(pki, "xds", tlsfiles.Leaf{Name: "xds", Hosts: []string{"127.0.0.1"}})
	if err != nil {
		t.Fatal(err)
	}
	src, err := tlsfiles.Load(hostFiles, tlsfiles.Options{}) // with the CA: client certificates required
	if err != nil {
		t.Fatal(err)
	}
	creds := grpc.Creds(credentials.NewTLS(src.ServerConfig("h2")))
	h1 := startGRPCHost(t, "v1", keeps, nil, creds)
	h2 := startGRPCHost(t, "v2", breaks, nil, creds)
	dir := t.TempDir()
	doc := strings.NewReplacer("{name: v1, protocol: grpc,", "{name: v1, tls: true, protocol: grpc,", "{name: v2, grpcEndpoints", "{name: v2, tls: true, grpcEndpoints").Replace(grpcContractDoc(h1.addr, h2.addr))
	writeFile(t, dir, "r.yaml", doc)
	c := startCPWith(t, dir, func(cfg *Config) {
		cfg.ContractRetry = 50 * time.Millisecond
		cfg.TLS = tlsfiles.Files{Cert: cpFiles.Cert, Key: cpFiles.Key}
		cfg.Translate.UpstreamTLS = translate.TLSFiles{CA: cpFiles.CA, Cert: cpFiles.Cert, Key: cpFiles.Key}
	})
	waitFor(t, 5*time.Second, "v1 ok and v2 held over TLS", func() bool {
		a, _ := contractOf(c, "v1")
		b, _ := contractOf(c, "v2")
		return a.State == contractOK && b.State == contractHeld
	})
	if cs, _ := contractOf(c, "v2"); !strings.Contains(cs.Reason, `input "x": datatype FP64, the contract says FP32`) {
		t.Fatalf("v2 contract status %+v, want the datatype named", cs)
	}
}

// FuzzOptionalInputs: any x-patchbay-optional-inputs header values give trimmed,
// non-empty names without commas, and the header counts as said whenever it is present.
func FuzzOptionalInputs(f *testing.F) {
	f.Add("mask", "")
	f.Add(" a , b,,c ", "d")
	f.Add("", "")
	f.Fuzz(func(t *testing.T, a, b string) {
		got, said := optionalInputs(metadata.MD{contract.OptionalInputsHeader: {a, b}})
		if !said {
			t.Fatal("header present but not said")
		}
		for n := range got {
			if n == "" || n != strings.TrimSpace(n) || strings.Contains(n, ",") {
				t.Fatalf("name %q from %q, %q", n, a, b)
			}
		}
		if _, said := optionalInputs(metadata.MD{}); said {
			t.Fatal("absent header said")
		}
	})
}
