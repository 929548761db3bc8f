package modelhost_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/patchbay-io/patchbay/api/oip"
)

// identityRepo holds model idm: v1 and v2 answer y = x (linear, identity link); v1 declares
// output buckets [0, 1, 2, 3], v2 takes the default (20 equal buckets over [0, 1]).
func identityRepo(t testing.TB) string {
	repo := t.TempDir()
	for _, v := range []struct{ name, buckets string }{{"v1", ", buckets: [0, 1, 2, 3]"}, {"v2", ""}} {
		writeFile(t, filepath.Join(repo, "idm", v.name, "linear.json"), `{"link":"identity","weights":[1],"bias":0}`)
		writeFile(t, filepath.Join(repo, "idm", v.name, "model.yaml"), "runtime: linear\nartifact: linear.json\n"+
			"inputs: [{name: x, datatype: FP32, shape: [-1, 1]}]\noutputs: [{name: y, datatype: FP32, shape: [-1]"+v.buckets+"}]\n")
	}
	return repo
}

func restInfer(t *testing.T, h *host, host, version string, xs []float32) {
	t.Helper()
	data := make([]string, len(xs))
	for i, x := range xs {
		data[i] = fmt.Sprint(x)
	}
	body := fmt.Sprintf(`{"inputs":[{"name":"x","datatype":"FP32","shape":[%d,1],"data":[%s]}]}`, len(xs), strings.Join(data, ","))
	req, err := http.NewRequest("POST", h.url+"/v2/models/idm/versions/"+version+"/infer", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if host != "" {
		req.Host = host
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 && version != "nope" {
		t.Fatalf("REST infer %s: %d %s", version, resp.StatusCode, b)
	}
}

func grpcInfer(t *testing.T, c oip.GRPCInferenceServiceClient, version string, xs []float32) {
	t.Helper()
	_, err := c.ModelInfer(context.Background(), &oip.ModelInferRequest{ModelName: "idm", ModelVersion: version,
		Inputs: []*oip.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{int64(len(xs)), 1},
			Contents: &oip.InferTensorContents{Fp32Contents: xs}}}})
	if err != nil && version != "nope" {
		t.Fatalf("gRPC infer %s: %v", version, err)
	}
}

func scrape(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func wantLines(t *testing.T, text string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(text, "\n"+w+"\n") {
			t.Errorf("/metrics lacks %s", w)
		}
	}
	if t.Failed() {
		for _, l := range strings.Split(text, "\n") {
			if strings.HasPrefix(l, "patchbay_modelhost_output") || strings.HasPrefix(l, "patchbay_modelhost_request") {
				t.Log(l)
			}
		}
	}
}

// TestOutputHistogramOverRESTAndGRPC: every value of every output of a successful
// inference, over REST and gRPC alike, lands in patchbay_modelhost_output with the
// buckets model.yaml declares (v1) or the default 20 over [0, 1] (v2); failed requests
// add nothing.
func TestOutputHistogramOverRESTAndGRPC(t *testing.T) {
	h := startHost(t, identityRepo(t), nil)
	restInfer(t, h, "", "v1", []float32{0.5, 1.5, 2.5, 10})
	grpcInfer(t, h.grpc, "v1", []float32{0.5, 1.5, 2.5, 10})
	restInfer(t, h, "", "v2", []float32{0.02, 0.5})
	grpcInfer(t, h.grpc, "v2", []float32{0.97})
	restInfer(t, h, "", "nope", []float32{0.5}) // 404: no values
	text := scrape(t, h.url)
	v1 := `{model="idm",output="y",traffic="live",version="v1"`
	v2 := `{model="idm",output="y",traffic="live",version="v2"`
	wantLines(t, text,
		`patchbay_modelhost_output_bucket`+v1+`,le="0"} 0`,
		`patchbay_modelhost_output_bucket`+v1+`,le="1"} 2`,
		`patchbay_modelhost_output_bucket`+v1+`,le="2"} 4`,
		`patchbay_modelhost_output_bucket`+v1+`,le="3"} 6`,
		`patchbay_modelhost_output_bucket`+v1+`,le="+Inf"} 8`,
		`patchbay_modelhost_output_sum`+v1+`} 29`,
		`patchbay_modelhost_output_count`+v1+`} 8`,
		`patchbay_modelhost_output_bucket`+v2+`,le="0.05"} 1`,
		`patchbay_modelhost_output_bucket`+v2+`,le="0.45"} 1`,
		`patchbay_modelhost_output_bucket`+v2+`,le="0.5"} 2`,
		`patchbay_modelhost_output_bucket`+v2+`,le="0.95"} 2`,
		`patchbay_modelhost_output_bucket`+v2+`,le="1"} 3`,
		`patchbay_modelhost_output_count`+v2+`} 3`,
	)
	if n := strings.Count(text, "patchbay_modelhost_output_bucket"+v2); n != 21 {
		t.Errorf("v2 has %d buckets, want the default 20 and +Inf", n)
	}
	if strings.Contains(text, `patchbay_modelhost_output_count{model="idm",output="y",traffic="shadow"`) {
		t.Error("no shadow request was sent, yet a shadow output series exists")
	}
}

// TestShadowTrafficTagged: a request whose Host / :authority Envoy suffixed with "-shadow"
// (before the port) counts as traffic="shadow" on the request, error, duration and
// output metrics; others as live.
func TestShadowTrafficTagged(t *testing.T) {
	h := startHost(t, identityRepo(t), nil)
	restInfer(t, h, "x-shadow", "v1", []float32{0.5})
	restInfer(t, h, "ranker-shadow:8000", "v1", []float32{1.5})
	restInfer(t, h, "x-shadow", "nope", []float32{0.5})
	restInfer(t, h, "shadowy:8000", "v1", []float32{2.5}) // no "-shadow" suffix: live
	// gRPC: Envoy rewrites :authority the same way.
	gconn, err := grpc.NewClient(h.conn.Target(), grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithAuthority("ranker-shadow:8001"))
	if err != nil {
		t.Fatal(err)
	}
	defer gconn.Close()
	grpcInfer(t, oip.NewGRPCInferenceServiceClient(gconn), "v1", []float32{0.5})
	grpcInfer(t, h.grpc, "v1", []float32{0.5})
	text := scrape(t, h.url)
	wantLines(t, text,
		`patchbay_modelhost_requests_total{model="idm",protocol="rest",traffic="shadow",version="v1"} 2`,
		`patchbay_modelhost_requests_total{model="idm",protocol="rest",traffic="live",version="v1"} 1`,
		`patchbay_modelhost_requests_total{model="idm",protocol="grpc",traffic="shadow",version="v1"} 1`,
		`patchbay_modelhost_requests_total{model="idm",protocol="grpc",traffic="live",version="v1"} 1`,
		`patchbay_modelhost_request_errors_total{code="NotFound",model="_unknown",protocol="rest",traffic="shadow",version=""} 1`,
		`patchbay_modelhost_request_duration_seconds_count{model="idm",protocol="rest",traffic="shadow",version="v1"} 2`,
		`patchbay_modelhost_output_count{model="idm",output="y",traffic="shadow",version="v1"} 3`,
		`patchbay_modelhost_output_sum{model="idm",output="y",traffic="shadow",version="v1"} 2.5`,
		`patchbay_modelhost_output_count{model="idm",output="y",traffic="live",version="v1"} 2`,
	)
}
