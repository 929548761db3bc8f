package e2e

import (
	"context"
	"fmt"
	"math"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	xdsresolver "google.golang.org/grpc/xds"

	"github.com/patchbay-io/patchbay/api/oip"
)

// TestChainProxylessGRPC: a grpc-go client with xDS support dials xds:///ranker at the real
// control plane and calls OIP ModelInfer on the real model hosts: split, header pin, and a
// rollback by file edit, with no proxy in between.
func TestChainProxylessGRPC(t *testing.T) {
	a, b := startHost(t, "host-a", "ranker/v7"), startHost(t, "host-b", "ranker/v8")
	dir := t.TempDir()
	doc := func(traffic string) string {
		return fmt.Sprintf("apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: ranker\nversions:\n"+
			"  - {name: v7, endpoints: [%q], protocol: grpc}\n  - {name: v8, endpoints: [%q], protocol: grpc}\ntraffic: %s\n",
			a.grpc, b.grpc, traffic)
	}
	writeRollout(t, dir, "ranker.yaml", doc("{v7: 70, v8: 30}"))
	xdsAddr, xdsAdmin := freeAddr(t), freeAddr(t)
	startProc(t, "xds", "http://"+xdsAdmin+"/readyz", "xds", "--rollouts", dir, "--listen", xdsAddr, "--admin", xdsAdmin, "--log-level", "warn")

	bootstrap := fmt.Sprintf(`{"xds_servers": [{"server_uri": %q, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
		"node": {"id": "e2e-proxyless"}}`, xdsAddr)
	rb, err := xdsresolver.NewXDSResolverWithConfigForTesting([]byte(bootstrap))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("xds:///ranker", grpc.WithResolvers(rb), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := oip.NewGRPCInferenceServiceClient(conn)
	infer := func(md ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if len(md) > 0 {
			ctx = metadata.AppendToOutgoingContext(ctx, md...)
		}
		r, err := client.ModelInfer(ctx, &oip.ModelInferRequest{
			ModelName: "ranker",
			Inputs: []*oip.ModelInferRequest_InferInputTensor{{
				Name: "features", Datatype: "FP32", Shape: []int64{1, 8},
				Contents: &oip.InferTensorContents{Fp32Contents: []float32{0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8}},
			}},
		}, grpc.WaitForReady(true))
		if err != nil {
			t.Fatalf("ModelInfer: %v", err)
		}
		return r.GetModelVersion()
	}
	counts := map[string]int{}
	const n = 1000
	for i := 0; i < n; i++ {
		counts[infer()]++
	}
	// sd at p=0.3, n=1000 is 0.0145: allow 4.5 sd.
	if share := float64(counts["v8"]) / n; math.Abs(share-0.3) > 0.065 || counts["v7"]+counts["v8"] != n {
		t.Fatalf("split %v, want 70/30", counts)
	}
	for i := 0; i < 50; i++ {
		if v := infer("x-patchbay-version", "v8"); v != "v8" {
			t.Fatalf("pinned to v8, served by %s", v)
		}
	}
	writeRollout(t, dir, "ranker.yaml", doc("{v7: 100, v8: 0}"))
	waitFor(t, 5*time.Second, "rollback to v7", func() bool {
		for i := 0; i < 20; i++ {
			if infer() != "v7" {
				return false
			}
		}
		return true
	})
}
