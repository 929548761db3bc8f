package modelhost_test

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/patchbay-io/patchbay/api/contract"
	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/modelhost"
)

// contractRepo holds:
//   - lin/v1: linear over x FP32 [-1, 4], contract x FP32 [-1, 4] (kept);
//   - strict/v1: the same model, contract x FP32 [1, 4]: the version's metadata ([-1, 4])
//     breaks it, so it loads with the breach in its index row, and a 2-row request its
//     model.yaml accepts is refused by the contract;
//   - feat/v1: linear over x FP32 [-1, 2] filled from headers x-a and x-b, contract
//     x FP32 [-1, 2]: a client may leave x out.
func contractRepo(t testing.TB) string {
	repo := t.TempDir()
	lin := func(model, cols, features, con string) {
		d := filepath.Join(repo, model, "v1")
		w := "[0.5, -0.25, 1, 2]"
		if cols == "2" {
			w = "[0.5, -0.25]"
		}
		writeFile(t, filepath.Join(d, "model.yaml"), `runtime: linear
artifact: linear.json
inputs:  [{name: x, datatype: FP32, shape: [-1, `+cols+`]}]
outputs: [{name: p, datatype: FP32, shape: [-1]}]
`+features)
		writeFile(t, filepath.Join(d, "linear.json"), `{"link": "logistic", "weights": `+w+`, "bias": 0.1}`)
		writeFile(t, filepath.Join(repo, model, "contract.yaml"), con)
	}
	lin("lin", "4", "", "inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]\noutputs: [{name: p, datatype: FP32, shape: [-1]}]\n")
	lin("strict", "4", "", "inputs: [{name: x, datatype: FP32, shape: [1, 4]}]\n")
	lin("feat", "2", `features:
  - {name: a, input: x, column: 0, source: header, header: x-a, default: 0}
  - {name: b, input: x, column: 1, source: header, header: x-b, default: 0}
`, "inputs: [{name: x, datatype: FP32, shape: [-1, 2]}]\n")
	return repo
}

func logistic(z float64) float64 { return 1 / (1 + math.Exp(-z)) }

// refusals reads patchbay_modelhost_contract_refusals_total for one model/input.
func refusals(t *testing.T, h *host, model, input string) string {
	t.Helper()
	for _, l := range strings.Split(scrape(t, h.url), "\n") {
		if strings.HasPrefix(l, "patchbay_modelhost_contract_refusals_total{") && strings.Contains(l, `model="`+model+`"`) && strings.Contains(l, `input="`+input+`"`) {
			return l[strings.LastIndexByte(l, ' ')+1:]
		}
	}
	return "0"
}

func grpcX(name, dt string, shape []int64, xs []float32) *oip.ModelInferRequest_InferInputTensor {
	return &oip.ModelInferRequest_InferInputTensor{Name: name, Datatype: dt, Shape: shape, Contents: &oip.InferTensorContents{Fp32Contents: xs}}
}

// TestContractRequests: requests that keep the contract run unchanged; requests breaking
// a fixed dimension, the datatype or leaving a contracted input out are refused, over REST
// (400, OIP error JSON) and gRPC (InvalidArgument) with the same text naming the input and
// the expected shape, and counted per input.
func TestContractRequests(t *testing.T) {
	h := startHost(t, contractRepo(t), nil)

	// Conforming: the prediction is the model's.
	var out inferResponse
	resp := h.do(t, "POST", "/v2/models/lin/infer", `{"inputs":[{"name":"x","datatype":"FP32","shape":[2,4],"data":[1,2,3,4,0,0,0,0]}]}`, nil, &out)
	if resp.StatusCode != 200 || len(out.Outputs) != 1 || len(out.Outputs[0].Data) != 2 {
		t.Fatalf("conforming request: %d %+v", resp.StatusCode, out)
	}
	if want := logistic(0.5*1 - 0.25*2 + 1*3 + 2*4 + 0.1); math.Abs(out.Outputs[0].Data[0]-want) > 1e-6 || math.Abs(out.Outputs[0].Data[1]-logistic(0.1)) > 1e-6 {
		t.Errorf("prediction %v, want [%v %v]", out.Outputs[0].Data, want, logistic(0.1))
	}
	gr, err := h.grpc.ModelInfer(context.Background(), &oip.ModelInferRequest{ModelName: "lin",
		Inputs: []*oip.ModelInferRequest_InferInputTensor{grpcX("x", "FP32", []int64{1, 4}, []float32{1, 2, 3, 4})}})
	if err != nil || math.Abs(float64(gr.GetOutputs()[0].GetContents().GetFp32Contents()[0])-logistic(0.5*1-0.25*2+1*3+2*4+0.1)) > 1e-6 {
		t.Fatalf("conforming gRPC request: %v %v", gr, err)
	}

	cases := []struct {
		name, model, body string
		grpcIn            []*oip.ModelInferRequest_InferInputTensor
		want              string
	}{
		{"fixed dimension", "lin", `{"inputs":[{"name":"x","datatype":"FP32","shape":[1,5],"data":[1,2,3,4,5]}]}`,
			[]*oip.ModelInferRequest_InferInputTensor{grpcX("x", "FP32", []int64{1, 5}, []float32{1, 2, 3, 4, 5})},
			`input "x": shape [1 5], the contract fixes dimension 1 at 4 (expected [-1 4])`},
		{"datatype", "lin", `{"inputs":[{"name":"x","datatype":"FP64","shape":[1,4],"data":[1,2,3,4]}]}`,
			[]*oip.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP64", Shape: []int64{1, 4}, Contents: &oip.InferTensorContents{Fp64Contents: []float64{1, 2, 3, 4}}}},
			`input "x": datatype FP64, the contract says FP32 (expected FP32 [-1 4])`},
		{"missing", "lin", `{"inputs":[{"name":"y","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}`,
			[]*oip.ModelInferRequest_InferInputTensor{grpcX("y", "FP32", []int64{1, 4}, []float32{1, 2, 3, 4})},
			`input "x" is missing; the contract requires it (expected FP32 [-1 4])`},
		// model.yaml accepts 2 rows; the contract (which this version breaks) does not.
		{"contract stricter than model.yaml", "strict", `{"inputs":[{"name":"x","datatype":"FP32","shape":[2,4],"data":[1,2,3,4,1,2,3,4]}]}`,
			[]*oip.ModelInferRequest_InferInputTensor{grpcX("x", "FP32", []int64{2, 4}, []float32{1, 2, 3, 4, 1, 2, 3, 4})},
			`input "x": shape [2 4], the contract fixes dimension 0 at 1 (expected [1 4])`},
		{"filled input sent with a bad shape", "feat", `{"inputs":[{"name":"x","datatype":"FP32","shape":[1,3],"data":[1,2,3]}]}`,
			[]*oip.ModelInferRequest_InferInputTensor{grpcX("x", "FP32", []int64{1, 3}, []float32{1, 2, 3})},
			`input "x": shape [1 3], the contract fixes dimension 1 at 2 (expected [-1 2])`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := refusals(t, h, c.model, "x")
			var e struct{ Error string }
			resp := h.do(t, "POST", "/v2/models/"+c.model+"/infer", c.body, nil, &e)
			if resp.StatusCode != http.StatusBadRequest || e.Error != c.want {
				t.Errorf("REST: %d %q, want 400 %q", resp.StatusCode, e.Error, c.want)
			}
			_, err := h.grpc.ModelInfer(context.Background(), &oip.ModelInferRequest{ModelName: c.model, Inputs: c.grpcIn})
			if st := status.Convert(err); st.Code() != codes.InvalidArgument || st.Message() != c.want {
				t.Errorf("gRPC: %v %q, want InvalidArgument %q", st.Code(), st.Message(), c.want)
			}
			var n0, n1 int
			fmt.Sscan(before, &n0)
			fmt.Sscan(refusals(t, h, c.model, "x"), &n1)
			if n1 != n0+2 {
				t.Errorf("patchbay_modelhost_contract_refusals_total{model=%q,input=\"x\"}: %d -> %d, want +2", c.model, n0, n1)
			}
		})
	}
	if !strings.Contains(scrape(t, h.url), `patchbay_modelhost_contract_refusals_total{input="x",model="lin",version="v1"} 6`) {
		t.Errorf("metric series for lin/v1 not 6:\n%s", grepLines(scrape(t, h.url), "contract_refusals"))
	}
}

// TestContractFeatureFilledInput: a contracted input the version fills from its features
// may be left out (REST and gRPC); the prediction uses the features.
func TestContractFeatureFilledInput(t *testing.T) {
	h := startHost(t, contractRepo(t), nil)
	want := logistic(0.5*2 - 0.25*4 + 0.1)
	var out inferResponse
	resp := h.do(t, "POST", "/v2/models/feat/infer", `{"inputs":[]}`, map[string]string{"x-a": "2", "x-b": "4"}, &out)
	if resp.StatusCode != 200 || len(out.Outputs) != 1 || math.Abs(out.Outputs[0].Data[0]-want) > 1e-6 {
		t.Fatalf("REST without the feature-filled input: %d %+v, want p=%v", resp.StatusCode, out, want)
	}
	ctx := metadata.AppendToOutgoingContext(context.Background(), "x-a", "2", "x-b", "4")
	gr, err := h.grpc.ModelInfer(ctx, &oip.ModelInferRequest{ModelName: "feat"})
	if err != nil || math.Abs(float64(gr.GetOutputs()[0].GetContents().GetFp32Contents()[0])-want) > 1e-6 {
		t.Fatalf("gRPC without the feature-filled input: %v %v", gr, err)
	}
	if n := refusals(t, h, "feat", "x"); n != "0" {
		t.Errorf("refusals counted for an omitted optional input: %s", n)
	}
}

// TestContractMetadataOptional: the REST metadata says per input whether a request may
// leave it out; gRPC ModelMetadata lists such inputs in x-patchbay-optional-inputs, present
// and empty when there are none. The control plane's contract.Check reads both.
func TestContractMetadataOptional(t *testing.T) {
	h := startHost(t, contractRepo(t), nil)
	for model, want := range map[string]bool{"feat": true, "lin": false} {
		var md contract.Metadata
		resp := h.do(t, "GET", "/v2/models/"+model+"/versions/v1", "", nil, &md)
		if resp.StatusCode != 200 || len(md.Inputs) != 1 || md.Inputs[0].Optional == nil || *md.Inputs[0].Optional != want {
			t.Errorf("%s REST metadata inputs %+v, want optional %v", model, md.Inputs, want)
		}
		if len(md.Outputs) != 1 || md.Outputs[0].Optional != nil {
			t.Errorf("%s REST metadata outputs %+v, want no optional on outputs", model, md.Outputs)
		}
		var hdr metadata.MD
		if _, err := h.grpc.ModelMetadata(context.Background(), &oip.ModelMetadataRequest{Name: model, Version: "v1"}, grpc.Header(&hdr)); err != nil {
			t.Fatal(err)
		}
		wantHdr := []string{""}
		if want {
			wantHdr = []string{"x"}
		}
		if got := hdr.Get(contract.OptionalInputsHeader); fmt.Sprintf("%q", got) != fmt.Sprintf("%q", wantHdr) {
			t.Errorf("%s gRPC %s: %q, want %q", model, contract.OptionalInputsHeader, got, wantHdr)
		}
	}
}

// TestContractBreachingVersion: a version whose metadata breaks its model's contract
// loads (the control plane holds it), with the breach logged and in the admin index.
func TestContractBreachingVersion(t *testing.T) {
	logs := &syncWriter{w: &bytes.Buffer{}}
	h := startHost(t, contractRepo(t), func(c *modelhost.Config) { c.Logger = zerolog.New(logs) })
	var rows []struct{ Name, Version, State, Reason string }
	h.adminDo(t, "POST", "/v2/repository/index", "", &rows)
	found := false
	for _, r := range rows {
		switch r.Name {
		case "strict":
			found = true
			if r.State != "READY" || !strings.Contains(r.Reason, `breaks contract.yaml: input "x": shape [-1 4], the contract fixes dimension 0 at 1`) {
				t.Errorf("strict index row %+v, want READY with the breach", r)
			}
		case "lin", "feat":
			if r.State != "READY" || r.Reason != "" {
				t.Errorf("%s index row %+v, want READY without reason", r.Name, r)
			}
		}
	}
	if !found {
		t.Errorf("no index row for strict: %+v", rows)
	}
	logs.mu.Lock()
	text := logs.w.(*bytes.Buffer).String()
	logs.mu.Unlock()
	if !strings.Contains(text, `"level":"warn","component":"modelhost","model":"strict","version":"v1","breach":"input \"x\": shape [-1 4], the contract fixes dimension 0 at 1`) {
		t.Errorf("no warning naming the breach logged:\n%s", text)
	}
}

// TestContractFile: a bad contract.yaml fails every version of its model with
// contract.yaml:LINE, the other models serve; the contract is re-read on a repository
// load (fixed: ready again; a new contract: applied to requests).
func TestContractFile(t *testing.T) {
	repo := contractRepo(t)
	file := filepath.Join(repo, "lin", "contract.yaml")
	writeFile(t, file, `inputs:
  - name: x
    datatype: FP33
    shape: [-1, -4]
outputs:
  - {name: p, datatype: FP32, shape: [-1], extra: 1}
`)
	h := startHost(t, repo, nil)
	var rows []struct{ Name, Version, State, Reason string }
	h.adminDo(t, "POST", "/v2/repository/index", "", &rows)
	for _, r := range rows {
		if r.Name == "lin" && (r.State != "UNAVAILABLE" || !strings.Contains(r.Reason, file+":6: field extra not found")) {
			t.Errorf("lin index row %+v, want UNAVAILABLE with %s:6", r, file)
		}
	}
	writeFile(t, file, `inputs:
  - name: x
    datatype: FP33
    shape: [-1, -4]
`)
	var e struct{ Error string }
	resp := h.adminDo(t, "POST", "/v2/repository/models/lin/load", "", &e)
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(e.Error, file+`:3: inputs[0].datatype: "FP33" is not an OIP datatype`) ||
		!strings.Contains(e.Error, file+`:4: inputs[0].shape[1]: -4: a dimension is -1`) {
		t.Errorf("load with a bad contract: %d %q", resp.StatusCode, e.Error)
	}
	row := `{"inputs":[{"name":"x","datatype":"FP32","shape":[2,4],"data":[1,2,3,4,1,2,3,4]}]}`
	if resp := h.do(t, "POST", "/v2/models/lin/infer", row, nil, &e); resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("lin with a bad contract answered %d %q, want 503", resp.StatusCode, e.Error)
	}
	if resp := h.do(t, "POST", "/v2/models/feat/infer", `{"inputs":[]}`, nil, nil); resp.StatusCode != 200 {
		t.Errorf("feat (good contract) answered %d", resp.StatusCode)
	}
	// Fixed, and stricter: re-read on load and applied.
	writeFile(t, file, "inputs: [{name: x, datatype: FP32, shape: [1, 4]}]\n")
	if resp := h.adminDo(t, "POST", "/v2/repository/models/lin/load", "", nil); resp.StatusCode != 200 {
		t.Fatalf("load with a fixed contract: %d", resp.StatusCode)
	}
	e.Error = ""
	if resp := h.do(t, "POST", "/v2/models/lin/infer", row, nil, &e); resp.StatusCode != 400 || !strings.Contains(e.Error, "the contract fixes dimension 0 at 1") {
		t.Errorf("new contract not applied: %d %q", resp.StatusCode, e.Error)
	}
	// An empty file is an error, not "no contract".
	writeFile(t, file, "")
	if resp := h.adminDo(t, "POST", "/v2/repository/models/lin/load", "", &e); resp.StatusCode != 400 || !strings.Contains(e.Error, file+":1: empty") {
		t.Errorf("empty contract: %d %q", resp.StatusCode, e.Error)
	}
	// Removed: requests are no longer checked against it.
	if err := os.Remove(file); err != nil {
		t.Fatal(err)
	}
	if resp := h.adminDo(t, "POST", "/v2/repository/models/lin/load", "", nil); resp.StatusCode != 200 {
		t.Fatalf("load without a contract: %d", resp.StatusCode)
	}
	if resp := h.do(t, "POST", "/v2/models/lin/infer", row, nil, nil); resp.StatusCode != 200 {
		t.Errorf("lin without a contract answered %d", resp.StatusCode)
	}
}

// FuzzParseContract: any contract.yaml either parses into a contract Validate accepts, or
// fails with every problem as "file:LINE: ..." ("file: ..." for a YAML syntax error yaml
// gives no line for), never a panic.
func FuzzParseContract(f *testing.F) {
	for _, s := range []string{
		"inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]\n",
		"inputs:\n  - name: x\n    datatype: FP33\n    shape: [-1, -4]\noutputs:\n  - {name: p, datatype: FP32, shape: [-1], extra: 1}\n",
		"outputs: [{name: p, datatype: BYTES, shape: [1]}, {name: p, datatype: FP32, shape: []}]\n",
		"inputs: &a [{name: x}]\noutputs: *a\n",
		"", "inputs: 3", "- a\n- b\n", "inputs: [{name: x, shape: [-2]}]\n", "0\r\r0",
	} {
		f.Add([]byte(s))
	}
	lineRE := regexp.MustCompile(`^contract\.yaml(:\d+)?: `)
	f.Fuzz(func(t *testing.T, raw []byte) {
		c, err := modelhost.ParseContract("contract.yaml", raw)
		if err == nil {
			if c == nil || len(contract.Validate(c)) > 0 {
				t.Fatalf("accepted %q as %+v", raw, c)
			}
			return
		}
		for _, l := range strings.Split(err.Error(), "\n") {
			if !lineRE.MatchString(l) {
				t.Fatalf("%q: error line %q is not file:line", raw, l)
			}
		}
	})
}
