package translate

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"google.golang.org/protobuf/proto"

	"github.com/patchbay-io/patchbay/xds/rollout"
)

// modelsSet is a set of rollout files with n models of two versions each, model i sending
// share(i) percent to v2.
func modelsSet(t *testing.T, n int, share func(i int) int) *rollout.Set {
	t.Helper()
	var files []rollout.File
	for i := range n {
		doc := fmt.Sprintf(`apiVersion: patchbay.io/v1
kind: Rollout
model: m%03d
versions:
  - name: v1
    endpoints: ["127.0.0.1:%d"]
  - name: v2
    endpoints: ["127.0.0.1:%d"]
    grpcEndpoints: ["127.0.0.1:%d"]
traffic: {v1: %d, v2: %d}
`, i, 20000+i, 30000+i, 40000+i, 100-share(i), share(i))
		files = append(files, rollout.File{Path: fmt.Sprintf("m%03d.yaml", i), Data: []byte(doc)})
	}
	set, err := rollout.LoadData(files)
	if err != nil {
		t.Fatal(err)
	}
	return set
}

// sameBytes reports whether two resource sets hold the same resources, byte for byte
// (deterministic marshalling), whatever their order.
func sameBytes(t *testing.T, a, b Resources) error {
	t.Helper()
	enc := func(res Resources) map[string]string {
		out := map[string]string{}
		for typ, rs := range res {
			for _, r := range rs {
				bb, err := proto.MarshalOptions{Deterministic: true}.Marshal(r)
				if err != nil {
					t.Fatal(err)
				}
				out[typ+" "+cachev3.GetResourceName(r)] = string(bb)
			}
		}
		return out
	}
	ea, eb := enc(a), enc(b)
	for k, v := range ea {
		if w, ok := eb[k]; !ok {
			return fmt.Errorf("%s only in the first", k)
		} else if v != w {
			return fmt.Errorf("%s differs", k)
		}
	}
	for k := range eb {
		if _, ok := ea[k]; !ok {
			return fmt.Errorf("%s only in the second", k)
		}
	}
	return nil
}

// TestBuilderMatchesBuild: what the incremental builder serves is what the batch
// translation gives, flavour by flavour, byte for byte — on the first build and after an
// edit of one model, a model added and a model removed.
func TestBuilderMatchesBuild(t *testing.T) {
	b := NewBuilder(testOpts)
	check := func(set *rollout.Set) *Output {
		t.Helper()
		in := &Input{Set: set}
		out, err := b.Build(in)
		if err != nil {
			t.Fatal(err)
		}
		edge, err := Envoy(in, testOpts, Edge)
		if err != nil {
			t.Fatal(err)
		}
		sidecar, err := Envoy(in, testOpts, Sidecar)
		if err != nil {
			t.Fatal(err)
		}
		for f, want := range map[int]Resources{FlavourEdge: edge, FlavourSidecar: sidecar, FlavourGRPC: GRPCWith(in, testOpts)} {
			if err := sameBytes(t, out.Flavour(f), want); err != nil {
				t.Fatalf("%s: incremental and batch differ: %v", flavourNames[f], err)
			}
		}
		batch, err := Build(in, testOpts)
		if err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(withoutVersion(out.Policy), withoutVersion(batch.Policy)) {
			t.Fatal("policies differ")
		}
		return out
	}
	check(modelsSet(t, 6, func(int) int { return 10 }))
	check(modelsSet(t, 6, func(i int) int { return map[bool]int{true: 40, false: 10}[i == 3] }))
	check(modelsSet(t, 7, func(int) int { return 10 }))
	check(modelsSet(t, 4, func(int) int { return 10 }))
}

func withoutVersion(p proto.Message) proto.Message {
	c := proto.Clone(p)
	c.ProtoReflect().Clear(c.ProtoReflect().Descriptor().Fields().ByName("config_version"))
	return c
}

// TestBuilderRebuildsOnlyTheEditedModel: after a one-model edit, only that model is
// translated again; every other model's output is the same value as before (so the serving
// layer skips it without looking), and within the edited model the resources whose bytes did
// not change (its clusters, its endpoints) are the previous values. Only its route table
// is new.
func TestBuilderRebuildsOnlyTheEditedModel(t *testing.T) {
	b := NewBuilder(testOpts)
	first, err := b.Build(&Input{Set: modelsSet(t, 50, func(int) int { return 10 })})
	if err != nil {
		t.Fatal(err)
	}
	if len(first.Rebuilt) != 50 {
		t.Fatalf("first build translated %d models, want 50", len(first.Rebuilt))
	}
	second, err := b.Build(&Input{Set: modelsSet(t, 50, func(i int) int { return map[bool]int{true: 60, false: 10}[i == 17] })})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(second.Rebuilt, []string{"m017"}) {
		t.Fatalf("rebuilt %v, want only m017", second.Rebuilt)
	}
	if second.Version == first.Version {
		t.Fatal("the version did not change with a weight")
	}
	for m, mo := range second.Models {
		if m != "m017" && mo != first.Models[m] {
			t.Fatalf("model %s was not reused", m)
		}
	}
	old, cur := first.Models["m017"], second.Models["m017"]
	var changed []string
	for f := range flavourCount {
		for typ, rs := range cur.Res[f] {
			for _, r := range rs {
				name := cachev3.GetResourceName(r)
				if prev := old.lookup(f, typ, name); prev != r {
					changed = append(changed, flavourNames[f]+" "+shortType(typ)+" "+name)
				}
			}
		}
	}
	slices.Sort(changed)
	for _, c := range changed {
		if !strings.Contains(c, "RouteConfiguration") && !strings.Contains(c, "Listener m017") {
			t.Fatalf("resource %s is a new value though only the split changed (all new: %v)", c, changed)
		}
	}
	if len(changed) == 0 {
		t.Fatal("no resource of the edited model changed")
	}
	// The same input again: nothing is rebuilt and the version holds.
	third, err := b.Build(&Input{Set: modelsSet(t, 50, func(i int) int { return map[bool]int{true: 60, false: 10}[i == 17] })})
	if err != nil {
		t.Fatal(err)
	}
	if len(third.Rebuilt) != 0 || third.Version != second.Version {
		t.Fatalf("an unchanged input rebuilt %v, version %s -> %s", third.Rebuilt, second.Version, third.Version)
	}
}

// TestBuilderRefusalKeepsLastGood: a build that fails (here a model whose version's
// endpoint is not an address Envoy accepts) returns an error and leaves the builder as it
// was: the next good build reuses what the last good one made.
func TestBuilderRefusalKeepsLastGood(t *testing.T) {
	b := NewBuilder(testOpts)
	set := modelsSet(t, 3, func(int) int { return 10 })
	good, err := b.Build(&Input{Set: set})
	if err != nil {
		t.Fatal(err)
	}
	bad := &rollout.Set{}
	for _, r := range set.Rollouts {
		c := *r
		if r.Model == "m001" {
			c.Versions = slices.Clone(r.Versions)
			c.Versions[0].TLS = true // needs --upstream-tls-ca, which these options do not have
		}
		bad.Rollouts = append(bad.Rollouts, &c)
	}
	if _, err := b.Build(&Input{Set: bad}); err == nil || !strings.Contains(err.Error(), "tls: true") {
		t.Fatalf("a version with tls: true and no upstream CA built: %v", err)
	}
	again, err := b.Build(&Input{Set: set})
	if err != nil {
		t.Fatal(err)
	}
	if len(again.Rebuilt) != 0 || again.Version != good.Version {
		t.Fatalf("after a refused build the good input rebuilt %v (version %s, was %s)", again.Rebuilt, again.Version, good.Version)
	}
}
