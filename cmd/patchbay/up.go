package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	funce "github.com/tetratelabs/func-e"
	funceapi "github.com/tetratelabs/func-e/api"

	"github.com/patchbay-io/patchbay/api/headers"
	"github.com/patchbay-io/patchbay/envoy"
	"github.com/patchbay-io/patchbay/internal/tlsfiles"
	"github.com/patchbay-io/patchbay/xds/rollout"
)

// upConfig is everything `patchbay up` starts, and where.
type upConfig struct {
	bin                   string // the patchbay binary to run for each part
	rollouts, repository  string
	hostHTTP, hostGRPC    []string
	hostAdmin             []string // model hosts' admin listeners (repository API, behind the token)
	tls                   bool     // --tls: a throwaway CA, and mTLS on every hop
	xdsListen, xdsAdmin   string
	extprocListen         string
	extprocAdmin          string
	edgeListener, sidecar string
	envoyAdmin, envoyStat string
	envoy                 string // "auto", "off" or a path
	download              bool
	envoyBin              string // $ENVOY_BIN
	logLevel              string
	readyTimeout          time.Duration
	envoyTimeout          time.Duration
	stopGrace             time.Duration
	// The feature store (up_features.go): --redis-server ("auto", "off" or a path),
	// --feature-store (a running Redis instead), and the example features to load.
	redisServer, featureStore string
	featureFile               string
	features                  exampleFeatures
}

// runUp starts every part of patchbay on this machine from an examples directory:
// model hosts, then the control plane, then ext_proc, then Envoy when it can be had.
// Each part is this binary run as a child process; their logs are prefixed with
// their name. It returns when ctx ends (Ctrl-C), after stopping the children in
// reverse order (SIGTERM, then SIGKILL after a grace period), or when a child dies.
func runUp(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseUp(args, stdout, stderr)
	if err != nil {
		return err
	}
	u := &upRun{cfg: cfg, stdout: stdout, log: &prefixLog{w: stderr}}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	go watchParent(ctx, cancel, time.Second/4)
	return u.run(ctx)
}

// errParentGone ends `up` when the process that started it has exited.
var errParentGone = errors.New("the process that started patchbay up exited")

// watchParent cancels ctx when up's parent process exits (its parent pid changes,
// Unix). This is for `go run ./cmd/patchbay up` (the README uses `go tool patchbay up`,
// which forwards every signal): the go command ignores SIGINT and
// SIGQUIT and waits for its child (cmd/go/internal/base/signal.go, signal_unix.go;
// RunStdin in base.go), so a SIGTERM to it kills the go command alone and would leave
// up and every part running. Ctrl-C at a terminal reaches up itself (the terminal
// signals the whole foreground process group); a SIGINT sent to the go command's pid
// alone never reaches up at all, so the banner prints up's own pid to signal instead.
func watchParent(ctx context.Context, cancel context.CancelCauseFunc, every time.Duration) {
	start := os.Getppid()
	if start <= 1 {
		return // already orphaned (or no parent pid on this platform): nothing to watch
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			if os.Getppid() != start {
				cancel(errParentGone)
				return
			}
		}
	}
}

func parseUp(args []string, stdout, stderr io.Writer) (upConfig, error) {
	fs := newFlags("up", "[flags]", "Runs everything on this machine from the examples: two model hosts, the control plane,\next_proc and, when one can be had, Envoy ($ENVOY_BIN, envoy on PATH, or a func-e\ndownload), and a Redis feature store with the example features when redis-server is\nfound (without one, store features take their defaults). Ctrl-C stops them all.")
	var c upConfig
	examples := fs.String("examples", "examples", "examples directory: rollouts from DIR/rollouts, model repository DIR/models")
	fs.StringVar(&c.rollouts, "rollouts", "", "rollout directory (default DIR/rollouts of --examples)")
	fs.StringVar(&c.repository, "repository", "", "model repository (default DIR/models of --examples)")
	hostHTTP := fs.String("modelhost-http", "127.0.0.1:9001,127.0.0.1:9002", "comma-separated OIP REST addresses, one model host each (the example rollouts name these)")
	hostGRPC := fs.String("modelhost-grpc", "127.0.0.1:9011,127.0.0.1:9012", "comma-separated OIP gRPC addresses, same order as --modelhost-http")
	hostAdmin := fs.String("modelhost-admin", "127.0.0.1:9021,127.0.0.1:9022", "comma-separated model host admin addresses (repository API, behind the admin token), same order as --modelhost-http")
	fs.BoolVar(&c.tls, "tls", false, "make a throwaway local CA and certificates (in the run directory) and run every part with mutual TLS")
	fs.StringVar(&c.xdsListen, "xds-listen", "127.0.0.1:18000", "control plane ADS address")
	fs.StringVar(&c.xdsAdmin, "xds-admin", "127.0.0.1:18001", "control plane admin address (/readyz, /status, rollback)")
	fs.StringVar(&c.extprocListen, "extproc-listen", "127.0.0.1:18080", "ext_proc gRPC address")
	fs.StringVar(&c.extprocAdmin, "extproc-admin", "127.0.0.1:18081", "ext_proc admin address")
	fs.StringVar(&c.edgeListener, "edge-listener", "127.0.0.1:10000", "Envoy edge listener the control plane emits")
	fs.StringVar(&c.sidecar, "sidecar-listener", "127.0.0.1:15001", "Envoy sidecar outbound listener the control plane emits")
	fs.StringVar(&c.envoyAdmin, "envoy-admin", "127.0.0.1:9901", "Envoy admin address (loopback)")
	fs.StringVar(&c.envoyStat, "envoy-stats", "127.0.0.1:9902", "Envoy /ready and /stats/prometheus listener")
	fs.StringVar(&c.envoy, "envoy", "auto", `Envoy binary: "auto" ($ENVOY_BIN, then envoy on PATH, then a func-e download), "off", or a path`)
	fs.BoolVar(&c.download, "envoy-download", true, "with --envoy auto, let func-e download the pinned Envoy when none is found")
	fs.StringVar(&c.bin, "bin", "", "patchbay binary to run for each part (default: this one)")
	fs.StringVar(&c.logLevel, "log-level", "info", "log level of every part: debug, info, warn or error")
	fs.DurationVar(&c.readyTimeout, "ready-timeout", 60*time.Second, "how long each part may take to become ready")
	fs.DurationVar(&c.envoyTimeout, "envoy-timeout", 5*time.Minute, "how long Envoy may take to be ready (a func-e download included)")
	fs.DurationVar(&c.stopGrace, "stop-grace", 5*time.Second, "how long a part may take to stop after SIGTERM before it is killed")
	fs.StringVar(&c.redisServer, "redis-server", "auto", `Redis for the model hosts' store features: "auto" (redis-server on PATH, started on a free loopback port without persistence), "off", or a redis-server binary; without one, store features take their defaults`)
	fs.StringVar(&c.featureStore, "feature-store", "", "a running Redis (host:port or redis:// URL) to use instead of starting one; the example features are written into it")
	fs.StringVar(&c.featureFile, "features", "", "example features loaded into the feature store, entity: {feature: value} (default DIR/features.yaml of --examples, if present)")
	if err := parseFlags(fs, args, stdout, stderr); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return c, fmt.Errorf("up: unexpected arguments %q: %w", fs.Args(), errUsage)
	}
	if c.rollouts == "" {
		c.rollouts = filepath.Join(*examples, "rollouts")
	}
	if c.repository == "" {
		c.repository = filepath.Join(*examples, "models")
	}
	explicitFeatures := c.featureFile != ""
	if !explicitFeatures {
		c.featureFile = filepath.Join(*examples, "features.yaml")
	}
	c.hostHTTP, c.hostGRPC, c.hostAdmin = splitList(*hostHTTP), splitList(*hostGRPC), splitList(*hostAdmin)
	var errs []error
	if len(c.hostHTTP) == 0 || len(c.hostHTTP) != len(c.hostGRPC) || len(c.hostHTTP) != len(c.hostAdmin) {
		errs = append(errs, fmt.Errorf("--modelhost-http has %d addresses, --modelhost-grpc %d and --modelhost-admin %d: want the same number, at least one", len(c.hostHTTP), len(c.hostGRPC), len(c.hostAdmin)))
	}
	for _, dir := range []string{c.rollouts, c.repository} {
		if st, err := os.Stat(dir); err != nil || !st.IsDir() {
			errs = append(errs, fmt.Errorf("%s is not a directory (run from the repository root, or pass --examples)", dir))
		}
	}
	if c.readyTimeout <= 0 || c.envoyTimeout <= 0 || c.stopGrace <= 0 {
		errs = append(errs, errors.New("--ready-timeout, --envoy-timeout and --stop-grace must be positive"))
	}
	if c.redisServer == "" {
		errs = append(errs, errors.New(`--redis-server: want "auto", "off" or a path`))
	}
	features, err := loadFeatureFile(c.featureFile, explicitFeatures)
	if err != nil {
		errs = append(errs, fmt.Errorf("--features: %w", err))
	}
	c.features = features
	if err := errors.Join(errs...); err != nil {
		return c, fmt.Errorf("up: %w: %w", err, errUsage)
	}
	if c.bin == "" {
		exe, err := os.Executable()
		if err != nil {
			return c, fmt.Errorf("up: find this binary: %w", err)
		}
		c.bin = exe
	}
	c.envoyBin = os.Getenv("ENVOY_BIN")
	return c, nil
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// part is one running piece: a child process, or Envoy run by func-e.
type part struct {
	name   string
	pid    int
	done   chan struct{} // closed when the part has exited
	err    error         // why it exited; read after done
	signal func(os.Signal) error
	kill   func() error
}

func (p *part) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop asks the part to stop (SIGTERM), and kills it if it is still there after grace.
func (p *part) stop(grace time.Duration) {
	if p.exited() {
		return
	}
	_ = p.signal(syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.done:
	case <-t.C:
		_ = p.kill()
		<-p.done
	}
}

type upRun struct {
	cfg    upConfig
	stdout io.Writer
	log    *prefixLog
	parts  []*part // in start order
	dir    string
	served []string // per model host: what it serves, for the banner
	models []string // the models the loaded rollouts name (hostRepositories), for the tour
	tls    *upTLS   // with --tls: the throwaway PKI
	client *http.Client
	// funceOptions are added to func-e's options (tests point its download at a
	// local server).
	funceOptions []funceapi.RunOption
	// featureNote says which feature store the model hosts use (banner);
	// featureEntities are the entities whose example features were loaded.
	featureNote     string
	featureEntities []string
}

func (u *upRun) run(ctx context.Context) (err error) {
	u.dir, err = os.MkdirTemp("", "patchbay-up-")
	if err != nil {
		return fmt.Errorf("up: %w", err)
	}
	defer os.RemoveAll(u.dir)
	defer u.stopAll()

	if err := u.startAll(ctx); err != nil {
		return err
	}
	if ctx.Err() != nil {
		return nil
	}
	// Run until Ctrl-C, or until a part dies.
	died := make(chan *part, len(u.parts))
	for _, p := range u.parts {
		go func() {
			<-p.done
			died <- p
		}()
	}
	select {
	case <-ctx.Done():
		u.log.printf("up", "shutting down: %v", context.Cause(ctx))
		return nil
	case p := <-died:
		return fmt.Errorf("up: %s exited: %v", p.name, p.err)
	}
}

func (u *upRun) startAll(ctx context.Context) error {
	c := u.cfg
	// A port already taken (often by the parts of an earlier `up` that was killed) would
	// answer our readiness checks for a child that died on the clash: say so up front.
	ports := append(append([]string{}, c.hostHTTP...), c.hostGRPC...)
	ports = append(ports, c.xdsListen, c.xdsAdmin, c.extprocListen, c.extprocAdmin)
	ports = append(ports, c.hostAdmin...)
	if err := portsFree(ports); err != nil {
		return err
	}
	u.client = &http.Client{Timeout: time.Second}
	if c.tls {
		t, err := newUpTLS(filepath.Join(u.dir, "tls"))
		if err != nil {
			return err
		}
		u.tls = t
		u.client.Transport = &http.Transport{TLSClientConfig: t.clientConfig("operator")}
	}
	// 24 random bytes, hex: a 48-byte token (model hosts refuse tokens under 32 bytes).
	token := make([]byte, 24)
	if _, err := rand.Read(token); err != nil {
		return fmt.Errorf("up: admin token: %w", err)
	}
	tokenFile := filepath.Join(u.dir, "admin-token")
	if err := os.WriteFile(tokenFile, []byte(hex.EncodeToString(token)+"\n"), 0o600); err != nil {
		return fmt.Errorf("up: %w", err)
	}

	featureStore := u.startFeatureStore(ctx)
	repos := u.hostRepositories()
	for i := range c.hostHTTP {
		name := "modelhost-" + string(rune('a'+i))
		args := []string{"modelhost",
			"--repository", repos[i], "--http", c.hostHTTP[i], "--grpc", c.hostGRPC[i], "--log-level", c.logLevel,
			"--admin", c.hostAdmin[i], "--admin-token-file", tokenFile,
			// Prediction records to the control plane's Records service (on its ADS port) for
			// the shadow comparison; every request with an x-request-id (Envoy adds one) on a
			// demo machine: a sample of 1.
			"--shadow-records", c.xdsListen, "--shadow-sample", "1",
		}
		args = append(args, u.serverTLSArgs("modelhost")...)
		if featureStore != "" {
			args = append(args, "--feature-store", featureStore)
		}
		if err := u.startChild(ctx, name, c.bin, args, u.url(c.hostHTTP[i], "/v2/health/ready"), c.readyTimeout); err != nil {
			return err
		}
	}
	xdsArgs := []string{"xds",
		"--rollouts", c.rollouts, "--listen", c.xdsListen, "--admin", c.xdsAdmin,
		"--edge-listener", c.edgeListener, "--sidecar-listener", c.sidecar,
		"--admin-token-file", tokenFile, "--log-level", c.logLevel,
	}
	xdsArgs = append(xdsArgs, u.serverTLSArgs("xds")...)
	if u.tls != nil {
		// Envoy's clusters to the model hosts (which require client certificates) and the
		// edge listener use TLS too; Envoy presents its own (edge) certificate.
		edge := u.tls.files["edge"]
		xdsArgs = append(xdsArgs, "--upstream-tls",
			"--upstream-tls-ca", edge.CA, "--upstream-tls-cert", edge.Cert, "--upstream-tls-key", edge.Key,
			"--edge-tls-cert", edge.Cert, "--edge-tls-key", edge.Key, "--edge-client-ca", edge.CA)
	}
	if err := u.startChild(ctx, "xds", c.bin, xdsArgs, u.url(c.xdsAdmin, "/readyz"), c.readyTimeout); err != nil {
		return err
	}
	extprocArgs := []string{"extproc",
		"--listen", c.extprocListen, "--xds", c.xdsListen, "--admin", c.extprocAdmin, "--log-level", c.logLevel,
	}
	extprocArgs = append(extprocArgs, u.serverTLSArgs("extproc")...)
	if u.tls != nil {
		f := u.tls.files["extproc"]
		extprocArgs = append(extprocArgs, "--xds-ca", f.CA, "--xds-cert", f.Cert, "--xds-key", f.Key)
	}
	if err := u.startChild(ctx, "extproc", c.bin, extprocArgs, u.url(c.extprocAdmin, "/readyz"), c.readyTimeout); err != nil {
		return err
	}
	grpcBootstrap, err := u.writeGRPCBootstrap()
	if err != nil {
		return err
	}
	envoyUp, envoyNote := u.startEnvoy(ctx)
	if ctx.Err() != nil {
		return nil
	}
	u.printTry(envoyUp, envoyNote, tokenFile, grpcBootstrap)
	return nil
}

// upTLS is the throwaway PKI of `up --tls`: one CA and a certificate per role, each with
// the role's URI SAN (envoy.Identity) and the loopback names, in one directory that goes
// away with the run.
type upTLS struct {
	dir   string
	files map[string]tlsfiles.Files // by role: xds, extproc, modelhost, edge, grpc, operator
}

// grpcCertProvider is the certificate provider instance the control plane's proxyless
// clusters name for TLS to model hosts (xds/translate.CertProviderInstance; cmd may import
// every part, but the bootstrap is a file format, so the name is kept here too and
// TestUpTLS proves they agree).
const grpcCertProvider = "patchbay"

// upRoles are the certificates up makes: the three servers (each also the client
// certificate of that part: ext_proc's to the control plane), Envoy (edge), proxyless
// gRPC clients (grpc) and the person at the terminal (operator: curl, grpcurl, and up's
// own readiness checks).
var upRoles = []string{"xds", "extproc", "modelhost", "edge", "grpc", "operator"}

func newUpTLS(dir string) (*upTLS, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("up: %w", err)
	}
	ca, err := tlsfiles.NewCA("patchbay up (throwaway)", 7*24*time.Hour)
	if err != nil {
		return nil, fmt.Errorf("up: %w", err)
	}
	t := &upTLS{dir: dir, files: map[string]tlsfiles.Files{}}
	for _, role := range upRoles {
		f, err := ca.WriteLeaf(dir, role, tlsfiles.Leaf{
			Name: "patchbay-" + role, Hosts: []string{"127.0.0.1", "::1", "localhost"},
			URI: envoy.Identity(role), ValidFor: 7 * 24 * time.Hour,
		})
		if err != nil {
			return nil, fmt.Errorf("up: certificate for %s: %w", role, err)
		}
		t.files[role] = f
	}
	return t, nil
}

// clientConfig is a TLS client config presenting the role's certificate and trusting
// only the throwaway CA.
func (t *upTLS) clientConfig(role string) *tls.Config {
	f := t.files[role]
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if pem, err := os.ReadFile(f.CA); err == nil {
		cfg.RootCAs = x509.NewCertPool()
		cfg.RootCAs.AppendCertsFromPEM(pem)
	}
	if c, err := tls.LoadX509KeyPair(f.Cert, f.Key); err == nil {
		cfg.Certificates = []tls.Certificate{c}
	}
	return cfg
}

// serverTLSArgs are the --tls-cert/--tls-key/--client-ca flags of a server part (they
// cover its admin listener too); none without --tls.
func (u *upRun) serverTLSArgs(role string) []string {
	if u.tls == nil {
		return nil
	}
	f := u.tls.files[role]
	return []string{"--tls-cert", f.Cert, "--tls-key", f.Key, "--client-ca", f.CA}
}

// url is http://addr/path, or https:// with --tls.
func (u *upRun) url(addr, path string) string {
	if u.tls != nil {
		return "https://" + addr + path
	}
	return "http://" + addr + path
}

// startChild runs `bin args...` and waits until readyURL answers 200.
func (u *upRun) startChild(ctx context.Context, name, bin string, args []string, readyURL string, timeout time.Duration) error {
	if ctx.Err() != nil {
		return nil // stopping: start nothing more
	}
	p, err := u.spawn(name, bin, args)
	if err != nil {
		return err
	}
	return u.waitReady(ctx, p, readyURL, timeout)
}

// spawn starts `bin args...` as a part (in its own process group, its output prefixed
// with name) without waiting for it to be ready.
func (u *upRun) spawn(name, bin string, args []string) (*part, error) {
	cmd := exec.Command(bin, args...)
	w := u.log.writer(name)
	cmd.Stdout, cmd.Stderr = w, w
	cmd.SysProcAttr = ownProcessGroup()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("up: start %s: %w", name, err)
	}
	p := &part{
		name: name, pid: cmd.Process.Pid, done: make(chan struct{}),
		signal: cmd.Process.Signal, kill: cmd.Process.Kill,
	}
	go func() {
		p.err = cmd.Wait()
		w.flush()
		close(p.done)
	}()
	u.parts = append(u.parts, p)
	u.log.printf("up", "started %s (pid %d): %s %s", name, p.pid, filepath.Base(bin), strings.Join(args, " "))
	return p, nil
}

// hostRepositories gives each model host a repository holding only the versions whose
// rollout endpoints name that host (copied from the full repository into up's temporary
// directory). A host then serves one version of a model, so its answers prove the split
// on every path — including proxyless gRPC, which cannot add x-patchbay-version to pick a
// version on a shared host. A host no rollout names, or rollouts that do not load (the
// control plane reports why), gets the full repository.
func (u *upRun) hostRepositories() []string {
	c := u.cfg
	repos := make([]string, len(c.hostHTTP))
	u.served = make([]string, len(c.hostHTTP))
	for i := range repos {
		repos[i] = c.repository
		u.served[i] = "every model in " + c.repository
	}
	set, err := rollout.LoadDir(c.rollouts)
	if err != nil {
		return repos
	}
	for _, r := range set.Rollouts {
		u.models = append(u.models, r.Model)
	}
	for i := range c.hostHTTP {
		var versions []string
		for _, r := range set.Rollouts {
			for _, v := range r.Versions {
				if eps := v.AllEndpoints(); slices.Contains(eps, c.hostHTTP[i]) || slices.Contains(eps, c.hostGRPC[i]) {
					versions = append(versions, filepath.Join(r.Model, v.Name))
				}
			}
		}
		if len(versions) == 0 {
			continue
		}
		dir := filepath.Join(u.dir, "repository-"+string(rune('a'+i)))
		if err := copyVersions(c.repository, dir, versions); err != nil {
			u.log.printf("up", "host %s serves the whole repository: %v", c.hostHTTP[i], err)
			continue
		}
		repos[i] = dir
		u.served[i] = strings.Join(versions, ", ")
	}
	return repos
}

// copyVersions copies the files of each <model>/<version> directory from src to dst, and
// each of those models' own files (contract.yaml: the host checks requests against it).
func copyVersions(src, dst string, versions []string) error {
	models := map[string]bool{}
	for _, mv := range versions {
		m := filepath.Dir(mv)
		if models[m] {
			continue
		}
		models[m] = true
		// A model's own files are its regular files only (its versions are directories).
		if err := copyFiles(filepath.Join(src, m), filepath.Join(dst, m), func(e os.DirEntry) bool { return e.Type().IsRegular() }); err != nil {
			return err
		}
	}
	for _, mv := range versions {
		if err := copyFiles(filepath.Join(src, mv), filepath.Join(dst, mv), func(e os.DirEntry) bool { return !e.IsDir() }); err != nil {
			return err
		}
	}
	return nil
}

// copyFiles copies the entries of directory src that keep accepts (not recursing) into
// dst, which it creates.
func copyFiles(src, dst string, keep func(os.DirEntry) bool) error {
	entries, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return err
	}
	for _, e := range entries {
		if !keep(e) {
			continue
		}
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// portsFree reports the first address that cannot be listened on.
func portsFree(addrs []string) error {
	for _, a := range addrs {
		l, err := net.Listen("tcp", a)
		if err != nil {
			return fmt.Errorf("up: %s is in use (%v): is an earlier patchbay up (or another server) still running? Stop it or change the flag", a, err)
		}
		l.Close()
	}
	return nil
}

// ownProcessGroup puts a child in its own process group where the platform has them
// (Setpgid, Unix): the terminal's Ctrl-C then reaches only `up`, which stops the parts
// in order instead of all of them at once. The field is set by name so that this file
// also builds where SysProcAttr has no Setpgid (Windows).
//
// Where the platform has it (Pdeathsig, Linux) the child also gets SIGTERM when `up`
// dies for any reason (SIGKILL, a panic), so no part outlives it holding its ports.
func ownProcessGroup() *syscall.SysProcAttr {
	attr := new(syscall.SysProcAttr)
	v := reflect.ValueOf(attr).Elem()
	if f := v.FieldByName("Setpgid"); f.IsValid() && f.Kind() == reflect.Bool {
		f.SetBool(true)
	}
	if f := v.FieldByName("Pdeathsig"); f.IsValid() && f.CanSet() {
		f.Set(reflect.ValueOf(syscall.Signal(15)).Convert(f.Type())) // SIGTERM
	}
	return attr
}

// waitReady polls url until it answers 200, the part exits, ctx ends or timeout passes.
func (u *upRun) waitReady(ctx context.Context, p *part, url string, timeout time.Duration) error {
	client := u.client
	if client == nil {
		client = &http.Client{Timeout: time.Second}
	}
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	last := "no answer yet"
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return fmt.Errorf("up: %s readiness: %w", p.name, err)
		}
		if resp, err := client.Do(req); err != nil {
			last = err.Error()
		} else {
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				u.log.printf("up", "%s is ready (%s)", p.name, url)
				return nil
			}
			last = resp.Status
		}
		select {
		case <-ctx.Done():
			return nil
		case <-p.done:
			return &exitedError{name: p.name, err: p.err}
		case <-deadline.C:
			return fmt.Errorf("up: %s not ready after %v: GET %s: %s", p.name, timeout, url, last)
		case <-tick.C:
		}
	}
}

// exitedError: a part ended before it was ready.
type exitedError struct {
	name string
	err  error
}

func (e *exitedError) Error() string {
	return fmt.Sprintf("up: %s exited before it was ready: %v (its log is above)", e.name, e.err)
}

func (e *exitedError) Unwrap() error { return e.err }

// stopAll stops the parts in reverse start order.
func (u *upRun) stopAll() {
	for i := len(u.parts) - 1; i >= 0; i-- {
		p := u.parts[i]
		if p.exited() {
			continue
		}
		u.log.printf("up", "stopping %s", p.name)
		p.stop(u.cfg.stopGrace)
	}
	u.parts = nil
}

// startEnvoy runs the edge Envoy if one can be had. It reports whether Envoy is up,
// and otherwise a note saying why not and how to get it; a missing Envoy is not an
// error: everything else keeps running.
func (u *upRun) startEnvoy(ctx context.Context) (bool, string) {
	c := u.cfg
	if c.envoy == "off" {
		return false, "Envoy is off (--envoy off)."
	}
	if ctx.Err() != nil {
		return false, ""
	}
	params := envoy.Params{
		NodeID: "patchbay-up-edge", XDS: c.xdsListen, ExtProc: c.extprocListen,
		Admin: c.envoyAdmin, Stats: c.envoyStat,
	}
	if u.tls != nil {
		// The mTLS bootstrap, its SDS files naming the edge certificate: Envoy re-reads
		// them when they are replaced (atomically) in the watched directories.
		sds := filepath.Join(u.dir, "sds")
		edge := u.tls.files["edge"]
		if err := os.MkdirAll(sds, 0o700); err != nil {
			return false, fmt.Sprintf("Envoy not started: %v", err)
		}
		if err := envoy.WriteSDS(sds, envoy.PEMFiles{Cert: edge.Cert, Key: edge.Key, CA: edge.CA, WatchDir: u.tls.dir}); err != nil {
			return false, fmt.Sprintf("Envoy not started: %v", err)
		}
		params.MTLS, params.SDSDir = true, sds
	}
	bootstrap, err := envoy.Render(envoy.Edge, params)
	if err != nil {
		return false, fmt.Sprintf("Envoy not started: %v", err)
	}
	js, err := envoy.MarshalJSON(bootstrap)
	if err != nil {
		return false, fmt.Sprintf("Envoy not started: %v", err)
	}
	config := filepath.Join(u.dir, "envoy-edge.json")
	if err := os.WriteFile(config, js, 0o600); err != nil {
		return false, fmt.Sprintf("Envoy not started: %v", err)
	}
	level := "warning"
	if c.logLevel == "debug" {
		level = "info"
	}
	args := []string{"-c", config, "--use-dynamic-base-id", "--log-level", level, "--drain-time-s", "2"}
	ready := "http://" + c.envoyStat + "/ready"

	bin, how := c.envoy, "--envoy"
	if bin == "auto" {
		bin, how = c.envoyBin, "ENVOY_BIN"
		if bin == "" {
			bin, how = lookEnvoy(), "PATH"
		}
	}
	if bin != "" {
		u.checkEnvoyVersion(ctx, bin)
		if err := u.startChild(ctx, "envoy", bin, args, ready, c.envoyTimeout); err != nil {
			return false, fmt.Sprintf("Envoy from %s (%s) did not start: %v", how, bin, err)
		}
		return true, ""
	}
	if !c.download {
		return false, envoyMissing("not tried (--envoy-download=false)")
	}
	if err := u.startFuncE(ctx, args, ready); err != nil {
		return false, envoyMissing(err.Error())
	}
	return true, ""
}

func lookEnvoy() string {
	p, err := exec.LookPath("envoy")
	if err != nil {
		return ""
	}
	return p
}

// checkEnvoyVersion warns when the Envoy found is not the pinned release.
func (u *upRun) checkEnvoyVersion(ctx context.Context, bin string) {
	vctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(vctx, bin, "--version").CombinedOutput()
	if err != nil {
		u.log.printf("up", "warning: %s --version: %v", bin, err)
		return
	}
	if !bytes.Contains(out, []byte("/"+envoy.Version()+"/")) {
		u.log.printf("up", "warning: %s is not Envoy %s, the version patchbay is tested with: %s", bin, envoy.Version(), strings.TrimSpace(string(out)))
	}
}

// startFuncE runs the pinned Envoy through func-e's library, which downloads it once
// into func-e's data directory.
func (u *upRun) startFuncE(ctx context.Context, args []string, ready string) error {
	u.log.printf("up", "no Envoy on ENVOY_BIN or PATH: asking func-e for Envoy %s (downloads once)", envoy.Version())
	runCtx, cancel := context.WithCancel(context.Background())
	w := u.log.writer("envoy")
	// Whether Envoy itself printed anything: when func-e fails before Envoy runs (a
	// download that fails), there is no Envoy log to point at.
	var envoyWrote atomic.Bool
	ew := writerFunc(func(b []byte) (int, error) {
		if len(b) > 0 {
			envoyWrote.Store(true)
		}
		return w.Write(b)
	})
	opts := append([]funceapi.RunOption{funceapi.EnvoyVersion(envoy.Version()),
		funceapi.Out(w), funceapi.EnvoyOut(ew), funceapi.EnvoyErr(ew)}, u.funceOptions...)
	p := &part{name: "envoy", done: make(chan struct{})}
	p.signal = func(os.Signal) error { cancel(); return nil }
	p.kill = func() error { cancel(); return nil }
	go func() {
		p.err = funce.Run(runCtx, args, opts...)
		if p.err == nil {
			p.err = errors.New("envoy exited")
		}
		w.flush()
		cancel()
		close(p.done)
	}()
	u.parts = append(u.parts, p)
	if err := u.waitReady(ctx, p, ready, u.cfg.envoyTimeout); err != nil {
		u.parts = u.parts[:len(u.parts)-1]
		p.stop(u.cfg.stopGrace)
		var exited *exitedError
		switch {
		case errors.As(err, &exited) && !envoyWrote.Load():
			return fmt.Errorf("could not get Envoy %s running, and Envoy never printed a line: %v\n"+
				"     (func-e downloads Envoy once, from archive.tetratelabs.io: check that this machine\n"+
				"     can reach it; behind a proxy, set HTTPS_PROXY)", envoy.Version(), exited.err)
		case errors.As(err, &exited):
			return fmt.Errorf("ran Envoy %s, which exited before it was ready: %v (its log is above, lines prefixed \"envoy\")", envoy.Version(), exited.err)
		}
		return fmt.Errorf("ran Envoy %s: %w", envoy.Version(), err)
	}
	return nil
}

// writerFunc is an io.Writer made of a function.
type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }

// envoyMissing is the note when --envoy auto found no Envoy: what was tried, in order
// (funceStep says how the func-e step went), and what to do next.
func envoyMissing(funceStep string) string {
	v := envoy.Version()
	return fmt.Sprintf(`Envoy is not running. Tried, in order:
  1. $ENVOY_BIN: not set
  2. envoy on PATH: none found
  3. func-e: %s
Next: get Envoy %[2]s (the release patchbay is tested with) and run patchbay up again,
with ENVOY_BIN set (or --envoy PATH):
  func-e:  go install github.com/tetratelabs/func-e/cmd/func-e@latest && func-e use %[2]s && export ENVOY_BIN="$(func-e which)"
  docker:  docker create --name envoy envoyproxy/envoy:v%[2]s && docker cp envoy:/usr/local/bin/envoy ./envoy && docker rm envoy && export ENVOY_BIN="$PWD/envoy"
Still running without it: the model hosts (OIP REST and gRPC), the control plane (proxyless
gRPC clients route through it) and ext_proc.`, funceStep, v)
}

// writeGRPCBootstrap writes the xDS bootstrap a proxyless gRPC client needs. With --tls
// its channel to the control plane uses grpc-go's "tls" channel credentials (gRFC A65;
// grpc-go internal/xds/bootstrap/tlscreds/bundle.go), and the same files are the
// "patchbay" certificate provider instance (file_watcher plugin, gRFC A29) that the
// control plane's clusters name for TLS to the model hosts (translate.CertProviderInstance);
// a client dialing with xDS credentials (google.golang.org/grpc/credentials/xds) uses it.
// The config keys are the file_watcher plugin's
// (credentials/tls/certprovider/pemfile/builder.go), refresh_interval included, so the
// files are re-read when they rotate.
func (u *upRun) writeGRPCBootstrap() (string, error) {
	creds := map[string]any{"type": "insecure"}
	doc := map[string]any{
		"node": map[string]any{"id": "patchbay-up-grpc-client", "locality": map[string]any{}},
	}
	if u.tls != nil {
		f := u.tls.files["grpc"]
		files := map[string]any{
			"ca_certificate_file": f.CA,
			"certificate_file":    f.Cert,
			"private_key_file":    f.Key,
			"refresh_interval":    "60s",
		}
		creds = map[string]any{"type": "tls", "config": files}
		doc["certificate_providers"] = map[string]any{
			grpcCertProvider: map[string]any{"plugin_name": "file_watcher", "config": files},
		}
	}
	doc["xds_servers"] = []any{map[string]any{
		"server_uri":      u.cfg.xdsListen,
		"channel_creds":   []any{creds},
		"server_features": []any{"xds_v3"},
	}}
	b, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return "", fmt.Errorf("up: grpc xds bootstrap: %w", err)
	}
	p := filepath.Join(u.dir, "grpc-xds-bootstrap.json")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		return "", fmt.Errorf("up: %w", err)
	}
	return p, nil
}

// printTry prints what is running and the commands to try.
func (u *upRun) printTry(envoyUp bool, envoyNote, tokenFile, grpcBootstrap string) {
	c := u.cfg
	var b strings.Builder
	// With --tls every curl and grpcurl presents the operator certificate and trusts only
	// the throwaway CA.
	curl, grpcurl := "curl", "grpcurl -plaintext"
	if u.tls != nil {
		op := u.tls.files["operator"]
		curl = fmt.Sprintf("curl --cacert %s --cert %s --key %s", op.CA, op.Cert, op.Key)
		grpcurl = fmt.Sprintf("grpcurl -cacert %s -cert %s -key %s", op.CA, op.Cert, op.Key)
	}
	grpcurl += " -import-path api/oip -proto grpc_predict_v2.proto"
	fmt.Fprintf(&b, "\npatchbay is up.\n")
	for i := range c.hostHTTP {
		fmt.Fprintf(&b, "  model host %c     REST %s   gRPC %s   (%s)\n", 'a'+i, u.url(c.hostHTTP[i], ""), c.hostGRPC[i], u.served[i])
	}
	fmt.Fprintf(&b, "  control plane    ADS %s   admin %s\n", c.xdsListen, u.url(c.xdsAdmin, "/status"))
	fmt.Fprintf(&b, "  ext_proc         %s   admin %s\n", c.extprocListen, u.url(c.extprocAdmin, "/metrics"))
	fmt.Fprintf(&b, "  feature store    %s\n", u.featureNote)
	edge := u.url(c.edgeListener, "")
	if envoyUp {
		fmt.Fprintf(&b, "  Envoy edge       %s   ready/metrics http://%s/ready, /stats/prometheus\n", edge, c.envoyStat)
	} else {
		fmt.Fprintf(&b, "\n%s\n", envoyNote)
	}
	if u.tls != nil {
		fmt.Fprintf(&b, "\nMutual TLS on every hop (--tls): a throwaway CA and certificates in %s\n", u.tls.dir)
		fmt.Fprintf(&b, "  (ca.crt; <role>.crt/.key with URI SAN %s<role> for %s). Plain-text clients are refused.\n", envoy.IdentityPrefix, strings.Join(upRoles, ", "))
	}
	ranker := `{"inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":[0.5,1.2,3.4,0.1,0.0,2.2,1.1,0.7]}]}`
	recs := `{"inputs":[{"name":"user_id","datatype":"INT64","shape":[1],"data":[42]}]}`
	churn := `{"model_name":"churn","inputs":[{"name":"features","datatype":"FP32","shape":[1,4],"contents":{"fp32_contents":[0.3,12,1,0]}}]}`
	rankerGRPC := `{"model_name":"ranker","inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"contents":{"fp32_contents":[0.5,1.2,3.4,0.1,0.0,2.2,1.1,0.7]}}]}`
	churnREST := `{"inputs":[{"name":"features","datatype":"FP32","shape":[1,4],"data":[0.3,12,1,0]}]}`
	fmt.Fprintf(&b, "\nTry:\n")
	if envoyUp {
		fmt.Fprintf(&b, "  # through Envoy (these lines need Envoy; the direct and proxyless lines further down need only up)\n")
		fmt.Fprintf(&b, "  # ranker through Envoy: 90/10 v7/v8, sticky per user; the answer names the version in %s\n", headers.ServedBy)
		fmt.Fprintf(&b, "  %s -si -H '%s: alice' -H 'content-type: application/json' -d '%s' %s/v2/models/ranker/infer\n", curl, headers.UserID, ranker, edge)
		fmt.Fprintf(&b, "  # the ranker-ltv experiment through Envoy (20%% of US/CA users): see %s on the response\n", headers.Experiments)
		fmt.Fprintf(&b, "  for u in u1 u2 u3 u4 u5 u6 u7 u8 u9 u10; do %s -s -o /dev/null -D - -H \"%s: $u\" -H 'x-country: US' -d '%s' %s/v2/models/ranker/infer | grep -i x-patchbay; done\n", curl, headers.UserID, ranker, edge)
		fmt.Fprintf(&b, "  # the same ranker over OIP gRPC through Envoy and the same split (without Envoy: the xds:///ranker line below): alice gets the same version (see %s)\n", headers.ServedBy)
		fmt.Fprintf(&b, "  %s -v -H '%s: ranker' -H '%s: alice' -d '%s' %s inference.GRPCInferenceService/ModelInfer\n", grpcurl, headers.Model, headers.UserID, rankerGRPC, c.edgeListener)
		fmt.Fprintf(&b, "  # recs through Envoy, balanced over both hosts\n")
		fmt.Fprintf(&b, "  %s -s -H '%s: bob' -d '%s' %s/v2/models/recs/infer\n", curl, headers.UserID, recs, edge)
		fmt.Fprintf(&b, "  # churn (50/50 v1/v2) over OIP gRPC, then REST, through Envoy\n")
		fmt.Fprintf(&b, "  %s -H '%s: churn' -H '%s: carol' -d '%s' %s inference.GRPCInferenceService/ModelInfer\n", grpcurl, headers.Model, headers.UserID, churn, c.edgeListener)
		fmt.Fprintf(&b, "  %s -s -H '%s: carol' -d '%s' %s/v2/models/churn/infer\n", curl, headers.UserID, churnREST, edge)
		if u.hasModel("fraud") {
			fmt.Fprintf(&b, "  # fraud through Envoy: 50/50 sticky per user between XGBoost (v1) and an ONNX MLP (v2); %s names the one that answered\n", headers.ServedBy)
			fmt.Fprintf(&b, "  %s -si -H '%s: dave' -d '%s' %s/v2/models/fraud/infer\n", curl, headers.UserID, fraudREST, edge)
		}
	}
	fmt.Fprintf(&b, "  # a model host directly (no routing): pick the version yourself\n")
	fmt.Fprintf(&b, "  %s -s -d '%s' %s/v2/models/ranker/versions/v7/infer\n", curl, ranker, u.url(c.hostHTTP[0], ""))
	fmt.Fprintf(&b, "  %s -d '%s' %s inference.GRPCInferenceService/ModelInfer\n", grpcurl, churn, c.hostGRPC[0])
	u.printFeatureTry(&b, curl)
	u.printONNXTry(&b, curl)
	fmt.Fprintf(&b, "  # the model repository API lives only on a host's admin listener, behind the token\n")
	fmt.Fprintf(&b, "  %s -s -X POST -H \"Authorization: Bearer $(cat %s)\" %s\n", curl, tokenFile, u.url(c.hostAdmin[0], "/v2/repository/index"))
	fmt.Fprintf(&b, "  # proxyless gRPC, no Envoy: a gRPC client with xDS support (grpcurl, grpc-go) reads the bootstrap\n")
	fmt.Fprintf(&b, "  # and routes itself through the control plane's split; dial xds:///<model> for each model\n")
	recsGRPC := `{"model_name":"recs","inputs":[{"name":"user_id","datatype":"INT64","shape":[1],"contents":{"int64_contents":[42]}}]}`
	fraudGRPC := `{"model_name":"fraud","inputs":[{"name":"x","datatype":"FP32","shape":[1,6],"contents":{"fp32_contents":[1.2,-0.3,0.8,1.5,0,0.4]}}]}`
	for _, body := range []string{rankerGRPC, churn, recsGRPC, fraudGRPC} {
		var req struct {
			Model string `json:"model_name"`
		}
		_ = json.Unmarshal([]byte(body), &req)
		fmt.Fprintf(&b, "  GRPC_XDS_BOOTSTRAP=%s %s -d '%s' xds:///%s inference.GRPCInferenceService/ModelInfer\n", grpcBootstrap, grpcurl, body, req.Model)
	}
	if users := u.featureUsers(); users != nil {
		fmt.Fprintf(&b, "  GRPC_XDS_BOOTSTRAP=%s %s -H '%s: %s' -H 'x-device: mobile' -d '{\"model_name\":\"%s\",\"inputs\":[]}' xds:///%[5]s inference.GRPCInferenceService/ModelInfer\n",
			grpcBootstrap, grpcurl, headers.UserID, users[0], featureModel)
	}
	if u.tls != nil {
		fmt.Fprintf(&b, "  (mTLS to the control plane from the bootstrap's tls channel credentials; dial with xDS credentials,\n")
		fmt.Fprintf(&b, "   google.golang.org/grpc/credentials/xds, for mTLS to the model hosts from its %q certificate provider)\n", grpcCertProvider)
	}
	fmt.Fprintf(&b, "  # control plane: state, then an instant rollback; or edit %s (live in milliseconds)\n", c.rollouts)
	fmt.Fprintf(&b, "  %s -s %s\n", curl, u.url(c.xdsAdmin, "/status"))
	fmt.Fprintf(&b, "  %s -s -X POST -H \"Authorization: Bearer $(cat %s)\" %s\n", curl, tokenFile, u.url(c.xdsAdmin, "/v1/models/ranker/rollback"))
	fmt.Fprintf(&b, "  # no grpcurl? go install github.com/fullstorydev/grpcurl/cmd/grpcurl@latest  (run the lines from the repository root: -import-path api/oip)\n")
	fmt.Fprintf(&b, "\nCtrl-C stops everything (or kill -INT %d, this process).\n", os.Getpid())
	fmt.Fprint(u.stdout, b.String())
}

// prefixLog writes each part's output line by line, prefixed with the part's name.
type prefixLog struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *prefixLog) printf(name, format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fmt.Fprintf(l.w, "%-12s| %s\n", name, fmt.Sprintf(format, args...))
}

func (l *prefixLog) writer(name string) *lineWriter {
	return &lineWriter{log: l, name: name}
}

// lineWriter buffers a partial line until its newline arrives.
type lineWriter struct {
	log  *prefixLog
	name string
	mu   sync.Mutex
	buf  []byte
}

// maxLine bounds a buffered partial line; longer ones are written in pieces.
const maxLine = 64 << 10

func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			if len(w.buf) > maxLine {
				w.emit(w.buf)
				w.buf = w.buf[:0]
			}
			return len(p), nil
		}
		w.emit(w.buf[:i])
		w.buf = w.buf[i+1:]
	}
}

func (w *lineWriter) emit(line []byte) {
	w.log.mu.Lock()
	defer w.log.mu.Unlock()
	bw := bufio.NewWriter(w.log.w)
	fmt.Fprintf(bw, "%-12s| ", w.name)
	bw.Write(bytes.TrimRight(line, "\r"))
	bw.WriteByte('\n')
	bw.Flush()
}

// flush writes a last line that had no newline.
func (w *lineWriter) flush() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.buf) > 0 {
		w.emit(w.buf)
		w.buf = nil
	}
}
