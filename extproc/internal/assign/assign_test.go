package assign

import (
	"math"
	"strconv"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"

	"github.com/patchbay-io/patchbay/api/headers"
	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
	"github.com/patchbay-io/patchbay/extproc/internal/policy"
)

func hdrs(kv ...string) []*corev3.HeaderValue {
	var hs []*corev3.HeaderValue
	for i := 0; i < len(kv); i += 2 {
		// Envoy sends raw_value; tests mix both encodings.
		if i%4 == 0 {
			hs = append(hs, &corev3.HeaderValue{Key: kv[i], RawValue: []byte(kv[i+1])})
		} else {
			hs = append(hs, &corev3.HeaderValue{Key: kv[i], Value: kv[i+1]})
		}
	}
	return hs
}

func compile(t testing.TB, p *policyv1.Policy) *policy.Table {
	t.Helper()
	tbl, err := policy.Compile(p, nil)
	if err != nil {
		t.Fatalf("Compile: %v", err)
	}
	return tbl
}

func arms(kv ...any) []*policyv1.Arm {
	var out []*policyv1.Arm
	for i := 0; i < len(kv); i += 3 {
		out = append(out, &policyv1.Arm{Name: kv[i].(string), Version: kv[i+1].(string), Weight: uint32(kv[i+2].(int))})
	}
	return out
}

func testPolicy() *policyv1.Policy {
	return &policyv1.Policy{
		ConfigVersion:   "c1",
		IdentityHeaders: []string{"x-account", headers.UserID},
		Layers:          []*policyv1.Layer{{Name: "ranking", Salt: "L1"}, {Name: "ui", Salt: "L2"}},
		Models: []*policyv1.Model{
			{Name: "ranker", Salt: "ranker-salt", Versions: []string{"v7", "v8", "v9"}, Pinning: true,
				Experiments: []*policyv1.Experiment{
					{Name: "ltv", Layer: "ranking", SlotStart: 0, SlotEnd: 2000, Salt: "ltv", Arms: arms("control", "v7", 30, "treatment", "v8", 70)},
					{Name: "fresh", Layer: "ranking", SlotStart: 2000, SlotEnd: 3000, Salt: "fresh", Arms: arms("on", "v9", 1)},
					{Name: "color", Layer: "ui", SlotStart: 0, SlotEnd: 4000, Salt: "color",
						Match: []*policyv1.HeaderMatch{{Name: "x-country", Values: []string{"US", "CA"}}},
						Arms:  arms("a", "v7", 1, "b", "v9", 1)},
				}},
			{Name: "thumbs", Salt: "thumbs-salt", Versions: []string{"v1"}, BodyMode: true},
		},
	}
}

func TestParsePath(t *testing.T) {
	t.Parallel()
	tests := []struct {
		path, model, version string
		ok                   bool
	}{
		{"/v2/models/ranker/infer", "ranker", "", true},
		{"/v2/models/ranker", "ranker", "", true},
		{"/v2/models/ranker/ready?x=1", "ranker", "", true},
		{"/v2/models/ranker/versions/v8/infer", "ranker", "v8", true},
		{"/v2/models/ranker/versions/v8", "ranker", "v8", true},
		{"/v2/models/ranker/versions/", "ranker", "", true},
		{"/v2/models/", "", "", false},
		{"/v2/models", "", "", false},
		{"/v2/health/ready", "", "", false},
		{"/inference.GRPCInferenceService/ModelInfer", "", "", false},
		{"", "", "", false},
	}
	for _, tt := range tests {
		m, v, ok := ParsePath(tt.path)
		if m != tt.model || v != tt.version || ok != tt.ok {
			t.Errorf("ParsePath(%q) = %q, %q, %v; want %q, %q, %v", tt.path, m, v, ok, tt.model, tt.version, tt.ok)
		}
	}
}

func TestDecide(t *testing.T) {
	t.Parallel()
	tbl := compile(t, testPolicy())
	ranker := tbl.Model("ranker")
	tests := []struct {
		name     string
		hs       []*corev3.HeaderValue
		outcome  Outcome
		model    string
		identity string
		version  string
		source   Source
		stripped uint8
	}{
		{"non-model path passes", hdrs(":path", "/v2/health/ready", headers.UserID, "u1"), PassThrough, "", "u1", "", Split, 0},
		{"model from path", hdrs(":path", "/v2/models/ranker/infer", headers.UserID, "u1"), Routed, "ranker", "u1", "", Split, 0},
		{"model from header on gRPC", hdrs(":path", headers.GRPCInferencePrefix+"ModelInfer", headers.Model, "ranker", "content-type", "application/grpc", headers.UserID, "u1"), Routed, "ranker", "u1", "", Split, 0},
		{"path and header disagree", hdrs(":path", "/v2/models/ranker/infer", headers.Model, "thumbs", headers.UserID, "u1"), ModelConflict, "", "u1", "", Split, 0},
		{"path and header agree", hdrs(":path", "/v2/models/ranker/infer", headers.Model, "ranker", headers.UserID, "u1"), Routed, "ranker", "u1", "", Split, 0},
		{"header repeated, same model", hdrs(":path", "/v2/models/ranker/infer", headers.Model, "ranker", headers.Model, "ranker"), ModelConflict, "", "", "", Split, 0},
		{"header repeated on gRPC", hdrs(":path", headers.GRPCInferencePrefix+"ModelInfer", headers.Model, "ranker", headers.Model, "thumbs"), ModelConflict, "", "", "", Split, 0},
		{"unknown model", hdrs(":path", "/v2/models/nope/infer"), UnknownModel, "", "", "", Split, 0},
		{"unknown model in header", hdrs(":path", "/x", headers.Model, "nope"), UnknownModel, "", "", "", Split, 0},
		{"pin allowed", hdrs(":path", "/v2/models/ranker/versions/v9/infer", headers.UserID, "u1"), Routed, "ranker", "u1", "v9", Pin, 0},
		{"pin unknown version", hdrs(":path", "/v2/models/ranker/versions/v1/infer"), UnknownVersion, "ranker", "", "", Split, 0},
		{"pin forbidden", hdrs(":path", "/v2/models/thumbs/versions/v1/infer"), PinForbidden, "thumbs", "", "", Split, 0},
		{"identity priority", hdrs(":path", "/v2/models/ranker", headers.UserID, "u1", "x-account", "acct"), Routed, "ranker", "acct", "", Split, 0},
		{"empty identity skipped", hdrs(":path", "/v2/models/ranker", "x-account", "", headers.UserID, "u1"), Routed, "ranker", "u1", "", Split, 0},
		{"stripped headers noted", hdrs(":path", "/v2/models/ranker", headers.Version, "v8", headers.ServedBy, "x", headers.Bucket, "1", headers.Model, "ranker"), Routed, "ranker", "", "", Split, 0b1011},
		{"body mode without identity", hdrs(":path", "/v2/models/thumbs/infer"), NeedBody, "thumbs", "", "", Split, 0},
		{"body mode with identity", hdrs(":path", "/v2/models/thumbs/infer", headers.UserID, "u1"), Routed, "thumbs", "u1", "", Split, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var d Decision
			Decide(tbl, tt.hs, &d)
			if d.Outcome != tt.outcome {
				t.Fatalf("outcome = %d, want %d", d.Outcome, tt.outcome)
			}
			if tt.model != "" && (d.Model == nil || d.Model.Name != tt.model) {
				t.Errorf("model = %v, want %s", d.Model, tt.model)
			}
			if d.Identity != tt.identity || d.Anonymous != (tt.identity == "" && d.Outcome == Routed) {
				t.Errorf("identity = %q anonymous %v, want %q", d.Identity, d.Anonymous, tt.identity)
			}
			if tt.version != "" && (d.Version == nil || d.Version.Name != tt.version || d.Source != tt.source) {
				t.Errorf("version = %v source %d, want %s/%d", d.Version, d.Source, tt.version, tt.source)
			}
			if d.Stripped != tt.stripped {
				t.Errorf("stripped = %04b, want %04b", d.Stripped, tt.stripped)
			}
			if d.Outcome == Routed && !d.Anonymous && d.Model.Name == "ranker" && d.Bucket != policyv1.Hash(ranker.Salt, tt.identity) {
				t.Errorf("bucket = %d, want Hash(model salt, identity)", d.Bucket)
			}
		})
	}
}

func TestAnonymousBucketsAreRandom(t *testing.T) {
	t.Parallel()
	tbl := compile(t, testPolicy())
	hs := hdrs(":path", "/v2/models/ranker/infer", "x-country", "US")
	seen := map[uint64]bool{}
	for range 100 {
		var d Decision
		Decide(tbl, hs, &d)
		if !d.Anonymous || d.NExposed != 0 || d.Version != nil {
			t.Fatalf("anonymous request got experiments: %+v", d)
		}
		seen[d.Bucket] = true
	}
	if len(seen) < 95 {
		t.Errorf("only %d distinct buckets in 100 anonymous decisions", len(seen))
	}
}

// userDecisions decides n users u0..u(n-1) with the given extra headers.
func userDecisions(t testing.TB, tbl *policy.Table, model string, n int, extra ...string) []Decision {
	out := make([]Decision, n)
	for i := range out {
		hs := hdrs(append([]string{":path", "/v2/models/" + model + "/infer", headers.UserID, "u" + strconv.Itoa(i)}, extra...)...)
		Decide(tbl, hs, &out[i])
		if out[i].Outcome != Routed {
			t.Fatalf("user %d: outcome %d", i, out[i].Outcome)
		}
	}
	return out
}

func vname(d *Decision) string {
	if d.Version == nil {
		return ""
	}
	return d.Version.Name
}

func exposedTo(d *Decision, exp string) string {
	for _, a := range d.Exposures() {
		if a.Experiment.Name == exp {
			return a.Name
		}
	}
	return ""
}

func within(t *testing.T, what string, got, want, tol float64) {
	t.Helper()
	if math.Abs(got-want) > tol {
		t.Errorf("%s = %.4f, want %.4f ± %.4f", what, got, want, tol)
	} else {
		t.Logf("%s = %.4f (want %.4f ± %.4f)", what, got, want, tol)
	}
}

const users = 20000

// Tolerances are ~4.5 binomial standard deviations at 20,000 users.
func TestAllocationAndArmShares(t *testing.T) {
	t.Parallel()
	tbl := compile(t, testPolicy())
	ds := userDecisions(t, tbl, "ranker", users, "x-country", "US")
	var ltv, treatment, fresh, color, both, first, baseline90 int
	for i := range ds {
		d := &ds[i]
		a, f := exposedTo(d, "ltv"), exposedTo(d, "fresh")
		if a != "" {
			ltv++
			if a == "treatment" {
				treatment++
			}
		}
		if f != "" {
			fresh++
		}
		if a != "" && f != "" {
			both++
		}
		if c := exposedTo(d, "color"); c != "" {
			color++
			// ltv and fresh come first in file order: they decide the version when present.
			if a == "" && f == "" && d.Version.Name != map[string]string{"a": "v7", "b": "v9"}[c] {
				t.Fatalf("user %d: color=%s but version %s", i, c, d.Version.Name)
			}
		}
		if a != "" && d.Version.Name != map[string]string{"control": "v7", "treatment": "v8"}[a] {
			first++
		}
		if d.Bucket%100 < 90 {
			baseline90++
		}
	}
	if both != 0 {
		t.Errorf("%d users in two experiments of one layer", both)
	}
	if first != 0 {
		t.Errorf("%d users where the first experiment did not decide the version", first)
	}
	within(t, "ltv allocation", float64(ltv)/users, 0.20, 0.013)
	within(t, "fresh allocation", float64(fresh)/users, 0.10, 0.010)
	within(t, "color allocation", float64(color)/users, 0.40, 0.016)
	within(t, "ltv treatment share", float64(treatment)/float64(ltv), 0.70, 0.033)
	within(t, "baseline bucket%100 < 90", float64(baseline90)/users, 0.90, 0.010)

	// Targeting: without a matching header nobody is in color.
	for _, d := range userDecisions(t, tbl, "ranker", 2000, "x-country", "FR") {
		if exposedTo(&d, "color") != "" {
			t.Fatal("user outside the targeted countries exposed to color")
		}
	}
}

func TestLayersIndependent(t *testing.T) {
	t.Parallel()
	tbl := compile(t, testPolicy())
	ds := userDecisions(t, tbl, "ranker", users, "x-country", "CA")
	var a, b, ab int
	for i := range ds {
		inA, inB := exposedTo(&ds[i], "ltv") != "", exposedTo(&ds[i], "color") != ""
		if inA {
			a++
		}
		if inB {
			b++
		}
		if inA && inB {
			ab++
		}
	}
	pa, pb, pab := float64(a)/users, float64(b)/users, float64(ab)/users
	// Both experiments start at slot 0 of their layer: without per-layer salts they would
	// overlap completely (P(a and b) = P(a)).
	within(t, "P(ltv and color)", pab, pa*pb, 0.01)
}

func TestRampIsMonotone(t *testing.T) {
	t.Parallel()
	before := testPolicy()
	after := testPolicy()
	after.Models[0].Experiments[0].SlotEnd = 3000 // 20% -> 30% ...
	after.Models[0].Experiments[1].SlotStart = 3000
	after.Models[0].Experiments[1].SlotEnd = 4000 // ... fresh moves up, same size
	dsBefore := userDecisions(t, compile(t, before), "ranker", users)
	dsAfter := userDecisions(t, compile(t, after), "ranker", users)
	var grew int
	for i := range dsBefore {
		b, a := exposedTo(&dsBefore[i], "ltv"), exposedTo(&dsAfter[i], "ltv")
		if b != "" && a != b {
			t.Fatalf("user %d was in ltv=%s, after the ramp ltv=%q", i, b, a)
		}
		if b == "" && a != "" {
			grew++
		}
		if dsBefore[i].Bucket != dsAfter[i].Bucket {
			t.Fatalf("user %d: bucket changed with the ramp", i)
		}
	}
	within(t, "users added by the ramp", float64(grew)/users, 0.10, 0.01)
}

func TestStickyAcrossTables(t *testing.T) {
	t.Parallel()
	// Two independently compiled tables (as two replicas or a restart would build)
	// decide every user the same way.
	a := userDecisions(t, compile(t, testPolicy()), "ranker", 5000, "x-country", "US")
	b := userDecisions(t, compile(t, testPolicy()), "ranker", 5000, "x-country", "US")
	for i := range a {
		if a[i].Bucket != b[i].Bucket || a[i].Combo != b[i].Combo || vname(&a[i]) != vname(&b[i]) {
			t.Fatalf("user %d decided differently by two tables", i)
		}
	}
}

func TestDecideDoesNotAllocate(t *testing.T) {
	tbl := compile(t, testPolicy())
	cases := map[string][]*corev3.HeaderValue{
		"experiments": benchHeaders("u17"),
		"anonymous":   hdrs(":path", "/v2/models/ranker/infer", "content-type", "application/json"),
		"pin":         hdrs(":path", "/v2/models/ranker/versions/v8/infer", headers.UserID, "u1"),
		"passthrough": hdrs(":path", "/v2/health/ready"),
		"conflict":    hdrs(":path", "/v2/models/ranker/infer", headers.Model, "thumbs", headers.UserID, "u1"),
		"repeated":    hdrs(":path", headers.GRPCInferencePrefix+"ModelInfer", headers.Model, "ranker", headers.Model, "ranker"),
	}
	for name, hs := range cases {
		var d Decision
		if n := testing.AllocsPerRun(1000, func() { Decide(tbl, hs, &d) }); n != 0 {
			t.Errorf("%s: %v allocations per decision, want 0", name, n)
		}
	}
}

// benchHeaders is a realistic Envoy request-headers message.
func benchHeaders(user string) []*corev3.HeaderValue {
	return hdrs(":authority", "edge.example", ":path", "/v2/models/ranker/infer", ":method", "POST", ":scheme", "http",
		"content-type", "application/json", "content-length", "412", "user-agent", "client/1.0",
		"x-request-id", "0d2b5f0e-5e9b-4a8f-9c53-1f2a3b4c5d6e", "x-forwarded-proto", "http", "x-country", "US",
		headers.UserID, user, "x-envoy-expected-rq-timeout-ms", "2000")
}

func BenchmarkDecide(b *testing.B) {
	tbl := compile(b, testPolicy())
	hss := make([][]*corev3.HeaderValue, 1024)
	for i := range hss {
		hss[i] = benchHeaders("user-" + strconv.Itoa(i))
	}
	b.ReportAllocs()
	var d Decision
	i := 0
	for b.Loop() {
		Decide(tbl, hss[i&1023], &d)
		i++
	}
}
