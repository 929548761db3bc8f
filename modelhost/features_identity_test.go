package modelhost_test

import (
	"context"
	"math"
	"path/filepath"
	"testing"

	"google.golang.org/grpc/metadata"

	"github.com/patchbay-io/patchbay/api/oip"
)

// TestIdentityFeatures: identity features reach the model over REST and gRPC: known is 1
// exactly when the identity header (default x-user-id, or the feature's header) is present;
// bucket is the router's x-patchbay-bucket as value/2^64, its default (counted) when absent
// or not a decimal uint64.
func TestIdentityFeatures(t *testing.T) {
	repo := t.TempDir()
	d := filepath.Join(repo, "who", "v1")
	writeFile(t, filepath.Join(d, "model.yaml"), `runtime: linear
artifact: linear.json
inputs:  [{name: x, datatype: FP32, shape: [-1, 3]}]
outputs: [{name: p, datatype: FP32, shape: [-1]}]
features:
  - {name: known, input: x, column: 0, source: identity, identity: known}
  - {name: device, input: x, column: 1, source: identity, identity: known, header: x-device-id}
  - {name: bucket, input: x, column: 2, source: identity, identity: bucket, default: 0.25}
`)
	writeFile(t, filepath.Join(d, "linear.json"), `{"link": "identity", "weights": [1, 10, 100], "bias": 0}`)
	h := startHost(t, repo, nil)
	for _, c := range []struct {
		hdr  map[string]string
		want float64
	}{
		{map[string]string{}, 25},
		{map[string]string{"x-user-id": "u1"}, 1 + 25},
		{map[string]string{"x-device-id": "d1", "x-patchbay-bucket": "0"}, 10},
		{map[string]string{"x-user-id": "u1", "x-device-id": "d1", "x-patchbay-bucket": "9223372036854775808"}, 1 + 10 + 50},
		{map[string]string{"x-patchbay-bucket": "18446744073709551615"}, 100 * float64(1<<53-1) / (1 << 53)},
		{map[string]string{"x-user-id": "u1", "x-patchbay-bucket": "-3"}, 1 + 25},
	} {
		var out map[string]any
		resp := h.do(t, "POST", "/v2/models/who/versions/v1/infer", `{"inputs":[]}`, c.hdr, &out)
		if resp.StatusCode != 200 {
			t.Fatalf("%v: %d %v", c.hdr, resp.StatusCode, out)
		}
		if got := out["outputs"].([]any)[0].(map[string]any)["data"].([]any)[0].(float64); math.Abs(got-c.want) > 1e-4 {
			t.Errorf("REST %v: %v, want %v", c.hdr, got, c.want)
		}
		var kv []string
		for k, v := range c.hdr {
			kv = append(kv, k, v)
		}
		gr, err := h.grpc.ModelInfer(metadata.AppendToOutgoingContext(context.Background(), kv...), &oip.ModelInferRequest{ModelName: "who", ModelVersion: "v1"})
		if err != nil {
			t.Fatalf("gRPC %v: %v", c.hdr, err)
		}
		if got := float64(gr.GetOutputs()[0].GetContents().GetFp32Contents()[0]); math.Abs(got-c.want) > 1e-4 {
			t.Errorf("gRPC %v: %v, want %v", c.hdr, got, c.want)
		}
	}
	// Each case ran over REST and gRPC: 2 without a bucket, 1 with an invalid one.
	if n := metricCount(t, h, "bucket", "missing"); n != 4 {
		t.Errorf("feature_defaults_total{feature=bucket,reason=missing} = %v, want 4", n)
	}
	if n := metricCount(t, h, "bucket", "invalid"); n != 2 {
		t.Errorf("feature_defaults_total{feature=bucket,reason=invalid} = %v, want 2", n)
	}
	if n := metricCount(t, h, "known", "missing") + metricCount(t, h, "device", "missing"); n != 0 {
		t.Errorf("identity known counted %v defaults, want none (absent is 0, not a default)", n)
	}
}
