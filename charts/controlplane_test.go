package charts

import (
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// checkControlPlane: the control plane's shape for its source.
//
// kubernetes: replicas (3 by default), a PodDisruptionBudget of maxUnavailable 1, replicas
// spread by preferred anti-affinity (nodes, then zones), its own ServiceAccount with its
// token mounted, and a Role (no ClusterRole) with exactly the rules it needs, bound to that
// ServiceAccount alone; no rollout files, no state volume.
//
// files: one replica, no RBAC, the state file on a PersistentVolumeClaim (not an
// emptyDir) mounted at the file's directory, replaced with the Recreate strategy (a
// ReadWriteOnce claim cannot be attached to two pods on different nodes).
func checkControlPlane(t *testing.T, r *rendered, full, files bool) {
	t.Helper()
	d := r.deployments["rel-patchbay-xds"]
	if d == nil {
		t.Fatal("no control plane Deployment")
	}
	pod := d.Spec.Template.Spec
	sa := "rel-patchbay-xds"
	if full {
		sa = "patchbay-control-plane"
	}
	if pod.ServiceAccountName != sa || r.accounts[sa] == nil {
		t.Errorf("control plane runs as ServiceAccount %q (rendered: %v), want its own, %q", pod.ServiceAccountName, keys(r.accounts), sa)
	}
	for name, other := range r.deployments {
		if name != d.Name && other.Spec.Template.Spec.ServiceAccountName == sa {
			t.Errorf("%s shares the control plane's ServiceAccount %s", name, sa)
		}
	}
	for _, v := range pod.Volumes {
		if v.EmptyDir != nil {
			t.Errorf("control plane volume %s is an emptyDir: its state would not survive a pod replacement", v.Name)
		}
	}
	volume := func(name string) *corev1.Volume {
		for i, v := range pod.Volumes {
			if v.Name == name {
				return &pod.Volumes[i]
			}
		}
		return nil
	}
	replicas := int32(3)
	if full {
		replicas = 5
	}
	if files {
		replicas = 1
	}
	if d.Spec.Replicas == nil || *d.Spec.Replicas != replicas {
		t.Errorf("control plane replicas %v, want %d", d.Spec.Replicas, replicas)
	}
	pdb := r.pdbs["rel-patchbay-xds"]
	if files {
		if pdb != nil {
			t.Error("files source (one replica): a PDB would block every node drain")
		}
		if len(r.roles) != 0 || len(r.bindings) != 0 {
			t.Errorf("files source renders RBAC %v %v; the control plane needs no API access", keys(r.roles), keys(r.bindings))
		}
		if d.Spec.Strategy.Type != "Recreate" {
			t.Errorf("files source: strategy %q, want Recreate (the state claim is ReadWriteOnce)", d.Spec.Strategy.Type)
		}
		stateFile, claimName, class, size := "/var/lib/patchbay/state.json", "rel-patchbay-xds-state", "", "1Gi"
		if full {
			stateFile, class, size = "/srv/state/patchbay.json", "fast-ssd", "5Gi"
		}
		if got := argFlags(t, container(t, r, d.Name, "xds"), "xds")["state-file"]; got != stateFile {
			t.Errorf("--state-file=%q, want %q", got, stateFile)
		}
		v := volume("state")
		if v == nil || v.PersistentVolumeClaim == nil || v.PersistentVolumeClaim.ClaimName != claimName {
			t.Fatalf("state volume %+v, want PersistentVolumeClaim %s", v, claimName)
		}
		var mounted string
		for _, m := range container(t, r, d.Name, "xds").VolumeMounts {
			if m.Name == "state" && !m.ReadOnly {
				mounted = m.MountPath
			}
		}
		if want := stateFile[:len(stateFile)-len("/state.json")]; full && mounted != "/srv/state" || !full && mounted != want {
			t.Errorf("state volume mounted writable at %q, want the state file's directory", mounted)
		}
		pvc := r.claims[claimName]
		if pvc == nil {
			t.Fatalf("no PersistentVolumeClaim %s (have %v)", claimName, keys(r.claims))
		}
		if got := pvc.Spec.Resources.Requests[corev1.ResourceStorage]; got.Cmp(resource.MustParse(size)) != 0 {
			t.Errorf("state claim size %s, want %s", got.String(), size)
		}
		if (class == "") != (pvc.Spec.StorageClassName == nil) || class != "" && *pvc.Spec.StorageClassName != class {
			t.Errorf("state claim storageClassName %v, want %q", pvc.Spec.StorageClassName, class)
		}
		if !slices.Equal(pvc.Spec.AccessModes, []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce}) || pvc.Annotations["helm.sh/resource-policy"] != "keep" {
			t.Errorf("state claim access modes %v annotations %v: want ReadWriteOnce, kept on uninstall", pvc.Spec.AccessModes, pvc.Annotations)
		}
		return
	}

	// kubernetes source
	if len(r.claims) != 0 || volume("state") != nil || volume("rollouts") != nil {
		t.Errorf("kubernetes source: claims %v, state volume %v, rollouts volume %v; want none (state and rollouts live in the API)",
			keys(r.claims), volume("state"), volume("rollouts"))
	}
	maxUnavailable := intstr.FromInt32(1)
	if full {
		maxUnavailable = intstr.FromInt32(2)
	}
	if pdb == nil || pdb.Spec.MaxUnavailable == nil || *pdb.Spec.MaxUnavailable != maxUnavailable || pdb.Spec.MinAvailable != nil {
		t.Errorf("control plane PDB %+v, want maxUnavailable %s", pdb, maxUnavailable.String())
	}
	if !full { // the full values bring their own affinity
		sel := &metav1.LabelSelector{MatchLabels: d.Spec.Selector.MatchLabels}
		want := &corev1.PodAntiAffinity{PreferredDuringSchedulingIgnoredDuringExecution: []corev1.WeightedPodAffinityTerm{
			{Weight: 100, PodAffinityTerm: corev1.PodAffinityTerm{TopologyKey: "kubernetes.io/hostname", LabelSelector: sel}},
			{Weight: 50, PodAffinityTerm: corev1.PodAffinityTerm{TopologyKey: "topology.kubernetes.io/zone", LabelSelector: sel}},
		}}
		if pod.Affinity == nil || !cmp.Equal(pod.Affinity.PodAntiAffinity, want) || pod.Affinity.NodeAffinity != nil || pod.Affinity.PodAffinity != nil {
			t.Errorf("control plane affinity %+v, want preferred anti-affinity over nodes and zones", pod.Affinity)
		}
	}
	role, binding := r.roles["rel-patchbay-xds"], r.bindings["rel-patchbay-xds"]
	if role == nil || binding == nil || len(r.roles) != 1 || len(r.bindings) != 1 {
		t.Fatalf("Roles %v, RoleBindings %v: want one each, rel-patchbay-xds", keys(r.roles), keys(r.bindings))
	}
	wantRules := []rbacv1.PolicyRule{
		{APIGroups: []string{"patchbay.io"}, Resources: []string{"rollouts"}, Verbs: []string{"get", "list", "watch"}},
		{APIGroups: []string{"patchbay.io"}, Resources: []string{"rollouts/status"}, Verbs: []string{"get", "update", "patch"}},
		{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"get", "list", "watch"}},
		{APIGroups: []string{"", "events.k8s.io"}, Resources: []string{"events"}, Verbs: []string{"create"}},
	}
	if diff := cmp.Diff(wantRules, role.Rules); diff != "" || role.Namespace != namespace {
		t.Errorf("Role in namespace %q, rules (-want +got):\n%s", role.Namespace, diff)
	}
	wantBinding := rbacv1.RoleBinding{
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: role.Name},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Name: sa, Namespace: namespace}},
	}
	if !cmp.Equal(wantBinding.RoleRef, binding.RoleRef) || !cmp.Equal(wantBinding.Subjects, binding.Subjects) || binding.Namespace != namespace {
		t.Errorf("RoleBinding %+v %+v, want the Role bound to the control plane's ServiceAccount %s only", binding.RoleRef, binding.Subjects, sa)
	}
}
