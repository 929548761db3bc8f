// Package charts tests the Helm chart in charts/patchbay with Helm itself, run as a
// Go tool (go tool helm): lint, render with the default and with a full values file,
// decode every manifest strictly into its Kubernetes type, and check what a cluster
// would only tell us later (selectors, probes, security, flags, Envoy bootstraps).
package charts

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/testing/protocmp"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	patchbayv1 "github.com/patchbay-io/patchbay/api/k8s/v1"
	"github.com/patchbay-io/patchbay/envoy"
	"github.com/patchbay-io/patchbay/xds/rollout"
)

const (
	chartDir   = "patchbay"
	release    = "rel"
	namespace  = "ml"
	fullValues = "testdata/full-values.yaml"
)

// helm runs `go tool helm` (helm.sh/helm/v3 v3.22.0, pinned in go.mod).
func helm(t *testing.T, args ...string) (string, error) {
	t.Helper()
	trackChartFiles(t)
	cmd := exec.Command("go", append([]string{"tool", "helm"}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("helm %s: %v\n%s%s", strings.Join(args, " "), err, stderr.String(), stdout.String())
	}
	return stdout.String(), nil
}

// trackChartFiles reads every chart file from the test process: helm reads them in a
// child process, which go test's result cache does not see, so without this a changed
// template could be reported "ok (cached)".
func trackChartFiles(t *testing.T) {
	t.Helper()
	for _, root := range []string{chartDir, "testdata"} {
		err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			_, err = os.ReadFile(path)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

func TestChartLint(t *testing.T) {
	if testing.Short() {
		t.Skip("runs helm")
	}
	for _, values := range [][]string{nil, {"-f", fullValues}} {
		out, err := helm(t, append([]string{"lint", "--strict", chartDir}, values...)...)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(out, "0 chart(s) failed") {
			t.Errorf("helm lint %v:\n%s", values, out)
		}
	}
}

// ServiceMonitor is the subset of monitoring.coreos.com/v1 the chart renders; strict
// decoding into it catches misspelt fields (the operator's types are not in k8s.io/api).
type ServiceMonitor struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		Selector  metav1.LabelSelector `json:"selector"`
		Endpoints []struct {
			Port     string `json:"port"`
			Path     string `json:"path"`
			Interval string `json:"interval"`
		} `json:"endpoints"`
	} `json:"spec"`
}

// Certificate is the subset of cert-manager.io/v1 Certificate the chart renders, decoded
// strictly like the rest.
type Certificate struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		SecretName  string   `json:"secretName"`
		Duration    string   `json:"duration"`
		RenewBefore string   `json:"renewBefore"`
		Usages      []string `json:"usages"`
		URIs        []string `json:"uris"`
		DNSNames    []string `json:"dnsNames"`
		PrivateKey  struct {
			Algorithm      string `json:"algorithm"`
			Size           int    `json:"size"`
			RotationPolicy string `json:"rotationPolicy"`
		} `json:"privateKey"`
		IssuerRef struct {
			Name  string `json:"name"`
			Kind  string `json:"kind"`
			Group string `json:"group"`
		} `json:"issuerRef"`
	} `json:"spec"`
}

// Rollout is a patchbay.io/v1 Rollout as the chart renders it. decode checks it strictly
// against the CRD's Go type (api/k8s/v1); checkDefaultRollouts turns its spec back into a
// rollout file and loads it with the control plane's strict loader.
type Rollout struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              map[string]any `json:"spec"`
}

// rendered is one chart rendering, decoded.
type rendered struct {
	configMaps  map[string]*corev1.ConfigMap
	deployments map[string]*appsv1.Deployment
	services    map[string]*corev1.Service
	pdbs        map[string]*policyv1.PodDisruptionBudget
	hpas        map[string]*autoscalingv2.HorizontalPodAutoscaler
	netpols     map[string]*networkingv1.NetworkPolicy
	monitors    map[string]*ServiceMonitor
	accounts    map[string]*corev1.ServiceAccount
	certs       map[string]*Certificate
	roles       map[string]*rbacv1.Role
	bindings    map[string]*rbacv1.RoleBinding
	claims      map[string]*corev1.PersistentVolumeClaim
	rollouts    map[string]*Rollout
}

var docSep = regexp.MustCompile(`(?m)^---\s*$`)

// decode splits helm's output and decodes each document strictly into the type its
// apiVersion and kind name: unknown fields and wrong types are errors.
func decode(manifests string) (*rendered, error) {
	r := &rendered{
		configMaps: map[string]*corev1.ConfigMap{}, deployments: map[string]*appsv1.Deployment{},
		services: map[string]*corev1.Service{}, pdbs: map[string]*policyv1.PodDisruptionBudget{},
		hpas: map[string]*autoscalingv2.HorizontalPodAutoscaler{}, netpols: map[string]*networkingv1.NetworkPolicy{},
		monitors: map[string]*ServiceMonitor{}, accounts: map[string]*corev1.ServiceAccount{},
		certs: map[string]*Certificate{}, roles: map[string]*rbacv1.Role{}, bindings: map[string]*rbacv1.RoleBinding{},
		claims: map[string]*corev1.PersistentVolumeClaim{}, rollouts: map[string]*Rollout{},
	}
	for i, doc := range docSep.Split(manifests, -1) {
		if strings.TrimSpace(stripComments(doc)) == "" {
			continue
		}
		var tm metav1.TypeMeta
		if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
			return nil, fmt.Errorf("document %d: %w\n%s", i, err, doc)
		}
		var obj interface{ GetName() string }
		var put func()
		switch gvk := tm.APIVersion + "/" + tm.Kind; gvk {
		case "v1/ConfigMap":
			o := new(corev1.ConfigMap)
			obj, put = o, func() { r.configMaps[o.Name] = o }
		case "v1/Service":
			o := new(corev1.Service)
			obj, put = o, func() { r.services[o.Name] = o }
		case "v1/ServiceAccount":
			o := new(corev1.ServiceAccount)
			obj, put = o, func() { r.accounts[o.Name] = o }
		case "apps/v1/Deployment":
			o := new(appsv1.Deployment)
			obj, put = o, func() { r.deployments[o.Name] = o }
		case "policy/v1/PodDisruptionBudget":
			o := new(policyv1.PodDisruptionBudget)
			obj, put = o, func() { r.pdbs[o.Name] = o }
		case "autoscaling/v2/HorizontalPodAutoscaler":
			o := new(autoscalingv2.HorizontalPodAutoscaler)
			obj, put = o, func() { r.hpas[o.Name] = o }
		case "networking.k8s.io/v1/NetworkPolicy":
			o := new(networkingv1.NetworkPolicy)
			obj, put = o, func() { r.netpols[o.Name] = o }
		case "monitoring.coreos.com/v1/ServiceMonitor":
			o := new(ServiceMonitor)
			obj, put = o, func() { r.monitors[o.Name] = o }
		case "cert-manager.io/v1/Certificate":
			o := new(Certificate)
			obj, put = o, func() { r.certs[o.Name] = o }
		case "rbac.authorization.k8s.io/v1/Role":
			o := new(rbacv1.Role)
			obj, put = o, func() { r.roles[o.Name] = o }
		case "rbac.authorization.k8s.io/v1/RoleBinding":
			o := new(rbacv1.RoleBinding)
			obj, put = o, func() { r.bindings[o.Name] = o }
		case "v1/PersistentVolumeClaim":
			o := new(corev1.PersistentVolumeClaim)
			obj, put = o, func() { r.claims[o.Name] = o }
		case "patchbay.io/v1/Rollout":
			// The CRD's Go type, strictly, then as a map to turn back into a file.
			if err := yaml.UnmarshalStrict([]byte(doc), new(patchbayv1.Rollout)); err != nil {
				return nil, fmt.Errorf("document %d (Rollout): %w\n%s", i, err, doc)
			}
			o := new(Rollout)
			obj, put = o, func() { r.rollouts[o.Name] = o }
		default:
			return nil, fmt.Errorf("document %d: unexpected kind %s", i, gvk)
		}
		if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
			return nil, fmt.Errorf("document %d (%s/%s): %w\n%s", i, tm.APIVersion, tm.Kind, err, doc)
		}
		if obj.GetName() == "" {
			return nil, fmt.Errorf("document %d (%s): no metadata.name", i, tm.Kind)
		}
		put()
	}
	return r, nil
}

func stripComments(doc string) string {
	var b strings.Builder
	for _, l := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

// TestStrictDecoderFails proves decode can fail: a misspelt field and a wrong type.
func TestStrictDecoderFails(t *testing.T) {
	t.Parallel()
	for name, doc := range map[string]string{
		"unknown field": "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {selectr: {a: b}}\n",
		"wrong type":    "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {replicas: two}\n",
		"unknown kind":  "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n",
		"no name":       "apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n",
	} {
		if _, err := decode(doc); err == nil {
			t.Errorf("%s: decode accepted\n%s", name, doc)
		}
	}
}

// flagsOf reads the flag names a part defines from its run function in
// cmd/patchbay/<part>.go: the chart's values must mirror them 1:1.
func flagsOf(t *testing.T, part string) []string {
	t.Helper()
	file, err := os.ReadFile(filepath.Join("..", "cmd", "patchbay", part+".go"))
	if err != nil {
		t.Fatal(err)
	}
	fn := map[string]string{"xds": "runXDS", "extproc": "runExtproc", "modelhost": "runModelhost"}[part]
	start := bytes.Index(file, []byte("\nfunc "+fn+"("))
	if start < 0 {
		t.Fatalf("cmd/patchbay/%s.go has no func %s", part, fn)
	}
	src := file[start+1:]
	if end := bytes.Index(src, []byte("\nfunc ")); end >= 0 {
		src = src[:end]
	}
	var out []string
	for _, m := range regexp.MustCompile(`fs\.(?:(?:String|Bool|Int|Int64|Uint|Uint64|Duration|Float64)(?:Var)?|Var)\((?:&[\w.]+, )?"([a-z0-9-]+)"`).FindAllSubmatch(src, -1) {
		out = append(out, string(m[1]))
	}
	if len(out) == 0 {
		t.Fatalf("no flags found in cmd/patchbay/%s.go", part)
	}
	sort.Strings(out)
	return out
}

// argFlags returns the --flag names in a container's args (after the subcommand).
func argFlags(t *testing.T, c corev1.Container, part string) map[string]string {
	t.Helper()
	if len(c.Args) == 0 || c.Args[0] != part {
		t.Fatalf("container %s args %q: want subcommand %q first", c.Name, c.Args, part)
	}
	out := map[string]string{}
	for _, a := range c.Args[1:] {
		name, value, ok := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if !ok || !strings.HasPrefix(a, "--") {
			t.Errorf("container %s arg %q: want --flag=value", c.Name, a)
			continue
		}
		out[name] = value
	}
	return out
}

func TestChartRender(t *testing.T) {
	if testing.Short() {
		t.Skip("runs helm")
	}
	for _, tc := range []struct {
		name   string
		values []string
		tls    tlsCase
		files  bool // xds.source=files (default: kubernetes)
	}{
		{"default values", nil, tlsOff, false},
		{"full values", []string{"-f", fullValues}, tlsCertManager, false},
		{"mTLS from given Secrets", []string{"--set", "tls.enabled=true,xds.tls.secretName=xds-certs,sidecar.example.enabled=true"}, tlsSecrets, false},
		{"files source", []string{"--set", "xds.source=files,xds.replicas=1"}, tlsOff, true},
		{"full values, files source", []string{"-f", fullValues, "--set", "xds.source=files,xds.replicas=1",
			"--set-json", `xds.rollouts.volume={"persistentVolumeClaim":{"claimName":"rollouts","readOnly":true}}`}, tlsCertManager, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := helm(t, append([]string{"template", release, chartDir, "--namespace", namespace}, tc.values...)...)
			if err != nil {
				t.Fatal(err)
			}
			r, err := decode(out)
			if err != nil {
				t.Fatal(err)
			}
			full := tc.tls == tlsCertManager
			checkWorkloads(t, r, tc.files)
			checkServices(t, r)
			checkFlags(t, r, full, tc.files)
			checkBootstraps(t, r, full, tc.tls != tlsOff)
			checkTLS(t, r, tc.tls)
			checkNetworkPolicies(t, r, full, tc.files)
			checkControlPlane(t, r, full, tc.files)
			if full {
				checkFull(t, r)
			} else if tc.tls == tlsOff {
				checkDefaultRollouts(t, r, tc.files)
			}
		})
	}
}

// checkWorkloads: every pod runs as non-root on a read-only root FS with no extra
// capabilities, asks for resources, and probes ports it declares.
func checkWorkloads(t *testing.T, r *rendered, files bool) {
	t.Helper()
	if len(r.deployments) == 0 {
		t.Fatal("no Deployments rendered")
	}
	for name, d := range r.deployments {
		pod := d.Spec.Template.Spec
		if psc := pod.SecurityContext; psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot {
			t.Errorf("%s: pod securityContext.runAsNonRoot is not true", name)
		}
		// Only the control plane with the kubernetes source talks to the API server.
		wantToken := name == "rel-patchbay-xds" && !files
		if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken != wantToken {
			t.Errorf("%s: automountServiceAccountToken %v, want %v", name, pod.AutomountServiceAccountToken, wantToken)
		}
		sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
		if err != nil || !sel.Matches(labelSet(d.Spec.Template.Labels)) {
			t.Errorf("%s: selector %v does not match its pod labels %v", name, d.Spec.Selector, d.Spec.Template.Labels)
		}
		for _, c := range pod.Containers {
			where := name + "/" + c.Name
			sc := c.SecurityContext
			if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
				t.Errorf("%s: root filesystem is writable", where)
			}
			if sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
				t.Errorf("%s: privilege escalation allowed", where)
			}
			if sc == nil || sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
				t.Errorf("%s: capabilities not dropped", where)
			}
			if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() {
				t.Errorf("%s: no cpu/memory requests", where)
			}
			if c.Name == "app" { // the example client's curl loop has nothing to probe
				continue
			}
			if c.ReadinessProbe == nil || c.LivenessProbe == nil {
				t.Errorf("%s: readiness and liveness probes are required", where)
				continue
			}
			for _, p := range []*corev1.Probe{c.ReadinessProbe, c.LivenessProbe, c.StartupProbe} {
				if p == nil {
					continue
				}
				port := ""
				switch {
				case p.HTTPGet != nil:
					port = p.HTTPGet.Port.String()
				case p.TCPSocket != nil:
					port = p.TCPSocket.Port.String()
				}
				if !hasPort(c, port) {
					t.Errorf("%s: probe on port %q, which the container does not declare", where, port)
				}
			}
		}
	}
}

func hasPort(c corev1.Container, port string) bool {
	for _, p := range c.Ports {
		if p.Name == port || fmt.Sprint(p.ContainerPort) == port {
			return true
		}
	}
	return false
}

type labelSet map[string]string

func (l labelSet) Has(k string) bool              { _, ok := l[k]; return ok }
func (l labelSet) Get(k string) string            { return l[k] }
func (l labelSet) Lookup(k string) (string, bool) { v, ok := l[k]; return v, ok }

// checkServices: each Service selects exactly one Deployment and targets ports its
// pods declare; PDBs, HPAs, ServiceMonitors and NetworkPolicies point at real things.
func checkServices(t *testing.T, r *rendered) {
	t.Helper()
	for name, s := range r.services {
		var matched []*appsv1.Deployment
		for _, d := range r.deployments {
			if selects(s.Spec.Selector, d.Spec.Template.Labels) {
				matched = append(matched, d)
			}
		}
		if len(matched) != 1 {
			t.Errorf("Service %s selects %d Deployments, want 1", name, len(matched))
			continue
		}
		for _, p := range s.Spec.Ports {
			found := false
			for _, c := range matched[0].Spec.Template.Spec.Containers {
				found = found || hasPort(c, p.TargetPort.String())
			}
			if !found {
				t.Errorf("Service %s port %s targets %q, which %s does not declare", name, p.Name, p.TargetPort.String(), matched[0].Name)
			}
		}
	}
	for name, p := range r.pdbs {
		if n := countSelected(r, p.Spec.Selector); n != 1 {
			t.Errorf("PDB %s selects %d Deployments, want 1", name, n)
		}
	}
	for name, h := range r.hpas {
		d := r.deployments[h.Spec.ScaleTargetRef.Name]
		if d == nil || h.Spec.ScaleTargetRef.Kind != "Deployment" {
			t.Errorf("HPA %s scales %v, which is not a rendered Deployment", name, h.Spec.ScaleTargetRef)
		} else if d.Spec.Replicas != nil {
			t.Errorf("HPA %s: Deployment %s also sets replicas (they would fight)", name, d.Name)
		}
	}
	for name, m := range r.monitors {
		var svc *corev1.Service
		for _, s := range r.services {
			sel, err := metav1.LabelSelectorAsSelector(&m.Spec.Selector)
			if err == nil && sel.Matches(labelSet(s.Labels)) {
				svc = s
			}
		}
		if svc == nil {
			t.Errorf("ServiceMonitor %s selects no Service", name)
			continue
		}
		for _, e := range m.Spec.Endpoints {
			if !slices.ContainsFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == e.Port }) {
				t.Errorf("ServiceMonitor %s scrapes port %q, which Service %s lacks", name, e.Port, svc.Name)
			}
		}
	}
	for name, np := range r.netpols {
		if n := countSelected(r, &np.Spec.PodSelector); n != 1 {
			t.Errorf("NetworkPolicy %s selects %d Deployments, want 1", name, n)
		}
	}
}

func selects(selector, labels map[string]string) bool {
	if len(selector) == 0 {
		return false
	}
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

func countSelected(r *rendered, ls *metav1.LabelSelector) int {
	sel, err := metav1.LabelSelectorAsSelector(ls)
	if err != nil {
		return -1
	}
	n := 0
	for _, d := range r.deployments {
		if sel.Matches(labelSet(d.Spec.Template.Labels)) {
			n++
		}
	}
	return n
}

func container(t *testing.T, r *rendered, deployment, name string) corev1.Container {
	t.Helper()
	d := r.deployments[deployment]
	if d == nil {
		t.Fatalf("Deployment %s not rendered (have %v)", deployment, keys(r.deployments))
	}
	for _, c := range d.Spec.Template.Spec.Containers {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("Deployment %s has no container %s", deployment, name)
	return corev1.Container{}
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// checkFlags: every flag the chart passes exists on the binary; with the full values
// file, every flag of every part is passed (values mirror flags 1:1).
//
// Flags of one source only are left out with the other (files: --rollouts, --state-file;
// kubernetes: --namespace); --kubeconfig never: a pod uses its ServiceAccount (in-cluster).
func checkFlags(t *testing.T, r *rendered, full, files bool) {
	t.Helper()
	parts := map[string][]corev1.Container{
		"xds":     {container(t, r, "rel-patchbay-xds", "xds")},
		"extproc": {container(t, r, "rel-patchbay-extproc", "extproc")},
	}
	for name, d := range r.deployments {
		if strings.HasPrefix(name, "rel-patchbay-modelhost-") {
			parts["modelhost"] = append(parts["modelhost"], d.Spec.Template.Spec.Containers[0])
		}
	}
	for part, cs := range parts {
		known := flagsOf(t, part)
		for _, c := range cs {
			got := argFlags(t, c, part)
			for f := range got {
				if !slices.Contains(known, f) {
					t.Errorf("%s: chart passes --%s, which patchbay %s does not define (%v)", part, f, part, known)
				}
			}
			notPassed := map[string]bool{"kubeconfig": part == "xds"}
			if part == "xds" {
				notPassed["namespace"] = files
				notPassed["rollouts"], notPassed["state-file"] = !files, !files
			}
			for f := range got {
				if notPassed[f] {
					t.Errorf("%s: chart passes --%s, which does not apply here (files source: %v)", part, f, files)
				}
			}
			if full && part != "modelhost" { // model hosts: checked per entry below
				for _, f := range known {
					if _, ok := got[f]; !ok && !notPassed[f] {
						t.Errorf("%s: full values do not reach --%s: add a value for it", part, f)
					}
				}
			}
		}
	}
	if full {
		x := argFlags(t, container(t, r, "rel-patchbay-xds", "xds"), "xds")
		want := map[string]string{
			"listen": "0.0.0.0:28000", "extproc-timeout": "250ms", "access-log": "false",
			"admin-token-file": "/etc/patchbay/admin-token/token",
			"peer-role":        "spiffe://example.org/ns/ml/sa/ranker-client=grpc", "allow-empty": "true", "settle": "250ms",
			"version-health-interval": "3s", "contract-retry": "2s", "contract-wait": "8s", "source": "kubernetes", "namespace": namespace,
		}
		if files {
			want["source"], want["namespace"] = "files", ""
			want["rollouts"], want["state-file"] = "/srv/rollouts", "/srv/state/patchbay.json"
		}
		for f, want := range want {
			if x[f] != want {
				t.Errorf("xds --%s = %q, want %q", f, x[f], want)
			}
		}
		e := argFlags(t, container(t, r, "rel-patchbay-extproc", "extproc"), "extproc")
		for f, want := range map[string]string{"gc-percent": "400", "stream-workers": "4", "node-id": "extproc-fixed", "xds": "patchbay-xds.other.svc:28000", "trace-sample-ratio": "0.05"} {
			if e[f] != want {
				t.Errorf("extproc --%s = %q, want %q", f, e[f], want)
			}
		}
		m := argFlags(t, container(t, r, "rel-patchbay-modelhost-ranker", "modelhost"), "modelhost")
		if m["max-body-bytes"] != "16777216" || m["admin"] != "0.0.0.0:9002" || m["max-inflight"] != "256" || m["max-inflight-bytes"] != "134217728" {
			t.Errorf("modelhost ranker flags = %v", m)
		}
		if len(m) != len(flagsOf(t, "modelhost")) {
			t.Errorf("modelhost ranker passes %d flags, the binary has %d: %v", len(m), len(flagsOf(t, "modelhost")), m)
		}
	}
}

// checkBootstraps: the Envoy bootstraps the chart renders are envoy/edge.yaml and
// envoy/sidecar.yaml with the chart's addresses and limits, and pass Envoy's
// validation rules and patchbay's checks.
func checkBootstraps(t *testing.T, r *rendered, full, mtls bool) {
	t.Helper()
	domain, xdsPort, extprocPort, otel := "cluster.local", "18000", "18080", "127.0.0.1:4317"
	edge := envoy.Params{Admin: "127.0.0.1:9901", Stats: "0.0.0.0:9902", MaxHeapBytes: 805306368, MaxConnections: 50000}
	sidecar := envoy.Params{Admin: "127.0.0.1:15000", Stats: "0.0.0.0:15020", MaxHeapBytes: 268435456, MaxConnections: 10000}
	if full {
		domain, xdsPort, extprocPort, otel = "k8s.example", "28000", "28080", "otel-collector.observability.svc:4317"
		edge = envoy.Params{Admin: "127.0.0.1:19901", Stats: "0.0.0.0:19902", MaxHeapBytes: 1610612736, MaxConnections: 100000}
		sidecar = envoy.Params{Admin: "127.0.0.1:25000", Stats: "0.0.0.0:25020", MaxHeapBytes: 134217728, MaxConnections: 5000}
	}
	for role, p := range map[envoy.Role]envoy.Params{envoy.Edge: edge, envoy.Sidecar: sidecar} {
		p.NodeID = "patchbay-" + string(role)
		p.XDS = fmt.Sprintf("rel-patchbay-xds.%s.svc.%s:%s", namespace, domain, xdsPort)
		p.ExtProc = fmt.Sprintf("rel-patchbay-extproc.%s.svc.%s:%s", namespace, domain, extprocPort)
		p.OTel = otel
		p.MTLS = mtls
		want, err := envoy.Render(role, p)
		if err != nil {
			t.Fatalf("envoy.Render(%s): %v", role, err)
		}
		cm := r.configMaps["rel-patchbay-envoy-"+string(role)]
		if cm == nil {
			t.Fatalf("no ConfigMap rel-patchbay-envoy-%s", role)
		}
		got, err := envoy.Parse([]byte(cm.Data["envoy.yaml"]))
		if err != nil {
			t.Fatalf("chart's %s bootstrap: %v", role, err)
		}
		check := envoy.Check
		if mtls {
			check = envoy.CheckMTLS
		}
		if err := check(role, got); err != nil {
			t.Errorf("chart's %s bootstrap fails the checks: %v", role, err)
		}
		if diff := cmp.Diff(want, got, protocmp.Transform()); diff != "" {
			t.Errorf("chart's %s bootstrap drifted from envoy/%s.yaml (-file rendered +chart):\n%s", role, role, diff)
		}
	}
	// The edge Envoy mounts that ConfigMap and serves the port xds puts the edge listener on.
	d := r.deployments["rel-patchbay-envoy"]
	if d == nil {
		t.Fatal("no edge Envoy Deployment")
	}
	if v := d.Spec.Template.Spec.Volumes[0]; v.ConfigMap == nil || v.ConfigMap.Name != "rel-patchbay-envoy-edge" {
		t.Errorf("edge Envoy's first volume = %+v, want the bootstrap ConfigMap", v)
	}
}

// checkDefaultRollouts: the default values' rollout files load with the control
// plane's own strict loader.
//
// With the kubernetes source they are Rollout resources instead of a ConfigMap: each is
// turned back into a rollout file (apiVersion, kind, model = metadata.name unless the
// spec says, the spec's fields) and loaded the same way.
func checkDefaultRollouts(t *testing.T, r *rendered, files bool) {
	t.Helper()
	cm := r.configMaps["rel-patchbay-rollouts"]
	data := map[string]string{}
	if files {
		if cm == nil || len(cm.Data) == 0 || len(r.rollouts) != 0 {
			t.Fatalf("files source: rollouts ConfigMap %v, Rollout resources %v; want the ConfigMap only", cm, keys(r.rollouts))
		}
		data = cm.Data
	} else {
		if cm != nil || len(r.rollouts) == 0 {
			t.Fatalf("kubernetes source: rollouts ConfigMap %v, Rollout resources %v; want Rollouts only", cm != nil, keys(r.rollouts))
		}
		for name, ro := range r.rollouts {
			doc := map[string]any{"apiVersion": "patchbay.io/v1", "kind": "Rollout", "model": name}
			for k, v := range ro.Spec {
				doc[k] = v
			}
			b, err := yaml.Marshal(doc)
			if err != nil {
				t.Fatal(err)
			}
			data[name+".yaml"] = string(b)
		}
	}
	var docs []rollout.File
	for name, content := range data {
		docs = append(docs, rollout.File{Path: name, Data: []byte(content)})
	}
	set, err := rollout.LoadData(docs)
	if err != nil {
		t.Fatalf("default rollouts do not load: %v", err)
	}
	if set.Model("ranker") == nil {
		t.Error("default rollouts lack model ranker")
	}
	// Their endpoints name the example model host's Service.
	if !strings.Contains(data["ranker.yaml"], "rel-patchbay-modelhost-examples.ml.svc.cluster.local:8000") {
		t.Errorf("ranker.yaml endpoints do not name the model host Service:\n%s", data["ranker.yaml"])
	}
	if r.services["rel-patchbay-modelhost-examples"] == nil {
		t.Error("no Service for the example model host")
	}
}

// checkFull: the optional pieces the full values turn on.
func checkFull(t *testing.T, r *rendered) {
	t.Helper()
	for _, name := range []string{"rel-patchbay-modelhost-ranker", "rel-patchbay-modelhost-churn"} {
		if r.deployments[name] == nil || r.services[name] == nil {
			t.Errorf("model host %s: Deployment or Service missing", name)
		}
	}
	volume := func(spec corev1.PodSpec, name string) *corev1.Volume {
		for i, v := range spec.Volumes {
			if v.Name == name {
				return &spec.Volumes[i]
			}
		}
		return nil
	}
	ranker := r.deployments["rel-patchbay-modelhost-ranker"].Spec.Template.Spec
	if v := volume(ranker, "repository"); v == nil || v.PersistentVolumeClaim == nil || v.PersistentVolumeClaim.ClaimName != "ranker-models" {
		t.Errorf("ranker repository volume = %+v", v)
	}
	// The repository API's token, from its Secret.
	if v := volume(ranker, "admin-token"); v == nil || v.Secret == nil || v.Secret.SecretName != "ranker-admin" {
		t.Errorf("ranker admin token volume = %+v", v)
	}
	if f := argFlags(t, container(t, r, "rel-patchbay-modelhost-ranker", "modelhost"), "modelhost"); f["admin-token-file"] != "/etc/patchbay/admin-token/token" {
		t.Errorf("ranker --admin-token-file = %q", f["admin-token-file"])
	}
	churn := r.deployments["rel-patchbay-modelhost-churn"].Spec.Template.Spec
	if v := volume(churn, "repository"); len(churn.InitContainers) != 1 || v == nil || v.EmptyDir == nil {
		t.Errorf("churn: init container + emptyDir repository expected, got %d init containers, volumes %+v", len(churn.InitContainers), churn.Volumes)
	}
	if r.configMaps["rel-patchbay-rollouts"] != nil {
		t.Error("rollouts ConfigMap rendered although rollouts come from a volume")
	}
	if len(r.hpas) != 1 || len(r.monitors) != 5 || len(r.netpols) != 5 {
		t.Errorf("HPAs %d, ServiceMonitors %d, NetworkPolicies %d; want 1, 5, 5", len(r.hpas), len(r.monitors), len(r.netpols))
	}
	// The sidecar example: an app container plus the patchbay.envoySidecar container,
	// whose bootstrap volume is the rendered sidecar ConfigMap.
	ex := r.deployments["rel-patchbay-example-client"]
	if ex == nil {
		t.Fatal("sidecar example not rendered")
	}
	sc := container(t, r, ex.Name, "patchbay-envoy")
	if !slices.Contains(sc.Args, "/etc/patchbay-envoy/envoy.yaml") || len(sc.VolumeMounts) != 3 {
		t.Errorf("sidecar container args %q mounts %+v (want bootstrap, TLS Secret, SDS files)", sc.Args, sc.VolumeMounts)
	}
	vol := ex.Spec.Template.Spec.Volumes
	if len(vol) != 3 || vol[0].Name != sc.VolumeMounts[0].Name || vol[0].ConfigMap == nil || r.configMaps[vol[0].ConfigMap.Name] == nil {
		t.Errorf("sidecar bootstrap volume %+v does not mount a rendered ConfigMap", vol)
	}
	if !hasPort(sc, "envoy-stats") || sc.Ports[0].ContainerPort != 25020 {
		t.Errorf("sidecar stats port = %+v, want 25020 from sidecar.stats", sc.Ports)
	}
}

// TestChartRejectsBadValues: mistakes fail at render time with a clear message.
func TestChartRejectsBadValues(t *testing.T) {
	if testing.Short() {
		t.Skip("runs helm")
	}
	for _, tc := range []struct {
		set  []string
		want string
	}{
		// values.schema.json: typos, bad enums and bad addresses fail before rendering.
		{[]string{"xds.edgeListner=0.0.0.0:10000"}, "additional properties 'edgeListner' not allowed"},
		{[]string{"xds.logLevel=loud"}, "/xds/logLevel"},
		{[]string{"modelhosts[0].name=Bad_Name"}, "/modelhosts/0/name"},
		{[]string{"xds.listen=18000"}, "/xds/listen"},
		{[]string{"envoy.maxHeapBytes=0"}, "/envoy/maxHeapBytes"},
		// the templates' own checks
		{[]string{"xds.source=files", "xds.replicas=1", "xds.rollouts.files=null"}, "xds.rollouts: set files"},
		{[]string{"--skip-schema-validation", "modelhosts[0].name=Bad_Name"}, "want a DNS label"},
		{[]string{"--skip-schema-validation", "xds.listen=18000"}, "want host:port"},
		{[]string{"tls.certManager.issuerRef.kind=Vault"}, "/tls/certManager/issuerRef/kind"},
		{[]string{"tls.enabled=true", "tls.certManager.enabled=true"}, "tls.certManager.issuerRef.name is required"},
		{[]string{"modelhosts[0].maxInflight=-1"}, "/modelhosts/0/maxInflight"},
		{[]string{"networkPolicy.clients=yes"}, "/networkPolicy/clients"},
		// The file source keeps its state in one file one replica owns: replicas > 1 is
		// refused by the schema, and by the template when the schema is skipped.
		{[]string{"xds.source=files"}, "/xds/replicas"},
		{[]string{"xds.source=files", "xds.replicas=2"}, "/xds/replicas"},
		{[]string{"--skip-schema-validation", "xds.source=files"}, "xds.replicas=3 with xds.source=files"},
		{[]string{"xds.source=configmap"}, "/xds/source"},
		{[]string{"--skip-schema-validation", "xds.source=configmap"}, `xds.source "configmap": want kubernetes or files`},
		{[]string{"xds.rollouts.volume.persistentVolumeClaim.claimName=r"}, "xds.rollouts.volume: only with xds.source=files"},
		{[]string{"xds.source=files", "xds.replicas=1", "xds.stateFile=state.json"}, `xds.stateFile "state.json": want an absolute path`},
		{[]string{"xds.persistence.size=lots"}, "/xds/persistence/size"},
		{[]string{"networkPolicy.apiServer.ports={}"}, "/networkPolicy/apiServer/ports"},
	} {
		t.Run(strings.Join(tc.set, " "), func(t *testing.T) {
			t.Parallel()
			var args []string
			for _, s := range tc.set {
				if strings.HasPrefix(s, "--") {
					args = append(args, s)
				} else {
					args = append(args, "--set", s)
				}
			}
			_, err := helm(t, append([]string{"template", release, chartDir}, args...)...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("helm template %v: %v, want an error containing %q", tc.set, err, tc.want)
			}
		})
	}
}

// TestChartNoBlockingPDB: with one replica, a PodDisruptionBudget of minAvailable 1
// would block every node drain; the chart leaves it out.
func TestChartNoBlockingPDB(t *testing.T) {
	if testing.Short() {
		t.Skip("runs helm")
	}
	out, err := helm(t, "template", release, chartDir, "--set", "xds.replicas=1,extproc.replicas=1,envoy.replicas=1")
	if err != nil {
		t.Fatal(err)
	}
	r, err := decode(out)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.pdbs) != 0 {
		t.Errorf("single-replica components got PDBs %v", keys(r.pdbs))
	}
}
