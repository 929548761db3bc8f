package k8s

import (
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"path"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"k8s.io/apiserver/pkg/storage/storagebackend"
	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"
	apiservertesting "k8s.io/kubernetes/cmd/kube-apiserver/app/testing"
)

// apiServer is one real kube-apiserver running in this process on embedded etcd, started
// once per test binary (TestMain): the full server from k8s.io/kubernetes, not a fake, so
// CRDs, the status subresource, resourceVersion conflicts and watches behave as in a cluster.
type apiServer struct {
	// Config is the loopback admin config (JSON, not protobuf: a custom resource sent as
	// protobuf makes the server's handler fail; see /work/shared/k8s-testing.md).
	Config *rest.Config
	// EtcdStart and APIStart are how long etcd and the API server took to start,
	// CRDInstall how long the chart's CRDs took to be Established.
	EtcdStart, APIStart, CRDInstall time.Duration

	tb *mainTB
}

// startAPIServer starts etcd and the API server. stop tears both down.
func startAPIServer() (s *apiServer, err error) {
	tb := &mainTB{name: "TestMain"}
	s = &apiServer{tb: tb}
	// The API server logs through klog's globals: into the kept lines, not onto stderr
	// (go test -json would make each line a package output event).
	fs := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(fs)
	for k, v := range map[string]string{"logtostderr": "false", "alsologtostderr": "false", "stderrthreshold": "FATAL"} {
		if err := fs.Set(k, v); err != nil {
			return nil, err
		}
	}
	klog.SetOutput(tb)
	defer func() {
		// The upstream harness reports fatal problems through tb.Fatal, which panics here.
		if r := recover(); r != nil {
			err = fmt.Errorf("start API server: %v\n%s", r, tb.tail())
		}
		if err != nil {
			tb.runCleanups()
		}
	}()

	t0 := time.Now()
	etcdURL, err := startEtcd(tb)
	if err != nil {
		return nil, err
	}
	s.EtcdStart = time.Since(t0)

	t1 := time.Now()
	storage := storagebackend.NewDefaultConfig(path.Join("/patchbay-test", strconv.FormatInt(time.Now().UnixNano(), 36)), nil)
	storage.Transport.ServerList = []string{etcdURL}
	opts := apiservertesting.NewDefaultTestServerOptions()
	srv, err := apiservertesting.StartTestServer(tb, opts, []string{
		"--disable-admission-plugins=ServiceAccount",
		"--bind-address=127.0.0.1",
	}, storage)
	if err != nil {
		return nil, fmt.Errorf("start kube-apiserver: %w\n%s", err, tb.tail())
	}
	tb.Cleanup(srv.TearDownFn)
	s.APIStart = time.Since(t1)

	cfg := rest.CopyConfig(srv.ClientConfig)
	cfg.ContentType = "application/json"
	cfg.AcceptContentTypes = "application/json"
	cfg.QPS, cfg.Burst = 1000, 1000
	s.Config = cfg
	return s, nil
}

// Stop tears the server and etcd down.
func (s *apiServer) Stop() { s.tb.runCleanups() }

// startEtcd starts an embedded etcd on loopback ports (picked by listen-then-close, as the
// upstream test helper does) and returns its client URL.
func startEtcd(tb *mainTB) (string, error) {
	ports := make([]int, 2)
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return "", err
		}
		ports[i] = l.Addr().(*net.TCPAddr).Port
		l.Close()
	}
	cfg := embed.NewConfig()
	cfg.UnsafeNoFsync = true // a throwaway single-member server
	client := url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0]))}
	peer := url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[1]))}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{client}, []url.URL{client}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{peer}, []url.URL{peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.Dir = tb.TempDir()
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop().WithOptions(zap.IncreaseLevel(zapcore.ErrorLevel)))
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return "", fmt.Errorf("start etcd: %w", err)
	}
	tb.Cleanup(e.Close)
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		return "", fmt.Errorf("etcd did not become ready in 60s")
	}
	return client.String(), nil
}

// mainTB is the ktesting.TB the upstream harness is given from TestMain (there is no
// *testing.T yet): it keeps the server's log lines (the last ones are shown on failure),
// runs cleanups at Stop, and turns Fatal into a panic that startAPIServer recovers.
type mainTB struct {
	name string

	mu       sync.Mutex
	logs     []string
	failed   bool
	cleanups []func()
}

const keepLogLines = 200

func (t *mainTB) Attr(key, value string) {}
func (t *mainTB) Chdir(dir string)       { _ = os.Chdir(dir) }
func (t *mainTB) Cleanup(f func()) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.cleanups = append(t.cleanups, f)
}
func (t *mainTB) Error(args ...any)                 { t.Log(args...); t.Fail() }
func (t *mainTB) Errorf(format string, args ...any) { t.Logf(format, args...); t.Fail() }
func (t *mainTB) Fail() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.failed = true
}
func (t *mainTB) FailNow() { t.Fail(); panic("FailNow") }
func (t *mainTB) Failed() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.failed
}
func (t *mainTB) Fatal(args ...any)                 { t.Log(args...); t.FailNow() }
func (t *mainTB) Fatalf(format string, args ...any) { t.Logf(format, args...); t.FailNow() }
func (t *mainTB) Helper()                           {}
func (t *mainTB) Log(args ...any)                   { t.add(fmt.Sprintln(args...)) }
func (t *mainTB) Logf(format string, args ...any)   { t.add(fmt.Sprintf(format, args...)) }
func (t *mainTB) Name() string                      { return t.name }
func (t *mainTB) Setenv(key, value string)          { _ = os.Setenv(key, value) }
func (t *mainTB) Skip(args ...any)                  { t.Log(args...); t.SkipNow() }
func (t *mainTB) Skipf(format string, args ...any)  { t.Logf(format, args...); t.SkipNow() }
func (t *mainTB) SkipNow()                          { panic("SkipNow") }
func (t *mainTB) Skipped() bool                     { return false }
func (t *mainTB) TempDir() string {
	dir, err := os.MkdirTemp("", "patchbay-k8s-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// Write keeps klog's lines.
func (t *mainTB) Write(p []byte) (int, error) {
	t.add(string(p))
	return len(p), nil
}

func (t *mainTB) add(line string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.logs = append(t.logs, strings.TrimRight(line, "\n"))
	if len(t.logs) > 2*keepLogLines {
		t.logs = append([]string(nil), t.logs[len(t.logs)-keepLogLines:]...)
	}
}

// tail is the last log lines, for an error message.
func (t *mainTB) tail() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	l := t.logs
	if len(l) > keepLogLines {
		l = l[len(l)-keepLogLines:]
	}
	return strings.Join(l, "\n")
}

// runCleanups runs the registered cleanups, last first, once.
func (t *mainTB) runCleanups() {
	t.mu.Lock()
	c := t.cleanups
	t.cleanups = nil
	t.mu.Unlock()
	for i := len(c) - 1; i >= 0; i-- {
		c[i]()
	}
}
