package main

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/patchbay-io/patchbay/modelhost/runtime/onnx"
)

// TestUpFraudContract: the fraud example keeps one contract across two runtimes (v1
// XGBoost, v2 ONNX). Under up, the control plane reads both versions' metadata and finds
// each keeps it (v2 held as unreadable where ONNX Runtime cannot load), and a host refuses
// a request that breaks models/fraud/contract.yaml with an OIP error naming the input and
// the expected shape.
func TestUpFraudContract(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and starts the patchbay binary")
	}
	u := startUpForTest(t, "--redis-server", "off")
	type contractState struct{ State, Reason string }
	var got map[string]contractState
	_, libErr := onnx.FindLibrary("")
	onnxLoads := libErr == nil && onnx.Available
	deadline := time.Now().Add(20 * time.Second)
	checked := func() bool {
		resp, err := http.Get("http://" + u.xdsAdmin + "/status")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		var st struct {
			Models []struct {
				Name     string                   `json:"name"`
				Contract map[string]contractState `json:"contract"`
			} `json:"models"`
		}
		if json.NewDecoder(resp.Body).Decode(&st) != nil {
			return false
		}
		for _, m := range st.Models {
			if m.Name == "fraud" {
				got = m.Contract
			}
		}
		want2 := "ok"
		if !onnxLoads {
			want2 = "held"
		}
		return got["v1"].State == "ok" && got["v2"].State == want2
	}
	for !checked() {
		if time.Now().After(deadline) {
			t.Fatalf("fraud's versions not checked against its contract as expected within 20s: %+v (ONNX Runtime loads here: %v)", got, onnxLoads)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("fraud contract on /status: %+v (ONNX Runtime loads here: %v)", got, onnxLoads)

	resp, err := http.Post("http://"+u.hostHTTP[0]+"/v2/models/fraud/versions/v1/infer", "application/json",
		strings.NewReader(`{"inputs":[{"name":"x","datatype":"FP32","shape":[1,5],"data":[1,2,3,4,5]}]}`))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var e struct {
		Error string `json:"error"`
	}
	if resp.StatusCode != http.StatusBadRequest || json.Unmarshal(body, &e) != nil ||
		!strings.Contains(e.Error, `input "x"`) || !strings.Contains(e.Error, "[-1 6]") {
		t.Fatalf("a request breaking fraud's contract: %d %s, want 400 with an OIP error naming input \"x\" and [-1 6]", resp.StatusCode, body)
	}
}
