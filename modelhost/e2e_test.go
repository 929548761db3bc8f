package modelhost_test

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/patchbay-io/patchbay/api/headers"
	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/modelhost"
)

type parityFixture struct {
	rows  [][]*float64
	preds []float64
}

func readParity(t testing.TB) parityFixture {
	t.Helper()
	var in struct {
		Rows [][]*float64 `json:"rows"`
	}
	var out struct {
		Predictions []float64 `json:"predictions"`
	}
	for file, v := range map[string]any{"inputs.json": &in, "outputs.json": &out} {
		raw, err := os.ReadFile(filepath.Join(fixtures, "binary", file))
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(raw, v); err != nil {
			t.Fatal(err)
		}
	}
	return parityFixture{rows: in.Rows, preds: out.Predictions}
}

func (f parityFixture) flat() []float32 {
	var x []float32
	for _, r := range f.rows {
		for _, v := range r {
			if v == nil {
				x = append(x, float32(math.NaN()))
			} else {
				x = append(x, float32(*v))
			}
		}
	}
	return x
}

func TestMetadataAndReadinessREST(t *testing.T) {
	h := startHost(t, testRepo(t), nil)
	var live, ready map[string]bool
	if r := h.do(t, "GET", "/v2/health/live", "", nil, &live); r.StatusCode != 200 || !live["live"] {
		t.Errorf("live: %d %v", r.StatusCode, live)
	}
	if r := h.do(t, "GET", "/v2/health/ready", "", nil, &ready); r.StatusCode != 200 || !ready["ready"] {
		t.Errorf("ready: %d %v", r.StatusCode, ready)
	}
	var server struct {
		Name       string   `json:"name"`
		Extensions []string `json:"extensions"`
	}
	h.do(t, "GET", "/v2", "", nil, &server)
	if server.Name == "" || len(server.Extensions) == 0 || server.Extensions[0] != "model_repository" {
		t.Errorf("server metadata: %+v", server)
	}
	type meta struct {
		Name     string   `json:"name"`
		Versions []string `json:"versions"`
		Platform string   `json:"platform"`
		Inputs   []struct {
			Name, Datatype string
			Shape          []int64
		} `json:"inputs"`
		Outputs []struct {
			Name, Datatype string
			Shape          []int64
		} `json:"outputs"`
	}
	var m meta
	h.do(t, "GET", "/v2/models/ranker", "", nil, &m)
	if fmt.Sprint(m.Versions) != "[v7 v8]" || m.Platform != "xgboost" || len(m.Inputs) != 1 || m.Inputs[0].Name != "features" ||
		m.Inputs[0].Datatype != "FP32" || fmt.Sprint(m.Inputs[0].Shape) != "[-1 8]" || m.Outputs[0].Name != "score" || fmt.Sprint(m.Outputs[0].Shape) != "[-1]" {
		t.Errorf("ranker metadata: %+v", m)
	}
	var recs meta
	h.do(t, "GET", "/v2/models/recs/versions/v1", "", nil, &recs)
	if fmt.Sprint(recs.Versions) != "[v1]" || len(recs.Outputs) != 2 || recs.Outputs[0].Datatype != "INT64" || fmt.Sprint(recs.Outputs[1].Shape) != "[-1 5]" {
		t.Errorf("recs metadata: %+v", recs)
	}
	for path, want := range map[string]int{
		"/v2/models/ranker/ready":             200,
		"/v2/models/ranker/versions/v8/ready": 200,
		"/v2/models/ranker/versions/v9/ready": 404,
		"/v2/models/nope/ready":               404,
		"/v2/models/nope":                     404,
		"/v2/models/ranker/versions/v9":       404,
	} {
		if r := h.do(t, "GET", path, "", nil, nil); r.StatusCode != want {
			t.Errorf("GET %s: %d, want %d", path, r.StatusCode, want)
		}
	}
}

func TestMetadataAndReadinessGRPC(t *testing.T) {
	h := startHost(t, testRepo(t), nil)
	ctx := context.Background()
	if r, err := h.grpc.ServerLive(ctx, &oip.ServerLiveRequest{}); err != nil || !r.Live {
		t.Errorf("ServerLive: %v %v", r, err)
	}
	if r, err := h.grpc.ServerReady(ctx, &oip.ServerReadyRequest{}); err != nil || !r.Ready {
		t.Errorf("ServerReady: %v %v", r, err)
	}
	if r, err := h.grpc.ServerMetadata(ctx, &oip.ServerMetadataRequest{}); err != nil || r.Name == "" || len(r.Extensions) == 0 {
		t.Errorf("ServerMetadata: %v %v", r, err)
	}
	if r, err := h.grpc.ModelReady(ctx, &oip.ModelReadyRequest{Name: "churn", Version: "v2"}); err != nil || !r.Ready {
		t.Errorf("ModelReady churn/v2: %v %v", r, err)
	}
	if _, err := h.grpc.ModelReady(ctx, &oip.ModelReadyRequest{Name: "nope"}); status.Code(err) != codes.NotFound {
		t.Errorf("ModelReady nope: %v, want NotFound", err)
	}
	hc, err := healthpb.NewHealthClient(h.conn).Check(ctx, &healthpb.HealthCheckRequest{Service: "inference.GRPCInferenceService"})
	if err != nil || hc.Status != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("grpc.health.v1 Check: %v %v", hc, err)
	}
	md, err := h.grpc.ModelMetadata(ctx, &oip.ModelMetadataRequest{Name: "churn"})
	if err != nil {
		t.Fatal(err)
	}
	if md.Name != "churn" || fmt.Sprint(md.Versions) != "[v1 v2]" || md.Platform != "linear" || md.Inputs[0].Datatype != "FP32" ||
		fmt.Sprint(md.Inputs[0].Shape) != "[-1 4]" || md.Outputs[0].Name != "probability" {
		t.Errorf("ModelMetadata: %v", md)
	}
}

// TestInferParityREST sends XGBoost's fixture rows (missing values as null) over REST
// and compares with XGBoost's own predictions.
func TestInferParityREST(t *testing.T) {
	h := startHost(t, testRepo(t), nil)
	f := readParity(t)
	rows, _ := json.Marshal(f.rows)
	body := fmt.Sprintf(`{"id":"parity-1","inputs":[{"name":"features","datatype":"FP32","shape":[%d,8],"data":%s}]}`, len(f.rows), rows)
	var out inferResponse
	resp := h.do(t, "POST", "/v2/models/parity/infer", body, nil, &out)
	if resp.StatusCode != 200 {
		t.Fatalf("infer: %d %s", resp.StatusCode, out.Error)
	}
	if out.ID != "parity-1" || out.ModelName != "parity" || out.ModelVersion != "v1" || resp.Header.Get(headers.ServedBy) != "parity/v1" {
		t.Errorf("envelope: id %q model %q version %q served-by %q", out.ID, out.ModelName, out.ModelVersion, resp.Header.Get(headers.ServedBy))
	}
	if len(out.Outputs) != 1 || fmt.Sprint(out.Outputs[0].Shape) != fmt.Sprintf("[%d]", len(f.rows)) {
		t.Fatalf("outputs: %+v", out.Outputs)
	}
	for i, want := range f.preds {
		if d := math.Abs(out.Outputs[0].Data[i] - want); d > 1e-6 {
			t.Errorf("row %d: %v, xgboost %v", i, out.Outputs[0].Data[i], want)
		}
	}
}

// TestInferParityGRPC does the same over gRPC with typed contents and raw contents.
func TestInferParityGRPC(t *testing.T) {
	h := startHost(t, testRepo(t), nil)
	f := readParity(t)
	x := f.flat()
	n := int64(len(f.rows))
	typed := &oip.ModelInferRequest{ModelName: "parity", Id: "g1", Inputs: []*oip.ModelInferRequest_InferInputTensor{{
		Name: "features", Datatype: "FP32", Shape: []int64{n, 8}, Contents: &oip.InferTensorContents{Fp32Contents: x}}}}
	var hdr metadata.MD
	resp, err := h.grpc.ModelInfer(context.Background(), typed, grpc.Header(&hdr))
	if err != nil {
		t.Fatal(err)
	}
	if resp.Id != "g1" || resp.ModelVersion != "v1" || fmt.Sprint(hdr.Get(headers.ServedBy)) != "[parity/v1]" {
		t.Errorf("envelope: %q %q %v", resp.Id, resp.ModelVersion, hdr)
	}
	got := resp.Outputs[0].Contents.Fp32Contents
	raw := make([]byte, 0, 4*len(x))
	for _, v := range x {
		raw = binary.LittleEndian.AppendUint32(raw, math.Float32bits(v))
	}
	rawReq := &oip.ModelInferRequest{ModelName: "parity", Inputs: []*oip.ModelInferRequest_InferInputTensor{{
		Name: "features", Datatype: "FP32", Shape: []int64{n, 8}}}, RawInputContents: [][]byte{raw}}
	rresp, err := h.grpc.ModelInfer(context.Background(), rawReq)
	if err != nil {
		t.Fatal(err)
	}
	if len(rresp.RawOutputContents) != 1 || len(rresp.RawOutputContents[0]) != 4*len(f.preds) {
		t.Fatalf("raw outputs: %v", rresp.RawOutputContents)
	}
	for i, want := range f.preds {
		rv := math.Float32frombits(binary.LittleEndian.Uint32(rresp.RawOutputContents[0][4*i:]))
		if math.Abs(float64(got[i])-want) > 1e-6 || math.Abs(float64(rv)-want) > 1e-6 {
			t.Errorf("row %d: typed %v raw %v, xgboost %v", i, got[i], rv, want)
		}
	}
}

// TestExampleModelsMatchXGBoost checks ranker v7 and v8 against XGBoost's predictions
// for the same probe row, and that the two versions differ visibly.
func TestExampleModelsMatchXGBoost(t *testing.T) {
	h := startHost(t, testRepo(t), nil)
	seen := map[string]float64{}
	for _, v := range []string{"v7", "v8"} {
		raw, err := os.ReadFile(filepath.Join(fixtures, "examples", "ranker-"+v+".json"))
		if err != nil {
			t.Fatal(err)
		}
		var probe struct {
			Rows        [][]float64 `json:"rows"`
			Predictions []float64   `json:"predictions"`
		}
		if err := json.Unmarshal(raw, &probe); err != nil {
			t.Fatal(err)
		}
		rows, _ := json.Marshal(probe.Rows)
		var out inferResponse
		h.do(t, "POST", "/v2/models/ranker/versions/"+v+"/infer",
			`{"inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":`+string(rows)+`}]}`, nil, &out)
		if len(out.Outputs) != 1 || math.Abs(out.Outputs[0].Data[0]-probe.Predictions[0]) > 1e-6 {
			t.Fatalf("ranker %s: %+v, xgboost %v", v, out, probe.Predictions)
		}
		seen[v] = out.Outputs[0].Data[0]
	}
	if math.Abs(seen["v7"]-seen["v8"]) < 0.05 {
		t.Errorf("ranker v7 %v and v8 %v barely differ", seen["v7"], seen["v8"])
	}
}

// TestVersionSelection: x-patchbay-version (the router's choice) > path version > the
// repository's default (ranker v7 has default: true although v8 is higher; churn has
// none, so v2, the highest); a path version that conflicts with the router's is refused.
func TestVersionSelection(t *testing.T) {
	h := startHost(t, testRepo(t), nil)
	const ranker = `{"inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":[0,0,0,0,0,0,0,0]}]}`
	const churn = `{"inputs":[{"name":"features","datatype":"FP32","shape":[1,4],"data":[1,1,1,1]}]}`
	for _, tc := range []struct {
		path, header, body, want string
	}{
		{"/v2/models/ranker/infer", "", ranker, "v7"},
		{"/v2/models/ranker/infer", "v8", ranker, "v8"},
		{"/v2/models/ranker/versions/v8/infer", "", ranker, "v8"},
		{"/v2/models/ranker/versions/v8/infer", "v8", ranker, "v8"},
		{"/v2/models/ranker/versions/v7/infer", "v8", ranker, "400"}, // the path won before issue 9
		{"/v2/models/churn/infer", "", churn, "v2"},
		{"/v2/models/churn/infer", "v1", churn, "v1"},
	} {
		hdr := map[string]string{}
		if tc.header != "" {
			hdr[headers.Version] = tc.header
		}
		var out inferResponse
		resp := h.do(t, "POST", tc.path, tc.body, hdr, &out)
		if tc.want == "400" {
			if resp.StatusCode != 400 || !strings.Contains(out.Error, `path names version "v7" but the router chose "v8"`) {
				t.Errorf("%s (header %q): %d %q, want 400 naming both versions", tc.path, tc.header, resp.StatusCode, out.Error)
			}
			continue
		}
		if resp.StatusCode != 200 || out.ModelVersion != tc.want || !strings.HasSuffix(resp.Header.Get(headers.ServedBy), "/"+tc.want) {
			t.Errorf("%s (header %q): %d version %q served-by %q, want %s", tc.path, tc.header, resp.StatusCode, out.ModelVersion, resp.Header.Get(headers.ServedBy), tc.want)
		}
	}
	// gRPC: model and version from metadata when the message leaves them empty.
	ctx := metadata.AppendToOutgoingContext(context.Background(), headers.Model, "churn", headers.Version, "v1")
	resp, err := h.grpc.ModelInfer(ctx, &oip.ModelInferRequest{Inputs: []*oip.ModelInferRequest_InferInputTensor{{
		Name: "features", Datatype: "FP32", Shape: []int64{1, 4}, Contents: &oip.InferTensorContents{Fp32Contents: []float32{1, 1, 1, 1}}}}})
	if err != nil || resp.ModelName != "churn" || resp.ModelVersion != "v1" {
		t.Errorf("gRPC via metadata: %v %v", resp, err)
	}
	// The router's choice wins: a message naming another version is refused, not obeyed.
	_, err = h.grpc.ModelInfer(ctx, &oip.ModelInferRequest{ModelName: "churn", ModelVersion: "v2", Inputs: []*oip.ModelInferRequest_InferInputTensor{{
		Name: "features", Datatype: "FP32", Shape: []int64{1, 4}, Contents: &oip.InferTensorContents{Fp32Contents: []float32{1, 1, 1, 1}}}}})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("model_version v2 against a routed v1: %v, want InvalidArgument", err)
	}
}

func TestRequestedOutputsHonoured(t *testing.T) {
	h := startHost(t, testRepo(t), nil)
	var out inferResponse
	h.do(t, "POST", "/v2/models/recs/infer",
		`{"inputs":[{"name":"user_id","datatype":"INT64","shape":[2],"data":[3,4]}],"outputs":[{"name":"scores"}]}`, nil, &out)
	if len(out.Outputs) != 1 || out.Outputs[0].Name != "scores" || fmt.Sprint(out.Outputs[0].Shape) != "[2 5]" {
		t.Fatalf("outputs: %+v", out.Outputs)
	}
	for i := 1; i < 5; i++ {
		if out.Outputs[0].Data[i] > out.Outputs[0].Data[i-1] {
			t.Errorf("scores not best-first: %v", out.Outputs[0].Data[:5])
		}
	}
	resp, err := h.grpc.ModelInfer(context.Background(), &oip.ModelInferRequest{ModelName: "recs",
		Inputs:  []*oip.ModelInferRequest_InferInputTensor{{Name: "user_id", Datatype: "INT64", Shape: []int64{1}, Contents: &oip.InferTensorContents{Int64Contents: []int64{3}}}},
		Outputs: []*oip.ModelInferRequest_InferRequestedOutputTensor{{Name: "item_ids"}}})
	if err != nil || len(resp.Outputs) != 1 || resp.Outputs[0].Name != "item_ids" || len(resp.Outputs[0].Contents.Int64Contents) != 5 {
		t.Fatalf("gRPC outputs: %v %v", resp, err)
	}
	if resp.Outputs[0].Contents.Int64Contents[0] < 1001 {
		t.Errorf("item ids: %v", resp.Outputs[0].Contents.Int64Contents)
	}
}

func TestBadInputREST(t *testing.T) {
	h := startHost(t, testRepo(t), func(c *modelhost.Config) { c.MaxBodyBytes = 4096 })
	row := `[0,0,0,0,0,0,0,0]`
	for _, tc := range []struct {
		name, path, body string
		status           int
		msg              string
		hdr              map[string]string
		method           string // default POST for infer and repository paths, else GET
		admin            bool   // send to the admin listener
		allow            string // want this Allow header
	}{
		{"version conflict", "/v2/models/ranker/versions/v7/infer", `{}`, 400, `router chose "v8"`, map[string]string{headers.Version: "v8"}, "", false, ""},
		{"routed model differs", "/v2/models/ranker/infer", `{}`, 400, `request names model "ranker" but x-patchbay-model names "churn"`, map[string]string{headers.Model: "churn"}, "", false, ""},
		{"routed model differs on metadata", "/v2/models/ranker", ``, 400, `x-patchbay-model names "churn"`, map[string]string{headers.Model: "churn"}, "", false, ""},
		{"repository on the inference port", "/v2/repository/models/ranker/unload", ``, 403, "only on the model host's admin listener", nil, "", false, ""},
		{"repository index on the inference port", "/v2/repository/index", `{}`, 403, "only on the model host's admin listener", nil, "", false, ""},
		{"not json", "/v2/models/ranker/infer", `{"inputs":`, 400, "unexpected end of input", nil, "", false, ""},
		{"unknown model", "/v2/models/nope/infer", `{}`, 404, `model "nope" not found`, nil, "", false, ""},
		{"unknown version", "/v2/models/ranker/versions/v1/infer", `{}`, 404, `has no version "v1"`, nil, "", false, ""},
		{"no inputs", "/v2/models/ranker/infer", `{"inputs":[]}`, 400, "no inputs", nil, "", false, ""},
		{"wrong input name", "/v2/models/ranker/infer", `{"inputs":[{"name":"feats","datatype":"FP32","shape":[1,8],"data":` + row + `}]}`, 400, `missing input "features"`, nil, "", false, ""},
		{"extra input", "/v2/models/ranker/infer", `{"inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":` + row + `},{"name":"x","datatype":"FP32","shape":[1],"data":[1]}]}`, 400, `unknown input "x"`, nil, "", false, ""},
		{"wrong datatype", "/v2/models/ranker/infer", `{"inputs":[{"name":"features","datatype":"FP64","shape":[1,8],"data":` + row + `}]}`, 400, "datatype FP64, model expects FP32", nil, "", false, ""},
		{"wrong width", "/v2/models/ranker/infer", `{"inputs":[{"name":"features","datatype":"FP32","shape":[1,7],"data":[0,0,0,0,0,0,0]}]}`, 400, "model expects [-1, 8]", nil, "", false, ""},
		{"wrong rank", "/v2/models/ranker/infer", `{"inputs":[{"name":"features","datatype":"FP32","shape":[8],"data":` + row + `}]}`, 400, "has rank 1", nil, "", false, ""},
		{"count mismatch", "/v2/models/ranker/infer", `{"inputs":[{"name":"features","datatype":"FP32","shape":[2,8],"data":` + row + `}]}`, 400, "needs 16 elements, got 8", nil, "", false, ""},
		{"string in FP32", "/v2/models/ranker/infer", `{"inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":["a",0,0,0,0,0,0,0]}]}`, 400, "not a FP32", nil, "", false, ""},
		{"float for INT64", "/v2/models/recs/infer", `{"inputs":[{"name":"user_id","datatype":"INT64","shape":[1],"data":[1.5]}]}`, 400, "is not a INT64", nil, "", false, ""},
		{"unknown output", "/v2/models/ranker/infer", `{"inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":` + row + `}],"outputs":[{"name":"prob"}]}`, 400, `unknown output "prob"`, nil, "", false, ""},
		{"too large", "/v2/models/ranker/infer", `{"inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":[` + strings.Repeat("0,", 3000) + `0]}]}`, 413, "exceeds the limit", nil, "", false, ""},
		{"huge shape", "/v2/models/ranker/infer", `{"inputs":[{"name":"features","datatype":"FP32","shape":[100000000000,8],"data":[0]}]}`, 400, "elements", nil, "", false, ""},
		{"negative shape", "/v2/models/ranker/infer", `{"inputs":[{"name":"features","datatype":"FP32","shape":[-1,8],"data":[0]}]}`, 400, "non-negative", nil, "", false, ""},
		// Wrong methods and unknown paths answer OIP JSON errors, not net/http's plain text.
		{"GET on infer", "/v2/models/ranker/infer", ``, 405, "method GET is not allowed on /v2/models/ranker/infer (allowed: POST)", nil, "GET", false, "POST"},
		{"PUT on versioned infer", "/v2/models/ranker/versions/v7/infer", `{}`, 405, "not allowed", nil, "PUT", false, "POST"},
		{"DELETE on health", "/v2/health/live", ``, 405, "method DELETE is not allowed on /v2/health/live", nil, "DELETE", false, "GET, HEAD"},
		{"POST on metadata", "/v2/models/ranker", `{}`, 405, "not allowed", nil, "POST", false, "GET, HEAD"},
		{"POST on server metadata", "/v2", `{}`, 405, "not allowed", nil, "POST", false, "GET, HEAD"},
		{"unknown path", "/v1/models/ranker:predict", `{}`, 404, "POST /v1/models/ranker:predict is not an OIP endpoint", nil, "POST", false, ""},
		{"unknown path under models", "/v2/models/ranker/explain", `{}`, 404, "is not an OIP endpoint", nil, "POST", false, ""},
		{"root", "/", ``, 404, "GET / is not an OIP endpoint", nil, "GET", false, ""},
		{"admin: DELETE on health", "/v2/health/live", ``, 405, "method DELETE is not allowed", nil, "DELETE", true, "GET, HEAD"},
		{"admin: GET on unload", "/v2/repository/models/ranker/unload", ``, 405, "method GET is not allowed", nil, "GET", true, "POST"},
		{"admin: POST on metrics", "/metrics", ``, 405, "not allowed", nil, "POST", true, "GET, HEAD"},
		{"admin: unknown path", "/v2/models/ranker/infer", `{}`, 404, "not served on the admin listener", nil, "POST", true, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out inferResponse
			method := tc.method
			if method == "" {
				method = "POST"
				if !strings.HasSuffix(tc.path, "infer") && !strings.Contains(tc.path, "repository") {
					method = "GET"
				}
			}
			base := h.url
			if tc.admin {
				base = h.admin
			}
			resp := h.doURL(t, base, method, tc.path, tc.body, tc.hdr, &out)
			if resp.StatusCode != tc.status || !strings.Contains(out.Error, tc.msg) {
				t.Errorf("%d %q, want %d and an error containing %q", resp.StatusCode, out.Error, tc.status, tc.msg)
			}
			if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q, want application/json", ct)
			}
			if got := resp.Header.Get("Allow"); got != tc.allow {
				t.Errorf("Allow %q, want %q", got, tc.allow)
			}
		})
	}
	// Still serving after all of that.
	var ok inferResponse
	if r := h.do(t, "POST", "/v2/models/ranker/infer", `{"inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":`+row+`}]}`, nil, &ok); r.StatusCode != 200 {
		t.Fatalf("good request after bad ones: %d %s", r.StatusCode, ok.Error)
	}
}

func TestBadInputGRPC(t *testing.T) {
	h := startHost(t, testRepo(t), nil)
	f32 := func(n int) *oip.InferTensorContents {
		return &oip.InferTensorContents{Fp32Contents: make([]float32, n)}
	}
	in := func(name, dt string, shape []int64, c *oip.InferTensorContents) []*oip.ModelInferRequest_InferInputTensor {
		return []*oip.ModelInferRequest_InferInputTensor{{Name: name, Datatype: dt, Shape: shape, Contents: c}}
	}
	for _, tc := range []struct {
		name string
		req  *oip.ModelInferRequest
		code codes.Code
		msg  string
		md   []string
	}{
		{"routed model differs", &oip.ModelInferRequest{ModelName: "ranker", Inputs: in("features", "FP32", []int64{1, 8}, f32(8))}, codes.InvalidArgument, `x-patchbay-model names "churn"`, []string{headers.Model, "churn"}},
		{"routed model repeated", &oip.ModelInferRequest{Inputs: in("features", "FP32", []int64{1, 8}, f32(8))}, codes.InvalidArgument, "given 2 times", []string{headers.Model, "ranker", headers.Model, "ranker"}},
		{"routed version repeated", &oip.ModelInferRequest{ModelName: "ranker", Inputs: in("features", "FP32", []int64{1, 8}, f32(8))}, codes.InvalidArgument, "given 2 times", []string{headers.Version, "v7", headers.Version, "v8"}},
		{"no model", &oip.ModelInferRequest{}, codes.InvalidArgument, "model_name is empty", nil},
		{"unknown model", &oip.ModelInferRequest{ModelName: "nope"}, codes.NotFound, "not found", nil},
		{"no contents", &oip.ModelInferRequest{ModelName: "ranker", Inputs: in("features", "FP32", []int64{1, 8}, nil)}, codes.InvalidArgument, "no contents", nil},
		{"wrong contents field", &oip.ModelInferRequest{ModelName: "ranker", Inputs: in("features", "FP32", []int64{1, 8}, &oip.InferTensorContents{Fp64Contents: make([]float64, 8)})}, codes.InvalidArgument, "takes fp32_contents", nil},
		{"bad datatype", &oip.ModelInferRequest{ModelName: "ranker", Inputs: in("features", "FLOAT", []int64{1, 8}, f32(8))}, codes.InvalidArgument, "unknown datatype", nil},
		{"count mismatch", &oip.ModelInferRequest{ModelName: "ranker", Inputs: in("features", "FP32", []int64{2, 8}, f32(8))}, codes.InvalidArgument, "needs 16 elements", nil},
		{"negative dim", &oip.ModelInferRequest{ModelName: "ranker", Inputs: in("features", "FP32", []int64{-1, 8}, f32(8))}, codes.InvalidArgument, "want >= 0", nil},
		{"raw length", &oip.ModelInferRequest{ModelName: "ranker", Inputs: in("features", "FP32", []int64{1, 8}, nil), RawInputContents: [][]byte{make([]byte, 31)}}, codes.InvalidArgument, "needs 32", nil},
		{"raw and typed", &oip.ModelInferRequest{ModelName: "ranker", Inputs: in("features", "FP32", []int64{1, 8}, f32(8)), RawInputContents: [][]byte{make([]byte, 32)}}, codes.InvalidArgument, "both set", nil},
		{"raw count", &oip.ModelInferRequest{ModelName: "ranker", Inputs: in("features", "FP32", []int64{1, 8}, nil), RawInputContents: [][]byte{make([]byte, 32), {}}}, codes.InvalidArgument, "2 entries for 1 inputs", nil},
		{"unknown output", &oip.ModelInferRequest{ModelName: "ranker", Inputs: in("features", "FP32", []int64{1, 8}, f32(8)), Outputs: []*oip.ModelInferRequest_InferRequestedOutputTensor{{Name: "x"}}}, codes.InvalidArgument, `unknown output "x"`, nil},
		{"huge shape", &oip.ModelInferRequest{ModelName: "ranker", Inputs: in("features", "FP32", []int64{math.MaxInt64, 8}, f32(8))}, codes.InvalidArgument, "elements", nil},
		{"INT64 for recs as INT32", &oip.ModelInferRequest{ModelName: "recs", Inputs: in("user_id", "INT32", []int64{1}, &oip.InferTensorContents{IntContents: []int32{1}})}, codes.InvalidArgument, "datatype INT32, model expects INT64", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			if tc.md != nil {
				ctx = metadata.AppendToOutgoingContext(ctx, tc.md...)
			}
			_, err := h.grpc.ModelInfer(ctx, tc.req)
			if status.Code(err) != tc.code || !strings.Contains(status.Convert(err).Message(), tc.msg) {
				t.Errorf("got %v, want %v containing %q", err, tc.code, tc.msg)
			}
		})
	}
	// The repository calls are refused on the inference port, whoever asks.
	if _, err := h.grpc.RepositoryModelUnload(h.adminCtx(), &oip.RepositoryModelUnloadRequest{ModelName: "ranker"}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("RepositoryModelUnload on the inference port: %v, want PermissionDenied", err)
	}
	if _, err := h.grpc.RepositoryIndex(context.Background(), &oip.RepositoryIndexRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("RepositoryIndex on the inference port: %v, want PermissionDenied", err)
	}
	if _, err := h.grpc.ModelMetadata(metadata.AppendToOutgoingContext(context.Background(), headers.Model, "churn"), &oip.ModelMetadataRequest{Name: "ranker"}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("ModelMetadata of ranker routed as churn: %v, want InvalidArgument", err)
	}
	if r, err := h.grpc.ServerLive(context.Background(), &oip.ServerLiveRequest{}); err != nil || !r.Live {
		t.Fatal("host not live after bad input")
	}
	_ = http.StatusOK
}

// TestRoutedVersionForMetadataAndReady: metadata and readiness answer for the version the
// request is routed to, with infer's precedence: the router's x-patchbay-version wins over
// the default, and a path (REST) or message (gRPC) version that conflicts with it is refused
// 400 / INVALID_ARGUMENT. ranker has v7 (the default), v8, and v9, which fails to load.
// Before the fix both ignored the header and answered for v7: ready 200 and all versions.
func TestRoutedVersionForMetadataAndReady(t *testing.T) {
	repo := testRepo(t)
	writeFile(t, filepath.Join(repo, "ranker", "v9", "model.yaml"), `runtime: xgboost
artifact: missing.json
inputs:  [{name: features, datatype: FP32, shape: [-1, 8]}]
outputs: [{name: score, datatype: FP32, shape: [-1]}]
`)
	h := startHost(t, repo, nil)
	for _, tc := range []struct {
		path, header string
		code         int
		want         string // a substring of the body
	}{
		{"/v2/models/ranker/ready", "", 200, `"ready":true`},
		{"/v2/models/ranker/ready", "v9", 503, `"ready":false`},
		{"/v2/models/ranker/versions/v9/ready", "v9", 503, `"ready":false`},
		{"/v2/models/ranker/ready", "v99", 404, `no version \"v99\"`},
		{"/v2/models/ranker/versions/v7/ready", "v9", 400, `router chose \"v9\"`},
		{"/v2/models/ranker", "", 200, `"versions":["v7","v8","v9"]`},
		{"/v2/models/ranker", "v8", 200, `"versions":["v8"]`},
		{"/v2/models/ranker", "v9", 503, `not ready`},
		{"/v2/models/ranker/versions/v7", "v8", 400, `router chose \"v8\"`},
	} {
		hdr := map[string]string{}
		if tc.header != "" {
			hdr[headers.Version] = tc.header
		}
		resp := h.do(t, "GET", tc.path, "", hdr, nil)
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != tc.code || !strings.Contains(string(body), tc.want) {
			t.Errorf("GET %s (%s %q): %d %s, want %d with %s", tc.path, headers.Version, tc.header, resp.StatusCode, body, tc.code, tc.want)
		}
	}
	routed := func(v string) context.Context {
		return metadata.AppendToOutgoingContext(context.Background(), headers.Version, v)
	}
	if r, err := h.grpc.ModelReady(routed("v9"), &oip.ModelReadyRequest{Name: "ranker"}); err != nil || r.Ready {
		t.Errorf("ModelReady routed to the failed v9: %v %v, want not ready", r, err)
	}
	if r, err := h.grpc.ModelReady(context.Background(), &oip.ModelReadyRequest{Name: "ranker"}); err != nil || !r.Ready {
		t.Errorf("ModelReady, default version: %v %v, want ready", r, err)
	}
	if _, err := h.grpc.ModelReady(routed("v9"), &oip.ModelReadyRequest{Name: "ranker", Version: "v7"}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("ModelReady version v7 routed to v9: %v, want InvalidArgument", err)
	}
	if r, err := h.grpc.ModelMetadata(routed("v8"), &oip.ModelMetadataRequest{Name: "ranker"}); err != nil || fmt.Sprint(r.GetVersions()) != "[v8]" {
		t.Errorf("ModelMetadata routed to v8: %v %v, want versions [v8]", r, err)
	}
	if _, err := h.grpc.ModelMetadata(routed("v8"), &oip.ModelMetadataRequest{Name: "ranker", Version: "v7"}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("ModelMetadata version v7 routed to v8: %v, want InvalidArgument", err)
	}
	if _, err := h.grpc.ModelMetadata(metadata.AppendToOutgoingContext(context.Background(), headers.Version, "v7", headers.Version, "v8"),
		&oip.ModelMetadataRequest{Name: "ranker"}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("ModelMetadata with %s twice: %v, want InvalidArgument", headers.Version, err)
	}
}
