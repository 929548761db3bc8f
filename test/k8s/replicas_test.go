package k8s

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	xdsresolver "google.golang.org/grpc/xds"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

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
	cfg.Logger = cfg.Logger.With().Str("replica", name).Logger()
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
		LookupHost: res.LookupHost, DNSRefresh: o.dnsRefresh, AdminToken: adminToken,
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
	replaceSpec(t, ns, manifest("churn", map[string]string{"v1": "127.0.0.1:9002", "v2": missing}, map[string]int{"v1": 90, "v2": 10}))
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
