package charts

import (
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/patchbay-io/patchbay/envoy"
)

// tlsCase is how a rendering gets its certificates.
type tlsCase int

const (
	tlsOff         tlsCase = iota
	tlsCertManager         // tls.enabled with cert-manager Certificates (the full values)
	tlsSecrets             // tls.enabled with Secrets the operator provides
)

const tlsDir = "/etc/patchbay/tls"

// tlsPart is one pod that gets a certificate.
type tlsPart struct {
	deployment, container, component, role, secret, service string
	patchbay                                                bool // a patchbay container: --tls-* flags
}

func tlsParts(r *rendered, c tlsCase) []tlsPart {
	secret := func(component, given string) string {
		if given != "" {
			return given
		}
		return "rel-patchbay-" + component + "-tls"
	}
	full := c == tlsCertManager
	pick := func(full bool, given string) string {
		if full {
			return given
		}
		return ""
	}
	parts := []tlsPart{
		{"rel-patchbay-xds", "xds", "xds", "xds", secret("xds", map[tlsCase]string{tlsSecrets: "xds-certs"}[c]), "rel-patchbay-xds", true},
		{"rel-patchbay-extproc", "extproc", "extproc", "extproc", secret("extproc", pick(full, "extproc-certs")), "rel-patchbay-extproc", true},
		{"rel-patchbay-envoy", "envoy", "envoy", "edge", secret("envoy", ""), "rel-patchbay-envoy", false},
	}
	for name := range r.deployments {
		if host, ok := strings.CutPrefix(name, "rel-patchbay-modelhost-"); ok {
			parts = append(parts, tlsPart{name, "modelhost", "modelhost-" + host, "modelhost",
				secret("modelhost-"+host, pick(full && host == "churn", "churn-certs")), name, true})
		}
	}
	if r.deployments["rel-patchbay-example-client"] != nil {
		parts = append(parts, tlsPart{"rel-patchbay-example-client", "patchbay-envoy", "example-client", "sidecar",
			secret("example-client", pick(full, "client-certs")), "", false})
	}
	return parts
}

// checkTLS: with tls.enabled every part mounts its certificate Secret read-only and whole
// (no subPath, so rotations reach the pod) where its flags (or Envoy's SDS files) point,
// nothing restarts pods on rotation, the kubelet probes by TCP, Envoy runs the mTLS
// bootstrap with the shipped SDS files, and with cert-manager each part's Certificate
// carries its role's identity and Service names. Without it, none of this is there.
func checkTLS(t *testing.T, r *rendered, c tlsCase) {
	t.Helper()
	for _, p := range tlsParts(r, c) {
		d := r.deployments[p.deployment]
		if d == nil {
			t.Errorf("no Deployment %s", p.deployment)
			continue
		}
		ctr := container(t, r, p.deployment, p.container)
		var mount *corev1.VolumeMount
		for i, m := range ctr.VolumeMounts {
			if m.MountPath == tlsDir {
				mount = &ctr.VolumeMounts[i]
			}
		}
		var flags map[string]string
		if p.patchbay {
			flags = argFlags(t, ctr, p.container)
		}
		if c == tlsOff {
			if mount != nil {
				t.Errorf("%s mounts %s without tls.enabled", p.deployment, tlsDir)
			}
			for _, f := range []string{"tls-cert", "tls-key", "client-ca", "xds-ca", "xds-cert", "xds-key", "upstream-tls", "upstream-tls-ca", "edge-tls-cert"} {
				if _, ok := flags[f]; ok {
					t.Errorf("%s passes --%s without tls.enabled", p.deployment, f)
				}
			}
			continue
		}
		if mount == nil {
			t.Errorf("%s/%s does not mount its certificate at %s", p.deployment, p.container, tlsDir)
			continue
		}
		if !mount.ReadOnly || mount.SubPath != "" || mount.SubPathExpr != "" {
			t.Errorf("%s: TLS mount %+v: want read-only and whole (a subPath mount never sees a rotation)", p.deployment, mount)
		}
		var vol *corev1.Volume
		for i, v := range d.Spec.Template.Spec.Volumes {
			if v.Name == mount.Name {
				vol = &d.Spec.Template.Spec.Volumes[i]
			}
		}
		if vol == nil || vol.Secret == nil || vol.Secret.SecretName != p.secret {
			t.Errorf("%s: TLS volume %+v, want Secret %s", p.deployment, vol, p.secret)
		} else if m := vol.Secret.DefaultMode; m == nil || *m&0o022 != 0 || len(vol.Secret.Items) != 0 {
			t.Errorf("%s: TLS Secret volume mode %v items %v: want not group/world-writable, every key", p.deployment, m, vol.Secret.Items)
		}
		for k := range d.Spec.Template.Annotations {
			if strings.HasPrefix(k, "checksum/") && k != "checksum/bootstrap" && k != "checksum/rollouts" {
				t.Errorf("%s: pod annotation %s would restart pods on a rotation; the files are re-read instead", p.deployment, k)
			}
		}
		if p.patchbay {
			want := map[string]string{"tls-cert": tlsDir + "/tls.crt", "tls-key": tlsDir + "/tls.key", "client-ca": tlsDir + "/ca.crt"}
			switch p.container {
			case "extproc":
				want["xds-ca"], want["xds-cert"], want["xds-key"] = tlsDir+"/ca.crt", tlsDir+"/tls.crt", tlsDir+"/tls.key"
			case "xds":
				// Paths as Envoy sees them: Envoy mounts its Secret at the same place.
				want["upstream-tls"] = "true"
				want["upstream-tls-ca"], want["upstream-tls-cert"], want["upstream-tls-key"] = tlsDir+"/ca.crt", tlsDir+"/tls.crt", tlsDir+"/tls.key"
				if c == tlsCertManager { // tls.edge in the full values
					want["edge-tls-cert"], want["edge-tls-key"], want["edge-client-ca"] = tlsDir+"/tls.crt", tlsDir+"/tls.key", tlsDir+"/ca.crt"
				}
			}
			for f, v := range want {
				if flags[f] != v {
					t.Errorf("%s --%s = %q, want %q", p.deployment, f, flags[f], v)
				}
			}
			for _, probe := range []*corev1.Probe{ctr.ReadinessProbe, ctr.LivenessProbe, ctr.StartupProbe} {
				if probe != nil && probe.HTTPGet != nil {
					t.Errorf("%s: HTTP probe on a listener that requires client certificates (the kubelet has none)", p.deployment)
				}
			}
		} else {
			checkEnvoySDS(t, r, d, ctr)
		}
		cert := r.certs["rel-patchbay-"+p.component]
		if c != tlsCertManager {
			if cert != nil {
				t.Errorf("Certificate %s rendered without tls.certManager", cert.Name)
			}
			continue
		}
		if cert == nil {
			t.Errorf("no Certificate for %s (have %v)", p.component, keys(r.certs))
			continue
		}
		cs := cert.Spec
		if cs.SecretName != p.secret {
			t.Errorf("Certificate %s writes Secret %q, the pod mounts %q", cert.Name, cs.SecretName, p.secret)
		}
		if want := []string{envoy.Identity(p.role)}; !cmp.Equal(cs.URIs, want) {
			t.Errorf("Certificate %s URIs %v, want %v (the identity the control plane maps)", cert.Name, cs.URIs, want)
		}
		if p.service != "" && !cmp.Equal(cs.DNSNames, []string{p.service, p.service + ".ml", p.service + ".ml.svc", p.service + ".ml.svc.k8s.example"}) {
			t.Errorf("Certificate %s DNS names %v, want the Service %s's", cert.Name, cs.DNSNames, p.service)
		}
		if cs.IssuerRef.Name != "patchbay-ca" || cs.IssuerRef.Kind != "ClusterIssuer" || cs.IssuerRef.Group != "cert-manager.io" {
			t.Errorf("Certificate %s issuer %+v", cert.Name, cs.IssuerRef)
		}
		for _, u := range []string{"server auth", "client auth"} {
			if !slices.Contains(cs.Usages, u) {
				t.Errorf("Certificate %s usages %v lack %q", cert.Name, cs.Usages, u)
			}
		}
		if cs.Duration != "720h" || cs.RenewBefore != "240h" || cs.PrivateKey.RotationPolicy != "Always" {
			t.Errorf("Certificate %s duration %s renewBefore %s key %+v", cert.Name, cs.Duration, cs.RenewBefore, cs.PrivateKey)
		}
	}
	if c == tlsCertManager && len(r.certs) != len(tlsParts(r, c)) {
		t.Errorf("Certificates %v, want one per part", keys(r.certs))
	}
}

// checkEnvoySDS: an Envoy container mounts the SDS ConfigMap where its bootstrap reads the
// SDS files, and those files are the shipped envoy/sds/*.yaml (valid Secrets naming the
// PEMs in the mounted certificate Secret).
func checkEnvoySDS(t *testing.T, r *rendered, d interface{ GetName() string }, ctr corev1.Container) {
	t.Helper()
	dep := r.deployments[d.GetName()]
	var sdsVol string
	for _, m := range ctr.VolumeMounts {
		if m.MountPath == envoy.DefaultSDSDir {
			sdsVol = m.Name
			if !m.ReadOnly || m.SubPath != "" {
				t.Errorf("%s: SDS mount %+v: want read-only and whole", d.GetName(), m)
			}
		}
	}
	var cm *corev1.ConfigMap
	for _, v := range dep.Spec.Template.Spec.Volumes {
		if v.Name == sdsVol && v.ConfigMap != nil {
			cm = r.configMaps[v.ConfigMap.Name]
		}
	}
	if cm == nil {
		t.Errorf("%s/%s does not mount a rendered SDS ConfigMap at %s", d.GetName(), ctr.Name, envoy.DefaultSDSDir)
		return
	}
	bootstrap := r.configMaps["rel-patchbay-envoy-edge"]
	if ctr.Name == "patchbay-envoy" {
		bootstrap = r.configMaps["rel-patchbay-envoy-sidecar"]
	}
	b, err := envoy.Parse([]byte(bootstrap.Data["envoy.yaml"]))
	if err != nil {
		t.Fatal(err)
	}
	paths := envoy.SDSPaths(b)
	if len(paths) != 2 {
		t.Errorf("%s bootstrap reads SDS files %v, want 2", bootstrap.Name, paths)
	}
	for _, p := range paths {
		name, ok := strings.CutPrefix(p, envoy.DefaultSDSDir+"/")
		data, present := cm.Data[name]
		if !ok || !present {
			t.Errorf("%s bootstrap reads %s, which the mounted ConfigMap %s does not hold", bootstrap.Name, p, cm.Name)
			continue
		}
		if err := envoy.CheckSDS(p, []byte(data)); err != nil {
			t.Errorf("ConfigMap %s: %v", cm.Name, err)
		}
		got, err1 := envoy.ParseSDS([]byte(data))
		shipped, err2 := envoy.SDSFile(name)
		want, err3 := envoy.ParseSDS(shipped)
		if err1 != nil || err2 != nil || err3 != nil || len(got) != len(want) || !proto.Equal(got[0], want[0]) {
			t.Errorf("ConfigMap %s %s differs from envoy/sds/%s: %v %v %v", cm.Name, name, name, err1, err2, err3)
		}
	}
}

// Expected NetworkPolicy building blocks.
func selPeer(component string) networkingv1.NetworkPolicyPeer {
	return networkingv1.NetworkPolicyPeer{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{
		"app.kubernetes.io/name": "patchbay", "app.kubernetes.io/instance": release, "app.kubernetes.io/component": component,
	}}}
}

func labelPeer(pods, namespaces map[string]string) networkingv1.NetworkPolicyPeer {
	var p networkingv1.NetworkPolicyPeer
	if pods != nil {
		p.PodSelector = &metav1.LabelSelector{MatchLabels: pods}
	}
	if namespaces != nil {
		p.NamespaceSelector = &metav1.LabelSelector{MatchLabels: namespaces}
	}
	return p
}

func ports(proto corev1.Protocol, ps ...int32) []networkingv1.NetworkPolicyPort {
	var out []networkingv1.NetworkPolicyPort
	for _, p := range ps {
		port := intstr.FromInt32(p)
		out = append(out, networkingv1.NetworkPolicyPort{Protocol: &proto, Port: &port})
	}
	return out
}

func in(from []networkingv1.NetworkPolicyPeer, ps ...int32) networkingv1.NetworkPolicyIngressRule {
	return networkingv1.NetworkPolicyIngressRule{From: from, Ports: ports(corev1.ProtocolTCP, ps...)}
}

func out(to []networkingv1.NetworkPolicyPeer, ps ...int32) networkingv1.NetworkPolicyEgressRule {
	return networkingv1.NetworkPolicyEgressRule{To: to, Ports: ports(corev1.ProtocolTCP, ps...)}
}

type peers = []networkingv1.NetworkPolicyPeer

// checkNetworkPolicies: one policy per part, ingress and egress, each rule exactly as the
// table in values.yaml says: which peers reach which ports, and where each part may go.
//
// With the kubernetes source the control plane may also reach the API server
// (networkPolicy.apiServer: anywhere on 443 and 6443 by default).
func checkNetworkPolicies(t *testing.T, r *rendered, full, files bool) {
	t.Helper()
	type rules struct {
		in  []networkingv1.NetworkPolicyIngressRule
		out []networkingv1.NetworkPolicyEgressRule
	}
	envoyPeer, extprocPeer, xdsPeer := selPeer("envoy"), selPeer("extproc"), selPeer("xds")
	hostsPeer := func(hosts ...string) networkingv1.NetworkPolicyPeer {
		return networkingv1.NetworkPolicyPeer{PodSelector: &metav1.LabelSelector{
			MatchLabels: map[string]string{"app.kubernetes.io/name": "patchbay", "app.kubernetes.io/instance": release},
			MatchExpressions: []metav1.LabelSelectorRequirement{{
				Key: "app.kubernetes.io/component", Operator: metav1.LabelSelectorOpIn, Values: hosts,
			}},
		}}
	}
	dns := networkingv1.NetworkPolicyEgressRule{Ports: append(ports(corev1.ProtocolUDP, 53), ports(corev1.ProtocolTCP, 53)...)}
	var want map[string]rules
	if !full {
		dns.To = peers{labelPeer(map[string]string{"k8s-app": "kube-dns"}, map[string]string{"kubernetes.io/metadata.name": "kube-system"})}
		clients := labelPeer(map[string]string{"patchbay.io/client": "true"}, nil)
		operators := labelPeer(map[string]string{"patchbay.io/operator": "true"}, nil)
		want = map[string]rules{
			"rel-patchbay-envoy": {
				in: []networkingv1.NetworkPolicyIngressRule{in(peers{{PodSelector: &metav1.LabelSelector{}}}, 10000)},
				out: []networkingv1.NetworkPolicyEgressRule{
					out(peers{xdsPeer}, 18000), out(peers{extprocPeer}, 18080),
					out(peers{hostsPeer("modelhost-examples")}, 8000, 8001), dns,
				},
			},
			"rel-patchbay-extproc": {
				in:  []networkingv1.NetworkPolicyIngressRule{in(peers{envoyPeer, clients}, 18080)},
				out: []networkingv1.NetworkPolicyEgressRule{out(peers{xdsPeer}, 18000), dns},
			},
			"rel-patchbay-xds": {
				in: []networkingv1.NetworkPolicyIngressRule{in(peers{envoyPeer, extprocPeer, clients}, 18000),
					in(peers{hostsPeer("modelhost-examples")}, 18000), // prediction records (shadow comparison)
					in(peers{operators}, 18001)},
				out: []networkingv1.NetworkPolicyEgressRule{out(peers{hostsPeer("modelhost-examples")}, 8000, 8001), dns},
			},
			"rel-patchbay-modelhost-examples": {
				in:  []networkingv1.NetworkPolicyIngressRule{in(peers{envoyPeer, xdsPeer, clients}, 8000, 8001)},
				out: []networkingv1.NetworkPolicyEgressRule{dns},
			},
		}
	} else {
		clients := labelPeer(map[string]string{"patchbay.io/client": "true"}, map[string]string{"patchbay.io/clients": "allowed"})
		operators := labelPeer(map[string]string{"team": "ml-ops"}, map[string]string{"kubernetes.io/metadata.name": "ops"})
		metrics := labelPeer(nil, map[string]string{"kubernetes.io/metadata.name": "monitoring"})
		ingress := labelPeer(nil, map[string]string{"kubernetes.io/metadata.name": "ingress"})
		store := networkingv1.NetworkPolicyEgressRule{To: peers{{IPBlock: &networkingv1.IPBlock{CIDR: "10.20.0.0/16"}}}, Ports: ports(corev1.ProtocolTCP, 443)}
		want = map[string]rules{
			"rel-patchbay-envoy": {
				in: []networkingv1.NetworkPolicyIngressRule{in(peers{ingress}, 8080), in(peers{metrics}, 19902)},
				out: []networkingv1.NetworkPolicyEgressRule{
					out(peers{xdsPeer}, 28000), out(peers{extprocPeer}, 28080),
					out(peers{hostsPeer("modelhost-ranker", "modelhost-churn")}, 9000, 9001, 8000, 8001),
					out(nil, 4317), dns, // the trace collector is outside the cluster: its port only
				},
			},
			"rel-patchbay-extproc": {
				in: []networkingv1.NetworkPolicyIngressRule{in(peers{envoyPeer, clients}, 28080), in(peers{metrics}, 28081)},
				// --xds names a control plane in another namespace: its port.
				out: []networkingv1.NetworkPolicyEgressRule{out(nil, 28000), out(nil, 4317), dns},
			},
			"rel-patchbay-xds": {
				in: []networkingv1.NetworkPolicyIngressRule{in(peers{envoyPeer, extprocPeer, clients}, 28000),
					in(peers{hostsPeer("modelhost-ranker", "modelhost-churn")}, 28000), // prediction records
					in(peers{operators, metrics}, 28001)},
				// The hosts' data ports (the version prober) and ranker's admin port (its
				// /metrics, for a canary analysis).
				out: []networkingv1.NetworkPolicyEgressRule{out(peers{hostsPeer("modelhost-ranker", "modelhost-churn")}, 9000, 9001, 8000, 8001, 9002), dns},
			},
			"rel-patchbay-modelhost-ranker": {
				in: []networkingv1.NetworkPolicyIngressRule{in(peers{envoyPeer, xdsPeer, clients}, 9000, 9001), in(peers{operators, xdsPeer}, 9002), in(peers{metrics}, 9000)},
				// shadowRecords: prediction records to the control plane's ADS port.
				out: []networkingv1.NetworkPolicyEgressRule{out(peers{xdsPeer}, 28000), out(nil, 4317), out(nil, 6379), dns, store},
			},
			"rel-patchbay-modelhost-churn": {
				in:  []networkingv1.NetworkPolicyIngressRule{in(peers{envoyPeer, xdsPeer, clients}, 8000, 8001), in(peers{metrics}, 8000)},
				out: []networkingv1.NetworkPolicyEgressRule{dns, store},
			},
		}
	}
	if !files {
		apiServer := out(nil, 443, 6443)
		if full {
			apiServer = out(peers{{IPBlock: &networkingv1.IPBlock{CIDR: "10.0.0.1/32"}}}, 6443)
		}
		w := want["rel-patchbay-xds"]
		w.out = append(w.out[:len(w.out)-1:len(w.out)-1], apiServer, w.out[len(w.out)-1]) // before DNS
		want["rel-patchbay-xds"] = w
	}
	if got := keys(r.netpols); !cmp.Equal(got, keys(want)) {
		t.Errorf("NetworkPolicies %v, want %v (on by default, one per part)", got, keys(want))
	}
	for name, w := range want {
		np := r.netpols[name]
		if np == nil {
			continue
		}
		if !cmp.Equal(np.Spec.PolicyTypes, []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}) {
			t.Errorf("%s policyTypes %v: want Ingress and Egress", name, np.Spec.PolicyTypes)
		}
		if diff := cmp.Diff(w.in, np.Spec.Ingress, cmpopts.EquateEmpty()); diff != "" {
			t.Errorf("%s ingress (-want +got):\n%s", name, diff)
		}
		if diff := cmp.Diff(w.out, np.Spec.Egress, cmpopts.EquateEmpty()); diff != "" {
			t.Errorf("%s egress (-want +got):\n%s", name, diff)
		}
	}
}
