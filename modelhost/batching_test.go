package modelhost_test

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// TestBatchedMatchesXGBoost: 64 clients each send one fixture row at once to a model
// with dynamic batching; every answer equals XGBoost's for that row, and the batch-size
// metric shows the rows were merged into fewer, larger model calls.
func TestBatchedMatchesXGBoost(t *testing.T) {
	repo := testRepo(t)
	dir := filepath.Join(repo, "parity-batched", "v1")
	copyDir(t, filepath.Join(fixtures, "binary"), dir)
	writeFile(t, filepath.Join(dir, "model.yaml"), `runtime: xgboost
inputs:  [{name: features, datatype: FP32, shape: [-1, 8]}]
outputs: [{name: score, datatype: FP32, shape: [-1]}]
batching: {max_batch_size: 16, max_delay: 20ms, instances: 1}
`)
	h := startHost(t, repo, nil)
	f := readParity(t)
	var wg sync.WaitGroup
	errs := make(chan error, len(f.rows))
	for i, row := range f.rows {
		wg.Add(1)
		go func() {
			defer wg.Done()
			data, _ := json.Marshal(row)
			body := fmt.Sprintf(`{"id":"%d","inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":%s}]}`, i, data)
			resp, err := http.Post(h.url+"/v2/models/parity-batched/infer", "application/json", strings.NewReader(body))
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			var out inferResponse
			if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || resp.StatusCode != 200 {
				errs <- fmt.Errorf("row %d: %d %v %s", i, resp.StatusCode, err, out.Error)
				return
			}
			if out.ID != strconv.Itoa(i) || len(out.Outputs) != 1 || len(out.Outputs[0].Data) != 1 {
				errs <- fmt.Errorf("row %d: %+v", i, out)
				return
			}
			if d := math.Abs(out.Outputs[0].Data[0] - f.preds[i]); d > 1e-6 {
				errs <- fmt.Errorf("row %d: %v, xgboost %v", i, out.Outputs[0].Data[0], f.preds[i])
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	resp, err := http.Get(h.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	text, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	sum := regexp.MustCompile(`patchbay_modelhost_batch_size_sum\{model="parity-batched",version="v1"\} (\d+)`).FindSubmatch(text)
	count := regexp.MustCompile(`patchbay_modelhost_batch_size_count\{model="parity-batched",version="v1"\} (\d+)`).FindSubmatch(text)
	if sum == nil || count == nil {
		t.Fatalf("no batch-size series for parity-batched")
	}
	rows, _ := strconv.Atoi(string(sum[1]))
	calls, _ := strconv.Atoi(string(count[1]))
	if rows != len(f.rows) || calls >= rows {
		t.Errorf("%d rows in %d model calls: want all %d rows and fewer calls than rows", rows, calls, len(f.rows))
	}
	t.Logf("%d concurrent single-row requests served by %d model calls", rows, calls)
}
