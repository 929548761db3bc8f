package modelhost_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/internal/telemetry"
	"github.com/patchbay-io/patchbay/modelhost"
)

const (
	examples = "../examples/models"
	fixtures = "../test/fixtures/xgboost"
)

// host is a model host started in-process on 127.0.0.1:0.
type host struct {
	srv  *modelhost.Server
	url  string
	grpc oip.GRPCInferenceServiceClient
	conn *grpc.ClientConn
	repo string
	logs *bytes.Buffer

	admin     string                         // http://addr of the admin listener
	adminGRPC oip.GRPCInferenceServiceClient // the admin listener over gRPC (h2c)
	token     string                         // the admin bearer token
	tokenFile string
	adminConn *grpc.ClientConn
}

// testToken is the admin bearer token startHost writes (48 bytes).
const testToken = "modelhost-test-token-0123456789abcdef0123456789"

// adminCtx carries the admin bearer token as gRPC metadata.
func (h *host) adminCtx() context.Context {
	return metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+h.token)
}

// adminDo sends a REST request to the admin listener with the bearer token.
func (h *host) adminDo(t testing.TB, method, path, body string, out any) *http.Response {
	t.Helper()
	return h.doURL(t, h.admin, method, path, body, map[string]string{"Authorization": "Bearer " + h.token}, out)
}

// copyDir copies a directory tree (the example repository is small).
func copyDir(t testing.TB, src, dst string) {
	t.Helper()
	err := filepath.WalkDir(src, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		target := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(target, 0o755)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(target, b, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// testRepo is the example repository plus model "parity" (the binary fixture).
func testRepo(t testing.TB) string {
	t.Helper()
	repo := t.TempDir()
	copyDir(t, examples, repo)
	dir := filepath.Join(repo, "parity", "v1")
	copyDir(t, filepath.Join(fixtures, "binary"), dir)
	writeFile(t, filepath.Join(dir, "model.yaml"), `runtime: xgboost
artifact: model.json
inputs:  [{name: features, datatype: FP32, shape: [-1, 8]}]
outputs: [{name: score, datatype: FP32, shape: [-1]}]
`)
	return repo
}

func writeFile(t testing.TB, path, text string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}

// startHost serves repo over real HTTP and gRPC listeners; mutate adjusts the Config.
func startHost(t testing.TB, repo string, mutate func(*modelhost.Config)) *host {
	t.Helper()
	goroutinesBefore := runtime.NumGoroutine()
	logs := &bytes.Buffer{}
	metrics, err := telemetry.NewMetrics()
	if err != nil {
		t.Fatal(err)
	}
	tokenFile := filepath.Join(t.TempDir(), "admin-token")
	writeFile(t, tokenFile, testToken+"\n")
	cfg := modelhost.Config{Repository: repo, Logger: zerolog.New(&syncWriter{w: logs}).Level(zerolog.InfoLevel),
		MeterProvider: metrics.Provider, MetricsHandler: metrics.Handler, AdminTokenFile: tokenFile}
	if mutate != nil {
		mutate(&cfg)
	}
	srv, err := modelhost.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	hl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	al, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.ServeAll(ctx, modelhost.Listeners{HTTP: hl, GRPC: gl, Admin: al}) }()
	conn, err := grpc.NewClient(gl.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	aconn, err := grpc.NewClient(al.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	h := &host{srv: srv, url: "http://" + hl.Addr().String(), grpc: oip.NewGRPCInferenceServiceClient(conn), conn: conn, repo: repo, logs: logs,
		admin: "http://" + al.Addr().String(), adminGRPC: oip.NewGRPCInferenceServiceClient(aconn), adminConn: aconn,
		token: testToken, tokenFile: cfg.AdminTokenFile}
	t.Cleanup(func() {
		conn.Close()
		aconn.Close()
		// Idle (and never-used) client connections would hold Shutdown for seconds.
		http.DefaultClient.CloseIdleConnections()
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return after cancel")
		}
		metrics.Shutdown(context.Background())
		http.DefaultClient.CloseIdleConnections()
		checkNoLeak(t, goroutinesBefore)
		if t.Failed() {
			t.Logf("host logs:\n%s", logs.String())
		}
	})
	// Wait for readiness over the wire.
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp, err := http.Get(h.url + "/v2/health/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("host not ready: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return h
}

// checkNoLeak waits for the goroutine count to fall back to what it was before the
// host started (batchers, servers, streams all stopped).
func checkNoLeak(t testing.TB, before int) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Errorf("goroutines: %d after shutdown, %d before:\n%s", runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// do sends a REST request and decodes the JSON answer into out (if not nil).
func (h *host) do(t testing.TB, method, path, body string, hdr map[string]string, out any) *http.Response {
	t.Helper()
	return h.doURL(t, h.url, method, path, body, hdr, out)
}

func (h *host) doURL(t testing.TB, base, method, path, body string, hdr map[string]string, out any) *http.Response {
	t.Helper()
	req, err := http.NewRequest(method, base+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			t.Fatalf("%s %s: %d %s: %v", method, path, resp.StatusCode, raw, err)
		}
	}
	resp.Body = io.NopCloser(bytes.NewReader(raw))
	return resp
}

type inferResponse struct {
	ModelName    string `json:"model_name"`
	ModelVersion string `json:"model_version"`
	ID           string `json:"id"`
	Outputs      []struct {
		Name     string    `json:"name"`
		Datatype string    `json:"datatype"`
		Shape    []int64   `json:"shape"`
		Data     []float64 `json:"data"`
	} `json:"outputs"`
	Error string `json:"error"`
}
