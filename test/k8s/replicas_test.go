package k8s

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	xdsresolver "google.golang.org/grpc/xds"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/util/retry"

	v1 "github.com/patchbay-io/patchbay/api/k8s/v1"
	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/test/oiphost"
	"github.com/patchbay-io/patchbay/xds"
	"github.com/patchbay-io/patchbay/xds/endpointslice"
	"github.com/patchbay-io/patchbay/xds/kube"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// cpReplica is one control-plane replica in process, wired as `patchbay xds --source
// kubernetes` wires it (cmd/patchbay/xds.go kubernetesSource): kube.Source for Rollouts,
// kube.Store for state in their status, the EndpointSlice resolver for Service names with
// its OnChange re-resolving at once; ADS and admin on their own 127.0.0.1 listeners.
type cpReplica struct {
	name  string
	srv   *xds.Server
	ads   string
	admin string
	stop  func() // ends it (idempotent), as a killed pod's process ends
}

// cpOptions adjust a replica.
type cpOptions struct {
	// dnsRefresh is Config.DNSRefresh (0: one hour, so only EndpointSlice changes and new
	// names re-resolve).
	dnsRefresh time.Duration
}

const adminToken = "replicas-test-admin-token-of-32-bytes-or-more"

func startCP(t *testing.T, ns, name string, o cpOptions) *cpReplica {
	t.Helper()
	if o.dnsRefresh == 0 {
		o.dnsRefresh = time.Hour
	}
	cfg := kubeConfig(t, ns)
	cfg.Logger = zerolog.New(newTestLog(t)).With().Timestamp().Str("replica", name).Logger()
	ctx, cancel := context.WithCancel(context.Background())
	var ref atomic.Pointer[xds.Server]
	res := endpointslice.New(clients(t).Kube, endpointslice.Options{Namespace: ns, Next: net.DefaultResolver.LookupHost,
		OnChange: func() {
			if s := ref.Load(); s != nil {
				s.ResolveNow()
			}
		}})
	res.Start(ctx)
	srv, err := xds.New(xds.Config{Source: kube.NewSource(cfg), Store: kube.NewStore(cfg), Logger: cfg.Logger,
		LookupHost: res.LookupHost, Zones: res.Zones, DNSRefresh: o.dnsRefresh, AdminToken: adminToken,
		Translate: translate.Options{EdgeAddress: "127.0.0.1:10000", SidecarAddress: "127.0.0.1:15001"}})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	ref.Store(srv)
	gl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	al, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Run(ctx, gl, al); err != nil && ctx.Err() == nil {
			t.Errorf("replica %s: %v", name, err)
		}
	}()
	var once sync.Once
	r := &cpReplica{name: name, srv: srv, ads: gl.Addr().String(), admin: al.Addr().String(),
		stop: func() { once.Do(func() { cancel(); <-done }) }}
	t.Cleanup(r.stop)
	return r
}

// testLog writes log lines into the test's log until the test and its cleanups are over,
// then drops them: a replica's informer callbacks may still log while it shuts down.
type testLog struct {
	t    *testing.T
	mu   sync.Mutex
	done bool
}

func newTestLog(t *testing.T) *testLog {
	l := &testLog{t: t}
	t.Cleanup(func() { // registered first: runs after the cleanups that stop replicas
		l.mu.Lock()
		l.done = true
		l.mu.Unlock()
	})
	return l
}

func (l *testLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.done {
		l.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

// writeSpec replaces a Rollout's spec as `kubectl replace` does, re-reading it when a
// replica's status write got in first (a conflict on the resourceVersion).
func writeSpec(t *testing.T, ns, manifest string) {
	t.Helper()
	want := parseManifest(t, manifest)
	rc := clients(t).Dynamic.Resource(v1.GroupVersionResource).Namespace(ns)
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur, err := rc.Get(context.Background(), want.GetName(), metav1.GetOptions{})
		if err != nil {
			return err
		}
		cur.Object["spec"] = want.Object["spec"]
		_, err = rc.Update(context.Background(), cur, metav1.UpdateOptions{FieldValidation: "Strict"})
		return err
	})
	if err != nil {
		t.Fatalf("update %s: %v", want.GetName(), err)
	}
}

// model is what a replica serves of a model (nil: not served) and its config version.
func (r *cpReplica) model(name string) (*xds.ModelStatus, string) {
	st := r.srv.Status()
	for i := range st.Models {
		if st.Models[i].Name == name {
			return &st.Models[i], st.ConfigVersion
		}
	}
	return nil, st.ConfigVersion
}

// manifest is a kubectl-shaped Rollout of gRPC versions (v1, v2, ... in name order).
func manifest(name string, endpoints map[string]string, traffic map[string]int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: patchbay.io/v1\nkind: Rollout\nmetadata:\n  name: %s\nspec:\n  versions:\n", name)
	vs := make([]string, 0, len(endpoints))
	for v := range endpoints {
		vs = append(vs, v)
	}
	sort.Strings(vs)
	for _, v := range vs {
		fmt.Fprintf(&b, "    - name: %s\n      endpoints: [%q]\n      protocol: grpc\n", v, endpoints[v])
	}
	b.WriteString("  traffic:\n")
	for _, v := range vs {
		fmt.Fprintf(&b, "    %s: %d\n", v, traffic[v])
	}
	return b.String()
}

// serviceProxy is a TEST-ONLY TCP forwarder that models the Kubernetes Service in front
// of the control-plane replicas (what kube-proxy does for a ClusterIP Service): each new
// connection goes to the next live replica, round-robin; a replica removed (killed, or not
// ready) gets no new connection, and its open connections are cut, as the death of its
// pod cuts them. It forwards bytes and knows nothing of gRPC or xDS.
type serviceProxy struct {
	lis      net.Listener
	mu       sync.Mutex
	backends []string
	next     int
	conns    map[string]map[net.Conn]struct{} // per backend, both ends of each forwarded connection
	wg       sync.WaitGroup
}

func startServiceProxy(t *testing.T, backends ...string) *serviceProxy {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &serviceProxy{lis: lis, backends: backends, conns: map[string]map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.serve()
	t.Cleanup(func() {
		lis.Close()
		p.mu.Lock()
		for _, cs := range p.conns {
			for c := range cs {
				c.Close()
			}
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

func (p *serviceProxy) addr() string { return p.lis.Addr().String() }

func (p *serviceProxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.lis.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		if len(p.backends) == 0 {
			p.mu.Unlock()
			c.Close() // no endpoint: refused
			continue
		}
		b := p.backends[p.next%len(p.backends)]
		p.next++
		p.mu.Unlock()
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.forward(c, b)
		}()
	}
}

func (p *serviceProxy) forward(c net.Conn, backend string) {
	u, err := net.DialTimeout("tcp", backend, 2*time.Second)
	if err != nil {
		c.Close()
		return
	}
	p.mu.Lock()
	if !slices.Contains(p.backends, backend) { // removed while dialling
		p.mu.Unlock()
		c.Close()
		u.Close()
		return
	}
	if p.conns[backend] == nil {
		p.conns[backend] = map[net.Conn]struct{}{}
	}
	p.conns[backend][c], p.conns[backend][u] = struct{}{}, struct{}{}
	p.mu.Unlock()
	var wg sync.WaitGroup
	wg.Add(2)
	pipe := func(dst, src net.Conn) {
		defer wg.Done()
		_, _ = io.Copy(dst, src)
		dst.Close()
		src.Close()
	}
	go pipe(u, c)
	go pipe(c, u)
	wg.Wait()
	p.mu.Lock()
	delete(p.conns[backend], c)
	delete(p.conns[backend], u)
	p.mu.Unlock()
}

// add makes a replica a live endpoint of the Service.
func (p *serviceProxy) add(backend string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.backends = append(p.backends, backend)
}

// remove takes a replica out of the Service and cuts its connections.
func (p *serviceProxy) remove(backend string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.backends = slices.DeleteFunc(p.backends, func(b string) bool { return b == backend })
	for c := range p.conns[backend] {
		c.Close()
	}
}

// connected lists the replicas holding open connections.
func (p *serviceProxy) connected() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for b, cs := range p.conns {
		if len(cs) > 0 {
			out = append(out, b)
		}
	}
	sort.Strings(out)
	return out
}

// grpcClient dials xds:///<model> with grpc-go's own xDS client (proxyless), its bootstrap
// naming adsAddr as the management server: it has its own xDS client and ADS stream.
func grpcClient(t *testing.T, adsAddr, model string, opts ...grpc.DialOption) oip.GRPCInferenceServiceClient {
	t.Helper()
	bootstrap := fmt.Sprintf(`{
		"xds_servers": [{"server_uri": %q, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
		"node": {"id": "k8s-replicas-test-%d", "locality": {"region": "patchbay"}}
	}`, adsAddr, time.Now().UnixNano())
	rb, err := xdsresolver.NewXDSResolverWithConfigForTesting([]byte(bootstrap))
	if err != nil {
		t.Fatal(err)
	}
	opts = append(opts, grpc.WithResolvers(rb), grpc.WithTransportCredentials(insecure.NewCredentials()))
	conn, err := grpc.NewClient("xds:///"+model, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return oip.NewGRPCInferenceServiceClient(conn)
}

// infer makes one inference call for model and returns the version that answered.
func infer(c oip.GRPCInferenceServiceClient, model string, timeout time.Duration, waitForReady bool) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	r, err := c.ModelInfer(ctx, &oip.ModelInferRequest{ModelName: model}, grpc.WaitForReady(waitForReady))
	if err != nil {
		return "", err
	}
	if r.GetModelVersion() == "" {
		return "", errors.New("answer names no version")
	}
	return r.GetModelVersion(), nil
}

// answers counts which versions answer n calls (each must succeed).
func answers(t *testing.T, c oip.GRPCInferenceServiceClient, model string, n int) map[string]int {
	t.Helper()
	out := map[string]int{}
	for i := range n {
		v, err := infer(c, model, 10*time.Second, true)
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		out[v]++
	}
	return out
}

// TestUnresolvedEndpointReachesEveryStatus: a Rollout edited so that a version with a share
// names a Service with no ready endpoint is refused by the control plane as a whole (the
// translation of the whole set is what is refused): every Rollout's Ready condition says
// so (none keeps saying Applied while its spec is not served), and nothing served changes.
// Once the Service has a ready endpoint the edit applies and every Rollout is Applied again.
// (Failed before: only a loader's rollout.Error reached Report, so both stayed Applied.)
func TestUnresolvedEndpointReachesEveryStatus(t *testing.T) {
	ns := namespace(t)
	apply(t, ns, manifest("ranker", map[string]string{"v1": "127.0.0.1:9001"}, map[string]int{"v1": 100}))
	apply(t, ns, manifest("churn", map[string]string{"v1": "127.0.0.1:9002"}, map[string]int{"v1": 100}))
	cp := startCP(t, ns, "a", cpOptions{dnsRefresh: 200 * time.Millisecond})
	applied := func(name string) func() (bool, string) {
		return func() (bool, string) {
			obj := getRollout(t, ns, name)
			c := readyCondition(obj)
			return c != nil && c.Status == "True" && c.Reason == "Applied" && c.ObservedGeneration == obj.GetGeneration(), spew(obj)
		}
	}
	eventually(t, "ranker Applied", applied("ranker"))
	eventually(t, "churn Applied", applied("churn"))
	_, version := cp.model("churn")

	missing := "missing." + ns + ".svc:8000"
	writeSpec(t, ns, manifest("churn", map[string]string{"v1": "127.0.0.1:9002", "v2": missing}, map[string]int{"v1": 90, "v2": 10}))
	for _, name := range []string{"ranker", "churn"} {
		eventually(t, name+" says the edit is not served", func() (bool, string) {
			obj := getRollout(t, ns, name)
			c := readyCondition(obj)
			return c != nil && c.Status == "False" && c.Reason == "Invalid" &&
				strings.Contains(c.Message, `model "churn" version "v2" has 10% of baseline traffic but none of its endpoints resolves`) &&
				strings.Contains(c.Message, missing), spew(obj)
		})
	}
	m, v := cp.model("churn")
	if v != version || m == nil || m.Traffic["v1"] != 100 || m.Traffic["v2"] != 0 {
		t.Fatalf("a refused edit changed what is served: version %s (was %s), %+v", v, version, m)
	}

	// The Service gets a ready pod: the edit applies, every Rollout is Applied again.
	kc := clients(t).Kube
	if _, err := kc.DiscoveryV1().EndpointSlices(ns).Create(context.Background(),
		slice(ns, "missing-a", "missing", "IPv4", ep{addr: "192.0.2.3"}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "churn serves 90/10", func() (bool, string) {
		m, v := cp.model("churn")
		return m != nil && m.Traffic["v2"] == 10 && v != version, fmt.Sprintf("%s %+v", v, m)
	})
	eventually(t, "ranker Applied again", applied("ranker"))
	eventually(t, "churn Applied again", applied("churn"))
}

// podNetwork is a TEST-ONLY model of the pod network for a client's data-plane connections:
// the API server refuses loopback addresses in EndpointSlices, so the slices hold pod IPs
// of TEST-NET-1 (192.0.2.0/24), and this dialer carries a connection to such a pod
// address:port to the 127.0.0.1 listener of the host playing that pod. Any other address
// is dialled as it is. Every connection stays on loopback.
type podNetwork map[string]string

func (p podNetwork) dialer() grpc.DialOption {
	return grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
		if to, ok := p[addr]; ok {
			addr = to
		}
		var d net.Dialer
		return d.DialContext(ctx, "tcp", addr)
	})
}

// TestEndpointSliceChangeReResolvesAtOnce: a Service's pod stops being ready (its
// EndpointSlice says so) and the control plane re-resolves the Service name at once
// (endpointslice Options.OnChange → xds.Server.ResolveNow): the served EDS drops the pod
// and the grpc-go client stops sending it calls, with the DNS refresh set to an hour, so
// nothing else could have done it. (Failed before: names were re-resolved only every
// --dns-refresh.) The time seen is logged.
func TestEndpointSliceChangeReResolvesAtOnce(t *testing.T) {
	ns := namespace(t)
	a, b := oiphost.Start(t, "ranker", "v1"), oiphost.Start(t, "ranker", "v1")
	const port = "8000"
	pods := podNetwork{"192.0.2.1:" + port: a.GRPC, "192.0.2.2:" + port: b.GRPC}
	kc := clients(t).Kube
	ctx := context.Background()
	if _, err := kc.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice(ns, "ranker-v1-a", "ranker-v1", "IPv4",
		ep{addr: "192.0.2.1"}, ep{addr: "192.0.2.2"}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	host := "ranker-v1." + ns + ".svc"
	apply(t, ns, manifest("ranker", map[string]string{"v1": host + ":" + port}, map[string]int{"v1": 100}))
	cp := startCP(t, ns, "a", cpOptions{dnsRefresh: time.Hour})
	servedAddrs := func() []string {
		m, _ := cp.model("ranker")
		if m == nil || len(m.Endpoints["v1"]) == 0 {
			return nil
		}
		return m.Endpoints["v1"][0].Addresses
	}
	eventually(t, "both pods served", func() (bool, string) {
		got := servedAddrs()
		return slices.Equal(got, []string{"192.0.2.1:" + port, "192.0.2.2:" + port}), fmt.Sprint(got)
	})
	client := grpcClient(t, cp.ads, "ranker", pods.dialer())
	eventually(t, "the client uses both pods", func() (bool, string) {
		answers(t, client, "ranker", 10)
		return a.Served("v1") > 0 && b.Served("v1") > 0, fmt.Sprintf("pod a %d, pod b %d", a.Served("v1"), b.Served("v1"))
	})

	s, err := kc.DiscoveryV1().EndpointSlices(ns).Get(ctx, "ranker-v1-a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s.Endpoints[1].Conditions.Ready = ptr(false) // pod b
	start := time.Now()
	if _, err := kc.DiscoveryV1().EndpointSlices(ns).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	var edsGone, clientGone time.Duration
	for deadline := start.Add(10 * time.Second); edsGone == 0 || clientGone == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("10 s after pod b became not ready (DNS refresh: 1 h): served %v, client still uses it (%v)", servedAddrs(), clientGone == 0)
		}
		if edsGone == 0 && slices.Equal(servedAddrs(), []string{"192.0.2.1:" + port}) {
			edsGone = time.Since(start)
		}
		if clientGone == 0 {
			before := b.Served("v1")
			answers(t, client, "ranker", 20)
			if b.Served("v1") == before {
				clientGone = time.Since(start)
			}
		}
	}
	t.Logf("pod b not ready: gone from the served EDS after %v, the grpc-go client stopped using it after %v (20 calls in a row on pod a)",
		edsGone.Round(time.Millisecond), clientGone.Round(time.Millisecond))
	// And it stays gone.
	before := b.Served("v1")
	answers(t, client, "ranker", 50)
	if b.Served("v1") != before {
		t.Fatalf("pod b answered %d calls after it left EDS", b.Served("v1")-before)
	}
}

// fleet is a model served by control-plane replicas in process, behind a serviceProxy,
// with one real OIP host per version (test/oiphost: every answer's model_version names
// the version that ran).
type fleet struct {
	t      *testing.T
	ns     string
	model  string
	eps    map[string]string
	hosts  map[string]*oiphost.Host
	live   []*cpReplica
	proxy  *serviceProxy
	seq    int
	began  time.Time       // the Rollout was created
	writes []time.Duration // write → every live replica serves it, per write
}

func newFleet(t *testing.T, replicas int, traffic map[string]int) *fleet {
	t.Helper()
	f := &fleet{t: t, ns: namespace(t), model: "ranker", eps: map[string]string{}, hosts: map[string]*oiphost.Host{}}
	for _, v := range []string{"v1", "v2", "v3"} {
		f.hosts[v] = oiphost.Start(t, f.model, v)
		f.eps[v] = f.hosts[v].GRPC
	}
	f.began = time.Now()
	apply(t, f.ns, manifest(f.model, f.eps, traffic)) // kubectl-shaped YAML, as kubectl sends it
	f.proxy = startServiceProxy(t)
	for range replicas {
		f.start()
	}
	return f
}

// start runs a new replica and makes it an endpoint of the Service.
func (f *fleet) start() *cpReplica {
	f.seq++
	r := startCP(f.t, f.ns, fmt.Sprintf("r%d", f.seq), cpOptions{})
	f.live = append(f.live, r)
	f.proxy.add(r.ads)
	return r
}

// kill ends a replica as a pod kill does: out of the Service, connections cut, process gone.
func (f *fleet) kill(r *cpReplica) {
	f.proxy.remove(r.ads)
	r.stop()
	f.live = slices.DeleteFunc(f.live, func(x *cpReplica) bool { return x == r })
}

// agreed is what every live replica serves once they agree.
type agreed struct {
	version string
	model   xds.ModelStatus
}

// agree waits until every live replica serves the model as want says, all with one config
// version, one slot map and one rollback state, and returns that and how long it took from
// since; then checks that the Store (the Rollout's status) holds the same slot map.
func (f *fleet) agree(what string, since time.Time, want func(m *xds.ModelStatus) bool) (agreed, time.Duration) {
	f.t.Helper()
	var last string
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(2 * time.Millisecond) {
		ok, got := f.agreeNow(want)
		if ok {
			took := time.Since(since)
			f.checkStore(what, got)
			f.t.Logf("%s: %d replicas serve config %s (%s) %v after the write", what, len(f.live), got.version, runsString(got.model.SlotRuns), took.Round(time.Millisecond))
			return got, took
		}
		last = got.version
		if time.Now().After(deadline) {
			var b strings.Builder
			for _, r := range f.live {
				m, v := r.model(f.model)
				fmt.Fprintf(&b, "\n  %s: version %s %+v error %v", r.name, v, m, r.srv.Status().CurrentError)
			}
			f.t.Fatalf("%s: replicas do not agree within 30 s (last %s):%s", what, last, b.String())
		}
	}
}

// write changes the Rollout's spec (kubectl replace) and waits until every live replica
// serves it with one config version and slot map; the time is recorded.
func (f *fleet) write(traffic map[string]int) agreed {
	f.t.Helper()
	start := time.Now()
	writeSpec(f.t, f.ns, manifest(f.model, f.eps, traffic))
	got, took := f.agree(fmt.Sprintf("write %v", traffic), start, func(m *xds.ModelStatus) bool {
		return m.Rollback == nil && sameSplit(m.Traffic, traffic)
	})
	f.writes = append(f.writes, took)
	return got
}

func (f *fleet) agreeNow(want func(m *xds.ModelStatus) bool) (bool, agreed) {
	var first *agreed
	for _, r := range f.live {
		m, v := r.model(f.model)
		if m == nil || !want(m) {
			return false, agreed{version: v}
		}
		a := agreed{version: v, model: *m}
		if first == nil {
			first = &a
			continue
		}
		if a.version != first.version || !slices.Equal(a.model.SlotRuns, first.model.SlotRuns) || (a.model.Rollback == nil) != (first.model.Rollback == nil) {
			return false, a
		}
	}
	return first != nil, *first
}

// checkStore compares the slot map and config version kept in the Rollout's status with
// what the replicas serve.
func (f *fleet) checkStore(what string, got agreed) {
	f.t.Helper()
	st, err := kube.NewStore(kubeConfig(f.t, f.ns)).Load(context.Background())
	if err != nil {
		f.t.Fatal(err)
	}
	ms := st[f.model]
	var runs []translate.Run
	for _, r := range ms.Slots {
		runs = append(runs, translate.Run{Version: r.Version, Weight: uint32(r.Slots)})
	}
	if !slices.Equal(runs, got.model.SlotRuns) || ms.ConfigVersion != got.version {
		f.t.Fatalf("%s: the Rollout's status holds slots %v config %s; the replicas serve %v config %s",
			what, runsString(runs), ms.ConfigVersion, runsString(got.model.SlotRuns), got.version)
	}
}

func runsString(runs []translate.Run) string {
	var parts []string
	for _, r := range runs {
		parts = append(parts, fmt.Sprintf("%s×%d", r.Version, r.Weight))
	}
	return strings.Join(parts, " ")
}

// slotsOf expands runs to the version of each slot.
func slotsOf(runs []translate.Run) []string {
	var out []string
	for _, r := range runs {
		for range r.Weight {
			out = append(out, r.Version)
		}
	}
	return out
}

func sameSplit(a, b map[string]int) bool {
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	for k, v := range b {
		if a[k] != v {
			return false
		}
	}
	return true
}

// logBound logs the p50 and max of the recorded write → all-replicas-serve times.
func (f *fleet) logBound(what string) {
	d := slices.Clone(f.writes)
	if len(d) == 0 {
		return
	}
	slices.Sort(d)
	f.t.Logf("BOUND %s: write (Rollout spec update or rollback call) → all %d replicas serve one config version: p50 %v, max %v over %d writes",
		what, len(f.live), d[len(d)/2].Round(time.Millisecond), d[len(d)-1].Round(time.Millisecond), len(d))
}

// onlyFrom waits (bounded) until n calls in a row are answered by versions of want alone,
// and returns what answered them.
func onlyFrom(t *testing.T, c oip.GRPCInferenceServiceClient, model string, n int, want ...string) map[string]int {
	t.Helper()
	var got map[string]int
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		got = answers(t, c, model, n)
		ok := true
		for v := range got {
			ok = ok && slices.Contains(want, v)
		}
		if ok {
			return got
		}
	}
	t.Fatalf("calls are still answered by %v, want only %v", got, want)
	return nil
}

// TestReplicasFollowKubectlRamp, with 2 and with 3 replicas: a Rollout applied from
// kubectl-shaped YAML routes a grpc-go xDS client (which reaches the replicas through the
// Service): answers come only from the versions the split names (v3, at 0, never answers);
// then a monotone ramp of v2 10→20→…→100 done by Rollout spec updates: at every step all
// replicas serve one config version and one slot map, the one the Rollout's status holds,
// and no slot given to v2 goes back (one lineage); the client ends on v2 alone. The time
// from each write until all replicas serve it is logged (BOUND).
func TestReplicasFollowKubectlRamp(t *testing.T) {
	for _, n := range []int{2, 3} {
		t.Run(fmt.Sprintf("%d replicas", n), func(t *testing.T) {
			f := newFleet(t, n, map[string]int{"v1": 90, "v2": 10, "v3": 0})
			got, _ := f.agree("applied", f.began, func(m *xds.ModelStatus) bool { return m.Traffic["v2"] == 10 })
			client := grpcClient(t, f.proxy.addr(), f.model)
			seen := onlyFrom(t, client, f.model, 200, "v1", "v2")
			if seen["v1"] == 0 || seen["v2"] == 0 {
				t.Fatalf("200 calls on a 90/10 split answered by %v: want both", seen)
			}
			prev := slotsOf(got.model.SlotRuns)
			for p := 20; p <= 100; p += 10 {
				got = f.write(map[string]int{"v1": 100 - p, "v2": p, "v3": 0})
				slots := slotsOf(got.model.SlotRuns)
				for i := range prev {
					if prev[i] == "v2" && slots[i] != "v2" {
						t.Fatalf("v2 at %d%%: slot %d went back from v2 to %s (not monotone): %s", p, i, slots[i], runsString(got.model.SlotRuns))
					}
				}
				prev = slots
				onlyFrom(t, client, f.model, 20, "v1", "v2")
			}
			onlyFrom(t, client, f.model, 50, "v2")
			if s := f.hosts["v3"].Served("v3"); s != 0 {
				t.Fatalf("v3, at 0 throughout, answered %d calls", s)
			}
			f.logBound(fmt.Sprintf("ramp, %d replicas", n))
		})
	}
}

// adminPost calls a replica's admin API with the admin token.
func adminPost(t *testing.T, r *cpReplica, path, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, "http://"+r.admin+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+adminToken)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// caller calls the model without pause in the background (no WaitForReady, 2 s timeout:
// a config lost or partial fails calls at once) and counts the outcomes.
type caller struct {
	calls, failures, strays atomic.Int64
	mu                      sync.Mutex
	firstErr                error
	stop                    chan struct{}
	done                    chan struct{}
}

func startCaller(c oip.GRPCInferenceServiceClient, model string, want ...string) *caller {
	k := &caller{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(k.done)
		for {
			select {
			case <-k.stop:
				return
			default:
			}
			v, err := infer(c, model, 2*time.Second, false)
			k.calls.Add(1)
			switch {
			case err != nil:
				k.failures.Add(1)
				k.mu.Lock()
				if k.firstErr == nil {
					k.firstErr = err
				}
				k.mu.Unlock()
			case !slices.Contains(want, v):
				k.strays.Add(1)
			}
		}
	}()
	return k
}

func (k *caller) finish() {
	close(k.stop)
	<-k.done
}

// waitCalls waits (bounded) until n more calls were made.
func (k *caller) waitCalls(t *testing.T, n int64) {
	t.Helper()
	target := k.calls.Load() + n
	for deadline := time.Now().Add(30 * time.Second); k.calls.Load() < target; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the caller is stuck at %d calls", k.calls.Load())
		}
	}
}

// TestReplicasRollbackKillAndRollingRestart, 3 replicas behind the Service, a grpc-go xDS
// client through it:
//   - a rollback taken through one replica's admin API is served by all three (one config
//     version and slot map, the one in the Rollout's status, which says RolledBack) and the
//     client follows (v1 alone answers);
//   - a replica killed between two spec updates (right after the first write, whatever it
//     had applied) loses nothing: the other two serve the second update, and the replica
//     restarted serves exactly their config version and slot map;
//   - a rolling restart — the replica the client is connected to killed first, then the
//     others one by one, each replaced before the next goes — while the client calls
//     without pause: every call succeeds and is answered by a version of the split (never an
//     empty or partial config), the client reconnects to the new replicas, and then follows
//     the next edit.
//
// The time from each write or rollback call until all replicas serve it is logged (BOUND).
func TestReplicasRollbackKillAndRollingRestart(t *testing.T) {
	f := newFleet(t, 3, map[string]int{"v1": 80, "v2": 20, "v3": 0})
	f.agree("applied", f.began, func(m *xds.ModelStatus) bool { return m.Traffic["v2"] == 20 })
	client := grpcClient(t, f.proxy.addr(), f.model)
	onlyFrom(t, client, f.model, 50, "v1", "v2")
	f.write(map[string]int{"v1": 50, "v2": 50, "v3": 0})

	// A rollback through one replica's admin API.
	via := f.live[1]
	start := time.Now()
	if code, body := adminPost(t, via, "/v1/models/"+f.model+"/rollback", `{"version": "v1"}`); code != http.StatusOK {
		t.Fatalf("rollback through %s: %d %s", via.name, code, body)
	}
	rolled, took := f.agree("rollback through "+via.name, start, func(m *xds.ModelStatus) bool {
		return m.Rollback != nil && sameSplit(m.Traffic, map[string]int{"v1": 100})
	})
	f.writes = append(f.writes, took)
	onlyFrom(t, client, f.model, 50, "v1")
	eventually(t, "status RolledBack", func() (bool, string) {
		obj := getRollout(t, f.ns, f.model)
		c := readyCondition(obj)
		split, _, _ := unstructured.NestedString(obj.Object, "status", "split")
		return c != nil && c.Reason == "RolledBack" && split == "v1=100", spew(obj)
	})
	t.Logf("rollback served by all: config %s", rolled.version)

	// A replica killed between two spec updates.
	victim := f.live[2]
	writeSpec(t, f.ns, manifest(f.model, f.eps, map[string]int{"v1": 40, "v2": 60, "v3": 0}))
	f.kill(victim)
	want := map[string]int{"v1": 30, "v2": 70, "v3": 0}
	edited := f.write(want)
	restarted := f.start()
	again, _ := f.agree("replica "+restarted.name+" started after "+victim.name+" was killed mid-edit", time.Now(), func(m *xds.ModelStatus) bool {
		return sameSplit(m.Traffic, want)
	})
	if again.version != edited.version || !slices.Equal(again.model.SlotRuns, edited.model.SlotRuns) {
		t.Fatalf("after the restart: config %s %s; before it the others served %s %s",
			again.version, runsString(again.model.SlotRuns), edited.version, runsString(edited.model.SlotRuns))
	}
	onlyFrom(t, client, f.model, 20, "v1", "v2")

	// A rolling restart while the client calls without pause.
	conn := f.proxy.connected()
	if len(conn) != 1 {
		t.Fatalf("the client's ADS connections go to %v, want one replica", conn)
	}
	var order []*cpReplica
	for _, r := range f.live {
		if r.ads == conn[0] {
			order = append([]*cpReplica{r}, order...)
		} else {
			order = append(order, r)
		}
	}
	old := map[string]bool{}
	for _, r := range order {
		old[r.ads] = true
	}
	k := startCaller(client, f.model, "v1", "v2")
	k.waitCalls(t, 20)
	began := time.Now()
	for i, r := range order {
		killed := time.Now()
		f.kill(r)
		if i == 0 {
			// The client's replica is gone: it reconnects through the Service to another.
			for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
				if c := f.proxy.connected(); len(c) == 1 && c[0] != r.ads {
					t.Logf("the client reconnected %v after its replica %s was killed", time.Since(killed).Round(time.Millisecond), r.name)
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("the client did not reconnect within 30 s: connected %v", f.proxy.connected())
				}
			}
		}
		k.waitCalls(t, 20)
		n := f.start()
		got, _ := f.agree(fmt.Sprintf("rolling restart: %s killed, %s started", r.name, n.name), killed, func(m *xds.ModelStatus) bool {
			return sameSplit(m.Traffic, want)
		})
		if got.version != edited.version || !slices.Equal(got.model.SlotRuns, edited.model.SlotRuns) {
			t.Fatalf("replica %s serves config %s %s, want %s %s", n.name, got.version, runsString(got.model.SlotRuns), edited.version, runsString(edited.model.SlotRuns))
		}
		k.waitCalls(t, 20)
	}
	// The client must be connected to a new replica by now (every old one is gone).
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if c := f.proxy.connected(); len(c) == 1 && !old[c[0]] {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the client's ADS connections go to %v, want one new replica", f.proxy.connected())
		}
	}
	k.finish()
	k.mu.Lock()
	firstErr := k.firstErr
	k.mu.Unlock()
	t.Logf("rolling restart of 3 replicas in %v: %d calls, %d failed, %d answered by a version outside the split",
		time.Since(began).Round(time.Millisecond), k.calls.Load(), k.failures.Load(), k.strays.Load())
	if k.failures.Load() != 0 || k.strays.Load() != 0 {
		t.Fatalf("during the rolling restart %d of %d calls failed (first: %v) and %d were answered outside the split",
			k.failures.Load(), k.calls.Load(), firstErr, k.strays.Load())
	}

	// The client follows the next edit, served by the new replicas.
	f.write(map[string]int{"v1": 0, "v2": 100, "v3": 0})
	onlyFrom(t, client, f.model, 50, "v2")
	if s := f.hosts["v3"].Served("v3"); s != 0 {
		t.Fatalf("v3, at 0 throughout, answered %d calls", s)
	}
	f.logBound("3 replicas: edits, a rollback, kills and restarts")
}

// TestBinaryReResolvesOnSliceChange: the shipped `patchbay xds --source kubernetes`, with
// --dns-refresh an hour, drops a pod from a Service's addresses as soon as its
// EndpointSlice says it is not ready (cmd/patchbay wires the resolver's OnChange to
// ResolveNow; failed before: the change waited for the refresh).
func TestBinaryReResolvesOnSliceChange(t *testing.T) {
	bin := buildPatchbay(t)
	ns := namespace(t)
	kc := clients(t).Kube
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := kc.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice(ns, "hosts-a", "hosts", "IPv4",
		ep{addr: "192.0.2.1"}, ep{addr: "192.0.2.2"}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	host := "hosts." + ns + ".svc"
	apply(t, ns, manifest("ranker", map[string]string{"v1": host + ":8000"}, map[string]int{"v1": 100}))
	r := &replica{admin: freeAddr(t), logs: &bytes.Buffer{}, done: make(chan struct{})}
	cmd := exec.CommandContext(ctx, bin, "xds", "--source", "kubernetes", "--kubeconfig", writeKubeconfig(t), "--namespace", ns,
		"--listen", freeAddr(t), "--admin", r.admin, "--dns-refresh", "1h", "--version-health-interval", "0")
	cmd.Stdout, cmd.Stderr = r.logs, r.logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = cmd.Wait(); close(r.done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case <-r.done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-r.done
		}
		if t.Failed() {
			t.Logf("patchbay xds log:\n%s", r.logs.String())
		}
	})
	addrs := func(want ...string) func(cpStatus) bool {
		return func(st cpStatus) bool { return slices.Equal(st.Names[host].Addresses, want) }
	}
	r.until(t, "both pods", addrs("192.0.2.1", "192.0.2.2"))
	s, err := kc.DiscoveryV1().EndpointSlices(ns).Get(ctx, "hosts-a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s.Endpoints[1].Conditions.Ready = ptr(false)
	start := time.Now()
	if _, err := kc.DiscoveryV1().EndpointSlices(ns).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	r.until(t, "the not-ready pod dropped (refresh: 1 h)", addrs("192.0.2.1"))
	t.Logf("patchbay xds dropped the not-ready pod %v after the EndpointSlice update", time.Since(start).Round(time.Millisecond))
}

// TestEndpointSliceZonesReachTheConfig: the zones of a Service's EndpointSlice endpoints
// reach the config the control plane builds (one EDS locality per zone:
// translate.TestZonesBecomeLocalities) and /status, through the same resolver that
// answers the Service name; a pod whose zone changes is shown in its new zone.
func TestEndpointSliceZonesReachTheConfig(t *testing.T) {
	ns := namespace(t)
	a, b := oiphost.Start(t, "ranker", "v1"), oiphost.Start(t, "ranker", "v1")
	const port = "8000"
	pods := podNetwork{"192.0.2.1:" + port: a.GRPC, "192.0.2.2:" + port: b.GRPC}
	kc := clients(t).Kube
	ctx := context.Background()
	if _, err := kc.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice(ns, "ranker-v1-a", "ranker-v1", "IPv4",
		ep{addr: "192.0.2.1", zone: "zone-a"}, ep{addr: "192.0.2.2", zone: "zone-b"}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	host := "ranker-v1." + ns + ".svc"
	apply(t, ns, manifest("ranker", map[string]string{"v1": host + ":" + port}, map[string]int{"v1": 100}))
	cp := startCP(t, ns, "a", cpOptions{})
	zones := func() map[string]string {
		m, _ := cp.model("ranker")
		if m == nil || len(m.Endpoints["v1"]) == 0 {
			return nil
		}
		return m.Endpoints["v1"][0].Zones
	}
	want := map[string]string{"192.0.2.1:" + port: "zone-a", "192.0.2.2:" + port: "zone-b"}
	eventually(t, "both zones served", func() (bool, string) {
		return maps.Equal(zones(), want), fmt.Sprint(zones())
	})
	client := grpcClient(t, cp.ads, "ranker", pods.dialer())
	eventually(t, "the client uses both zones' pods", func() (bool, string) {
		answers(t, client, "ranker", 10)
		return a.Served("v1") > 0 && b.Served("v1") > 0, fmt.Sprintf("pod a %d, pod b %d", a.Served("v1"), b.Served("v1"))
	})
	s, err := kc.DiscoveryV1().EndpointSlices(ns).Get(ctx, "ranker-v1-a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s.Endpoints[1].Zone = ptr("zone-a")
	s.Endpoints[1].Addresses = []string{"192.0.2.3"} // a new pod in zone-a
	if _, err := kc.DiscoveryV1().EndpointSlices(ns).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	want = map[string]string{"192.0.2.1:" + port: "zone-a", "192.0.2.3:" + port: "zone-a"}
	eventually(t, "the new pod in zone-a", func() (bool, string) {
		return maps.Equal(zones(), want), fmt.Sprint(zones())
	})
}
