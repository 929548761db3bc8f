package oiphost

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/patchbay-io/patchbay/api/oip"
)

// TestHonoursOnlyTheRequest: over real REST and gRPC, the stand-in runs the version the
// path (or the gRPC message) names, ignores x-patchbay-version, and answers a request that
// names no version with its default — as an unmodified OIP server would.
func TestHonoursOnlyTheRequest(t *testing.T) {
	h := Start(t, "ranker", "v7", "v8")
	post := func(path, hdr string) (int, inferResponse) {
		t.Helper()
		req, _ := http.NewRequest("POST", "http://"+h.HTTP+path, strings.NewReader(`{"inputs":[]}`))
		req.Header.Set("Content-Type", "application/json")
		if hdr != "" {
			req.Header.Set("x-patchbay-version", hdr)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var out inferResponse
		_ = json.NewDecoder(resp.Body).Decode(&out)
		return resp.StatusCode, out
	}
	for _, c := range []struct {
		path, hdr, want string
		code            int
	}{
		{"/v2/models/ranker/versions/v8/infer", "", "v8", 200},
		{"/v2/models/ranker/versions/v8/infer", "v7", "v8", 200},
		{"/v2/models/ranker/infer", "v8", "v7", 200}, // the header is ignored: default
		{"/v2/models/ranker/versions/v9/infer", "", "", 404},
		{"/v2/models/other/infer", "", "", 404},
	} {
		code, out := post(c.path, c.hdr)
		if code != c.code || out.ModelVersion != c.want || (c.code == 200 && out.Outputs[0].Data[0] != c.want) {
			t.Errorf("%s (header %q): %d %+v, want %d %s", c.path, c.hdr, code, out, c.code, c.want)
		}
	}
	if h.Served("v7") != 1 || h.Served("v8") != 2 || h.Unversioned() != 1 || h.VersionHeaders() != 2 {
		t.Errorf("counts: v7 %d v8 %d unversioned %d headers %d", h.Served("v7"), h.Served("v8"), h.Unversioned(), h.VersionHeaders())
	}

	conn, err := grpc.NewClient(h.GRPC, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := oip.NewGRPCInferenceServiceClient(conn)
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "x-patchbay-version", "v8"), 5*time.Second)
	defer cancel()
	r, err := c.ModelInfer(ctx, &oip.ModelInferRequest{ModelName: "ranker"})
	if err != nil || r.GetModelVersion() != "v7" {
		t.Errorf("gRPC with only the metadata naming v8: %v %v, want the default v7", r, err)
	}
	r, err = c.ModelInfer(ctx, &oip.ModelInferRequest{ModelName: "ranker", ModelVersion: "v8"})
	if err != nil || r.GetModelVersion() != "v8" || string(r.GetOutputs()[0].GetContents().GetBytesContents()[0]) != "v8" {
		t.Errorf("gRPC naming v8 in the message: %v %v", r, err)
	}
	if resp, err := http.Get("http://" + h.HTTP + "/v2/models/ranker/versions/v8/ready"); err != nil || resp.StatusCode != 200 {
		t.Errorf("versioned ready: %v %v", resp, err)
	}
}
