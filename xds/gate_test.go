package xds

import (
	"context"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
	"github.com/patchbay-io/patchbay/xds/rollout"
)

// TestPolicyExtprocWouldNACKIsNeverServed: a set that produces a policy ext_proc's compiler
// refuses (here an arm weight past uint32, which became 0 in the policy, and an arm of an
// unknown version, both slipped past the file rules) is refused in the build gate with the
// Envoy resources: the last good config keeps serving, to Envoy and ext_proc alike.
func TestPolicyExtprocWouldNACKIsNeverServed(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "g.yaml", rolloutDoc("g", map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002"}, "{v1: 50, v2: 50}",
		"experiments: [{name: ge, layer: gl, allocation: 10, arms: [{name: a, version: v1, weight: 1}]}]\n"))
	c := startCP(t, dir)
	good := c.srv.Version()
	for name, edit := range map[string]func(a *rollout.Arm){
		"weight 2^32":     func(a *rollout.Arm) { a.Weight = 1 << 32 },
		"unknown version": func(a *rollout.Arm) { a.Version = "v9" },
	} {
		t.Run(name, func(t *testing.T) {
			files, err := rollout.ReadDir(dir)
			if err != nil {
				t.Fatal(err)
			}
			set, err := rollout.LoadData(files)
			if err != nil {
				t.Fatal(err)
			}
			r := *set.Rollouts[0]
			r.Experiments = append([]rollout.Experiment(nil), r.Experiments...)
			r.Experiments[0].Arms = append([]rollout.Arm(nil), r.Experiments[0].Arms...)
			edit(&r.Experiments[0].Arms[0])
			c.srv.mu.Lock()
			c.srv.applyFilesLocked(context.Background(), &rollout.Set{Rollouts: []*rollout.Rollout{&r}}, "test", c.srv.state.models)
			c.srv.mu.Unlock()
			st := c.srv.Status()
			if st.ConfigVersion != good || st.CurrentError == nil || !strings.Contains(st.CurrentError.Message, "ext_proc policy:") {
				t.Fatalf("version %s (good %s), error %+v: want the policy refused and the last good config kept", st.ConfigVersion, good, st.CurrentError)
			}
			s := adsStream(t, c)
			p := &policyv1.Policy{}
			if err := fetch(t, s, &corev3.Node{Id: "x", UserAgentName: policyv1.ExtprocUserAgent}, policyv1.TypeURL).GetResources()[0].UnmarshalTo(p); err != nil {
				t.Fatal(err)
			}
			if p.GetConfigVersion() != good {
				t.Fatalf("ext_proc is served policy %s, want the last good %s", p.GetConfigVersion(), good)
			}
		})
	}
}

// TestPolicyOnlyForExtproc: without client certificates the flavour follows the node, but
// the policy is still served to ext_proc nodes only, and ext_proc nodes get nothing else.
func TestPolicyOnlyForExtproc(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "p.yaml", rolloutDoc("p", map[string]string{"v1": "127.0.0.1:9001"}, "{v1: 100}", ""))
	c := startCP(t, dir)
	for name, n := range map[string]*corev3.Node{
		"edge envoy": envoyNode("edge"), "sidecar envoy": envoyNode("sidecar"), "grpc client": {Id: "g", UserAgentName: "gRPC Go"},
	} {
		t.Run(name, func(t *testing.T) { refused(t, adsStream(t, c), n, policyv1.TypeURL) })
	}
	t.Run("ext_proc asking for clusters", func(t *testing.T) {
		refused(t, adsStream(t, c), &corev3.Node{Id: "x", UserAgentName: policyv1.ExtprocUserAgent}, resource.ClusterType)
	})
}
