package xds

import (
	"math"
	"testing"
)

// TestProxylessGRPCWithGRPCEndpoints: a model whose versions serve REST (endpoints) and
// gRPC (grpcEndpoints) is routed by grpc-go's own xDS client to the gRPC endpoints only —
// the REST addresses here accept no gRPC at all — split, version header and a version
// that serves gRPC only.
func TestProxylessGRPCWithGRPCEndpoints(t *testing.T) {
	v1, v2, v3 := startBackend(t, "v1"), startBackend(t, "v2"), startBackend(t, "v3")
	dir := t.TempDir()
	// 127.0.0.1:9 (discard) is a REST address nothing listens on: an RPC sent there fails.
	writeFile(t, dir, "ranker.yaml", "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: ranker\nversions:\n"+
		"  - {name: v1, endpoints: [\"127.0.0.1:9\"], grpcEndpoints: [\""+v1.addr+"\"]}\n"+
		"  - {name: v2, endpoints: [\"127.0.0.1:9\"], grpcEndpoints: [\""+v2.addr+"\"]}\n"+
		"  - {name: v3, grpcEndpoints: [\""+v3.addr+"\"]}\n"+
		"traffic: {v1: 50, v2: 50}\n")
	writeFile(t, dir, "recs.yaml", "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: recs\nversions:\n"+
		"  - {name: v1, endpoints: [\"127.0.0.1:9\"]}\ntraffic: {v1: 100}\n")
	c := startCP(t, dir)
	client := xdsClient(t, c, "ranker")
	const n = 400
	got := countCalls(t, client, n)
	// Binomial sd at p=0.5, n=400 is 0.025: allow 4 sd.
	if share := float64(got["v2"]) / n; math.Abs(share-0.5) > 0.1 || got["v1"]+got["v2"] != n {
		t.Fatalf("counts %v, want a 50/50 split of %d RPCs over the gRPC endpoints", got, n)
	}
	if got := countCalls(t, client, 50, "x-patchbay-version", "v3"); got["v3"] != 50 {
		t.Fatalf("x-patchbay-version v3 (gRPC only, no share): %v", got)
	}
}
