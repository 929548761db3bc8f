package k8s

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apiserver/pkg/storage/storagebackend"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/client-go/util/retry"
	apiservertesting "k8s.io/kubernetes/cmd/kube-apiserver/app/testing"
	"sigs.k8s.io/yaml"

	v1 "github.com/patchbay-io/patchbay/api/k8s/v1"
)

// buildPatchbay builds the patchbay binary in the main module, as it ships.
func buildPatchbay(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "patchbay")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/patchbay")
	cmd.Dir = filepath.Join("..", "..")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build patchbay: %v\n%s", err, out)
	}
	return bin
}

// writeKubeconfig writes a kubeconfig for the test API server, as an operator would have.
func writeKubeconfig(t *testing.T) string {
	t.Helper()
	return writeKubeconfigFor(t, server.Config, "")
}

// writeKubeconfigFor writes a kubeconfig for the server of cfg, with cfg's credentials or,
// when token is set, that bearer token alone.
func writeKubeconfigFor(t *testing.T, base *rest.Config, token string) string {
	t.Helper()
	c := rest.CopyConfig(base)
	if err := rest.LoadTLSFiles(c); err != nil { // CA, client certificate: inline
		t.Fatal(err)
	}
	if token != "" {
		c.BearerToken, c.CertData, c.KeyData = token, nil, nil
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["test"] = &clientcmdapi.Cluster{Server: c.Host, CertificateAuthorityData: c.CAData, TLSServerName: c.ServerName, InsecureSkipTLSVerify: c.Insecure}
	cfg.AuthInfos["operator"] = &clientcmdapi.AuthInfo{Token: c.BearerToken, ClientCertificateData: c.CertData, ClientKeyData: c.KeyData}
	cfg.Contexts["test"] = &clientcmdapi.Context{Cluster: "test", AuthInfo: "operator"}
	cfg.CurrentContext = "test"
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		t.Fatal(err)
	}
	return path
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// replica is one `patchbay xds --source kubernetes` process.
type replica struct {
	admin string
	logs  *bytes.Buffer
	done  chan struct{}
}

func startReplica(t *testing.T, ctx context.Context, bin, kubeconfig, ns string) *replica {
	t.Helper()
	r := &replica{admin: freeAddr(t), logs: &bytes.Buffer{}, done: make(chan struct{})}
	cmd := exec.CommandContext(ctx, bin, "xds", "--source", "kubernetes", "--kubeconfig", kubeconfig, "--namespace", ns,
		"--listen", freeAddr(t), "--admin", r.admin, "--dns-refresh", "200ms", "--version-health-interval", "0")
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
			t.Logf("patchbay xds (admin %s) log:\n%s", r.admin, r.logs.String())
		}
	})
	return r
}

// cpStatus is the part of a control plane's /status these tests read.
type cpStatus struct {
	Models []struct {
		Name     string         `json:"name"`
		Traffic  map[string]int `json:"traffic"`
		Rollback *struct {
			Reason string `json:"reason"`
		} `json:"rollback"`
	} `json:"models"`
	Names map[string]struct {
		Addresses []string `json:"addresses"`
		State     string   `json:"state"`
	} `json:"names"`
}

// until polls r's /status until cond holds (60 s at most), failing with the last status.
func (r *replica) until(t *testing.T, what string, cond func(cpStatus) bool) cpStatus {
	t.Helper()
	var last string
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		select {
		case <-r.done:
			t.Fatalf("patchbay xds (admin %s) exited:\n%s", r.admin, r.logs.String())
		default:
		}
		resp, err := http.Get("http://" + r.admin + "/status")
		if err != nil {
			last = err.Error()
			continue
		}
		var st cpStatus
		err = json.NewDecoder(resp.Body).Decode(&st)
		resp.Body.Close()
		if err != nil {
			last = err.Error()
			continue
		}
		if cond(st) {
			return st
		}
		last = fmt.Sprintf("%+v", st)
	}
	t.Fatalf("replica %s: %s: not reached; last /status: %s", r.admin, what, last)
	return cpStatus{}
}

func serves(traffic map[string]int) func(cpStatus) bool {
	return func(st cpStatus) bool {
		return len(st.Models) == 1 && st.Models[0].Name == "ranker" && fmt.Sprint(st.Models[0].Traffic) == fmt.Sprint(traffic)
	}
}

// TestCLIAgainstCluster runs the patchbay binary against the real API server, as an
// operator and pods would. Two `patchbay xds --source kubernetes` replicas serve a Rollout
// applied with kubectl-shaped YAML through a ramp; a version's Service name resolves from
// its EndpointSlices (ready endpoints only, following a change); `patchbay rollout status
// --kubeconfig` prints what they wrote to the Rollout's status; `patchbay rollout rollback
// --kubeconfig` records the request annotation (who asked, when), and the replicas execute
// it exactly once — a rollback to the last known-good split executed by both would go
// back two splits — then release it, then send all traffic to a named version.
func TestCLIAgainstCluster(t *testing.T) {
	bin := buildPatchbay(t)
	kubeconfig := writeKubeconfig(t)
	kc, err := kubernetes.NewForConfig(server.Config)
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(server.Config)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ns := esNamespace(t, kc, "cli")
	hosts := "hosts." + ns + ".svc.cluster.local"
	// The API server refuses loopback addresses in EndpointSlices: documentation addresses
	// (RFC 5737), which nothing dials here (version health probes are off).
	if _, err := kc.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice(ns, "hosts-a", "hosts", discoveryv1.AddressTypeIPv4,
		ep{addr: "192.0.2.1", zone: "z1"}, ep{addr: "192.0.2.2", zone: "z2", notReady: true}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	manifest := fmt.Sprintf(`
apiVersion: patchbay.io/v1
kind: Rollout
metadata:
  name: ranker
  namespace: %s
spec:
  versions:
    - name: v7
      endpoints: ["%s:9001"]
    - name: v8
      endpoints: ["192.0.2.9:9002"]
  traffic: {v7: 100, v8: 0}
`, ns, hosts)
	var obj map[string]any
	if err := yaml.Unmarshal([]byte(manifest), &obj); err != nil {
		t.Fatal(err)
	}
	rollouts := dyn.Resource(v1.GroupVersionResource).Namespace(ns)
	if _, err := rollouts.Create(ctx, &unstructured.Unstructured{Object: obj}, metav1.CreateOptions{FieldValidation: "Strict"}); err != nil {
		t.Fatal(err)
	}
	replicas := []*replica{startReplica(t, ctx, bin, kubeconfig, ns), startReplica(t, ctx, bin, kubeconfig, ns)}
	// A ramp, served by both: the history the rollback goes back in.
	for _, split := range []map[string]int{{"v7": 100, "v8": 0}, {"v7": 90, "v8": 10}, {"v7": 50, "v8": 50}} {
		tr := map[string]any{}
		for v, p := range split {
			tr[v] = int64(p)
		}
		// The replicas write status meanwhile (a new resourceVersion): retry as kubectl edit would.
		err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
			cur, err := rollouts.Get(ctx, "ranker", metav1.GetOptions{})
			if err != nil {
				return err
			}
			if err := unstructured.SetNestedMap(cur.Object, tr, "spec", "traffic"); err != nil {
				return err
			}
			_, err = rollouts.Update(ctx, cur, metav1.UpdateOptions{})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range replicas {
			r.until(t, fmt.Sprintf("serves %v", split), serves(split))
		}
	}

	// v7's Service name: the ready endpoint only, then both once the other is ready.
	addrs := func(want string) func(cpStatus) bool {
		return func(st cpStatus) bool {
			n := st.Names[hosts]
			return n.State == "ok" && strings.Join(n.Addresses, ",") == want
		}
	}
	replicas[0].until(t, hosts+" from EndpointSlices", addrs("192.0.2.1"))
	s, err := kc.DiscoveryV1().EndpointSlices(ns).Get(ctx, "hosts-a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s.Endpoints[1].Conditions.Ready = ptr(true)
	if _, err := kc.DiscoveryV1().EndpointSlices(ns).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, r := range replicas {
		r.until(t, hosts+" after the second pod became ready", addrs("192.0.2.1,192.0.2.2"))
	}

	// rollout status reads what the control plane wrote to the Rollout's status.
	cli := func(args ...string) (string, error) {
		out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
		return string(out), err
	}
	kflags := []string{"--kubeconfig", kubeconfig, "--namespace", ns}
	var out string
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		out, err = cli(append([]string{"rollout", "status", "ranker"}, kflags...)...)
		if err == nil && strings.Contains(out, "split:     v7=50,v8=50") && strings.Contains(out, "state:     Serving") &&
			strings.Contains(out, "condition: Ready=True") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("rollout status: %v\n%s", err, out)
		}
	}
	if !strings.Contains(out, "model ranker (Rollout "+ns+"/ranker") || !strings.Contains(out, "rollback:  none") {
		t.Errorf("rollout status:\n%s", out)
	}
	if all, err := cli(append([]string{"rollout", "status"}, kflags...)...); err != nil || !strings.Contains(all, "model ranker") {
		t.Errorf("rollout status (all): %v\n%s", err, all)
	}
	if none, err := cli(append([]string{"rollout", "status", "nope"}, kflags...)...); err == nil || !strings.Contains(none, `no Rollout for model "nope"`) {
		t.Errorf("rollout status nope: %v\n%s", err, none)
	}

	// rollback to the last known-good split, through the cluster.
	before := time.Now().UTC().Add(-time.Second)
	out, err = cli(append([]string{"rollout", "rollback", "ranker", "--wait", "30s"}, kflags...)...)
	if err != nil || !strings.Contains(out, "state:     RolledBack") || !strings.Contains(out, "split:     v7=90,v8=10") {
		t.Fatalf("rollout rollback --kubeconfig: %v\n%s", err, out)
	}
	cur, err := rollouts.Get(ctx, "ranker", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var req v1.RollbackRequest
	if err := json.Unmarshal([]byte(cur.GetAnnotations()[v1.RollbackRequestAnnotation]), &req); err != nil {
		t.Fatalf("rollback request annotation %q: %v", cur.GetAnnotations()[v1.RollbackRequestAnnotation], err)
	}
	at, perr := time.Parse(time.RFC3339Nano, req.At)
	if req.Version != "" || req.Release || perr != nil || at.Before(before) || at.After(time.Now().Add(time.Second)) || req.By == "" {
		t.Errorf("rollback request %+v (at: %v): want no version, now, and who asked", req, perr)
	}
	// Both replicas serve it; executed once (twice would have gone back to 100/0).
	for _, r := range replicas {
		st := r.until(t, "serves the rollback", serves(map[string]int{"v7": 90, "v8": 10}))
		if rb := st.Models[0].Rollback; rb == nil || !strings.Contains(rb.Reason, "last known-good split (request ") {
			t.Errorf("replica %s rollback %+v: want the request's tag in its reason", r.admin, rb)
		}
	}
	// Release, then all traffic to v7, each acknowledged and served by both.
	if out, err := cli(append([]string{"rollout", "rollback", "ranker", "--release"}, kflags...)...); err != nil || !strings.Contains(out, "state:     Serving") {
		t.Fatalf("rollout rollback --release --kubeconfig: %v\n%s", err, out)
	}
	for _, r := range replicas {
		r.until(t, "serves the spec again", serves(map[string]int{"v7": 50, "v8": 50}))
	}
	if out, err := cli(append([]string{"rollout", "rollback", "ranker", "--version", "v7"}, kflags...)...); err != nil || !strings.Contains(out, "split:     v7=100") {
		t.Fatalf("rollout rollback --version v7 --kubeconfig: %v\n%s", err, out)
	}
	for _, r := range replicas {
		r.until(t, "serves all traffic to v7", serves(map[string]int{"v7": 100}))
	}
	// A version the model lacks: refused, and the CLI says why.
	if out, err := cli(append([]string{"rollout", "rollback", "ranker", "--version", "v9"}, kflags...)...); err == nil || !strings.Contains(out, "refused the request") || !strings.Contains(out, "v9") {
		t.Errorf("rollout rollback --version v9: %v\n%s", err, out)
	}
}

// TestChartRoleIsEnough runs the control plane as the chart's ServiceAccount on an API
// server that enforces RBAC, with nothing but the chart's Role (rendered by helm from
// charts/patchbay): it serves a Rollout, writes its status, resolves a Service from
// EndpointSlices and executes a rollback request; and the same account may not read
// Secrets, change a Rollout's spec, or read Rollouts of another namespace.
func TestChartRoleIsEnough(t *testing.T) {
	bin := buildPatchbay(t)
	tb := &mainTB{name: t.Name()}
	t.Cleanup(tb.runCleanups)
	etcdURL, err := startEtcd(tb)
	if err != nil {
		t.Fatal(err)
	}
	storage := storagebackend.NewDefaultConfig(path.Join("/patchbay-rbac", strconv.FormatInt(time.Now().UnixNano(), 36)), nil)
	storage.Transport.ServerList = []string{etcdURL}
	srv, err := apiservertesting.StartTestServer(tb, apiservertesting.NewDefaultTestServerOptions(), []string{
		"--disable-admission-plugins=ServiceAccount", "--bind-address=127.0.0.1", "--authorization-mode=RBAC",
	}, storage)
	if err != nil {
		t.Fatalf("start kube-apiserver with RBAC: %v\n%s", err, tb.tail())
	}
	tb.Cleanup(srv.TearDownFn)
	admin := rest.CopyConfig(srv.ClientConfig)
	admin.ContentType, admin.AcceptContentTypes = "application/json", "application/json"
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := installCRDs(ctx, admin, crdDir); err != nil {
		t.Fatal(err)
	}
	kc, err := kubernetes.NewForConfig(admin)
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(admin)
	if err != nil {
		t.Fatal(err)
	}
	ns, elsewhere := esNamespace(t, kc, "rbac"), esNamespace(t, kc, "elsewhere")

	// The chart's Role and RoleBinding, as helm renders them for a release in ns.
	helm := exec.Command("go", "tool", "helm", "template", "rel", "charts/patchbay", "--namespace", ns, "--show-only", "templates/rbac.yaml")
	helm.Dir = filepath.Join("..", "..")
	rendered, err := helm.CombinedOutput()
	if err != nil {
		t.Fatalf("helm template: %v\n%s", err, rendered)
	}
	var role rbacv1.Role
	var binding rbacv1.RoleBinding
	for _, doc := range strings.Split(string(rendered), "\n---\n") {
		var tm metav1.TypeMeta
		if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
			t.Fatal(err)
		}
		switch tm.Kind {
		case "Role":
			err = yaml.UnmarshalStrict([]byte(doc), &role)
		case "RoleBinding":
			err = yaml.UnmarshalStrict([]byte(doc), &binding)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if role.Name == "" || len(binding.Subjects) != 1 {
		t.Fatalf("rendered RBAC lacks the Role or its binding:\n%s", rendered)
	}
	if _, err := kc.RbacV1().Roles(ns).Create(ctx, &role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := kc.RbacV1().RoleBindings(ns).Create(ctx, &binding, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	sa := binding.Subjects[0].Name
	if _, err := kc.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	tok, err := kc.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, &authenticationv1.TokenRequest{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	asSA := writeKubeconfigFor(t, admin, tok.Status.Token)
	asOperator := writeKubeconfigFor(t, admin, "")

	// What the control plane needs.
	if _, err := kc.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice(ns, "hosts-a", "hosts", discoveryv1.AddressTypeIPv4,
		ep{addr: "192.0.2.1"}, ep{addr: "192.0.2.2", notReady: true}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	hosts := "hosts." + ns + ".svc"
	var obj map[string]any
	if err := yaml.Unmarshal([]byte(fmt.Sprintf(`
apiVersion: patchbay.io/v1
kind: Rollout
metadata: {name: ranker, namespace: %s}
spec:
  versions:
    - {name: v7, endpoints: ["%s:9001"]}
    - {name: v8, endpoints: ["192.0.2.9:9002"]}
  traffic: {v7: 90, v8: 10}
`, ns, hosts)), &obj); err != nil {
		t.Fatal(err)
	}
	if _, err := dyn.Resource(v1.GroupVersionResource).Namespace(ns).Create(ctx, &unstructured.Unstructured{Object: obj}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	r := startReplica(t, ctx, bin, asSA, ns)
	r.until(t, "serves the Rollout as the chart's ServiceAccount, "+hosts+" from EndpointSlices", func(st cpStatus) bool {
		return serves(map[string]int{"v7": 90, "v8": 10})(st) && strings.Join(st.Names[hosts].Addresses, ",") == "192.0.2.1"
	})
	cli := func(args ...string) (string, error) {
		out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
		return string(out), err
	}
	var out string
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		out, err = cli("rollout", "status", "ranker", "--kubeconfig", asOperator, "--namespace", ns)
		if err == nil && strings.Contains(out, "condition: Ready=True") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the control plane never wrote the Rollout's status: %v\n%s\n%s", err, out, r.logs)
		}
	}
	if out, err := cli("rollout", "rollback", "ranker", "--version", "v7", "--kubeconfig", asOperator, "--namespace", ns); err != nil ||
		!strings.Contains(out, "state:     RolledBack") {
		t.Fatalf("rollback request as the chart's ServiceAccount: %v\n%s", err, out)
	}
	r.until(t, "serves the rollback", serves(map[string]int{"v7": 100}))

	// Nothing more.
	saCfg := rest.CopyConfig(admin)
	saCfg.BearerToken, saCfg.CertData, saCfg.KeyData, saCfg.CertFile, saCfg.KeyFile = tok.Status.Token, nil, nil, "", ""
	saKube, err := kubernetes.NewForConfig(saCfg)
	if err != nil {
		t.Fatal(err)
	}
	saDyn, err := dynamic.NewForConfig(saCfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := saKube.CoreV1().Secrets(ns).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("list Secrets as the control plane: %v, want Forbidden", err)
	}
	if _, err := saKube.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("list ConfigMaps as the control plane: %v, want Forbidden", err)
	}
	cur, err := saDyn.Resource(v1.GroupVersionResource).Namespace(ns).Get(ctx, "ranker", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_ = unstructured.SetNestedField(cur.Object, int64(100), "spec", "traffic", "v8")
	if _, err := saDyn.Resource(v1.GroupVersionResource).Namespace(ns).Update(ctx, cur, metav1.UpdateOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("update a Rollout's spec as the control plane: %v, want Forbidden", err)
	}
	if _, err := saDyn.Resource(v1.GroupVersionResource).Namespace(elsewhere).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("list Rollouts of another namespace as the control plane: %v, want Forbidden", err)
	}
	if _, err := saKube.DiscoveryV1().EndpointSlices(elsewhere).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("list EndpointSlices of another namespace as the control plane: %v, want Forbidden", err)
	}
}
