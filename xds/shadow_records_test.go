package xds

import (
	"context"
	"encoding/json"
	"math"
	"net/http"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	shadowv1 "github.com/patchbay-io/patchbay/api/shadow/v1"
)

// sendRecords streams records to the control plane's Records service on conn and returns
// the stream's end (its Summary and error).
func sendRecords(t *testing.T, conn *grpc.ClientConn, recs ...*shadowv1.Record) (*shadowv1.Summary, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := shadowv1.NewRecordsClient(conn).Send(ctx)
	if err != nil {
		return nil, err
	}
	for _, r := range recs {
		if err := st.Send(r); err != nil {
			break // the server ended the stream: CloseAndRecv says why
		}
	}
	return st.CloseAndRecv()
}

func record(id, version string, traffic shadowv1.Traffic, score float64) *shadowv1.Record {
	return &shadowv1.Record{RequestId: id, Model: "ranker", Version: version, Traffic: traffic,
		Outputs:        []*shadowv1.Output{{Name: "score", Values: []float64{score}}},
		LatencySeconds: 0.001, UnixNanos: time.Now().UnixNano()}
}

// TestShadowRecordsServedOnTheADSPort: the control plane serves the Records service on its
// ADS port; a live and a shadow record of the same request pair, and /status shows the
// comparison (pairs, the score difference), which the analysis's shadow gate reads.
func TestShadowRecordsServedOnTheADSPort(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002"}, "{v1: 100}", ""))
	c := startCP(t, dir)
	conn, err := grpc.NewClient(c.grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	sum, err := sendRecords(t, conn,
		record("r1", "v1", shadowv1.Traffic_TRAFFIC_LIVE, 0.25), record("r1", "v2", shadowv1.Traffic_TRAFFIC_SHADOW, 0.75),
		record("r2", "v1", shadowv1.Traffic_TRAFFIC_LIVE, 0.5), record("r2", "v2", shadowv1.Traffic_TRAFFIC_SHADOW, 0.5))
	if err != nil {
		t.Fatalf("send: %v", err)
	}
	t.Logf("summary: %v", sum)
	var st Status
	resp, err := http.Get("http://" + c.adminAddr + "/status")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatal(err)
	}
	if st.Shadow == nil || len(st.Shadow.Outputs) != 1 {
		t.Fatalf("/status shadow: %+v, want one compared output", st.Shadow)
	}
	r := st.Shadow.Outputs[0]
	if r.Model != "ranker" || r.Version != "v2" || r.Output != "score" || r.Pairs != 2 || r.MeanAbsDiff != 0.25 || r.MaxAbsDiff != 0.5 {
		t.Fatalf("/status shadow result %+v, want ranker v2 score: 2 pairs, mean |diff| 0.25, max 0.5", r)
	}
	agree, diff, pairs, ok := c.srv.shadowAgreement("ranker", "v2", "score")
	if !ok || pairs != 2 || diff != 0.25 || !math.IsNaN(agree) { // a score output has no class: NaN
		t.Fatalf("the analysis reads %v %v %v %v, want no class agreement (NaN), mean |diff| 0.25 over 2 pairs", agree, diff, pairs, ok)
	}
}

// TestShadowRecordsOnlyFromModelHosts: with client certificates required, a model host's
// certificate may send prediction records and an Envoy's may not.
func TestShadowRecordsOnlyFromModelHosts(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "ranker.yaml", rolloutDoc("ranker", map[string]string{"v1": "127.0.0.1:9001"}, "{v1: 100}", ""))
	p := newPKI(t)
	c := startTLSCP(t, dir, p)
	dial := func(role string) *grpc.ClientConn {
		conn, err := grpc.NewClient(c.grpcAddr, grpc.WithTransportCredentials(credentials.NewTLS(clientTLS(t, p.clients[role]))))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return conn
	}
	if _, err := sendRecords(t, dial("modelhost"), record("r1", "v1", shadowv1.Traffic_TRAFFIC_LIVE, 0.5)); err != nil {
		t.Fatalf("a model host's records were refused: %v", err)
	}
	_, err := sendRecords(t, dial("edge"), record("r2", "v1", shadowv1.Traffic_TRAFFIC_LIVE, 0.5))
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("an edge certificate sending records: %v, want PermissionDenied", err)
	}
}
