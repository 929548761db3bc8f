package rollout

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"go.yaml.in/yaml/v3"
)

func TestLoadDirGood(t *testing.T) {
	set, err := LoadDir("testdata/good")
	if err != nil {
		t.Fatalf("LoadDir: %v", err)
	}
	if got := len(set.Rollouts); got != 2 {
		t.Fatalf("got %d rollouts, want 2", got)
	}
	r := set.Model("ranker")
	if r == nil {
		t.Fatal("ranker missing")
	}
	if r.Timeout.Duration != 2*time.Second || r.Retries == nil || *r.Retries != 1 {
		t.Errorf("timeout/retries = %v/%v", r.Timeout, r.Retries)
	}
	if got, want := r.Traffic, map[string]int{"v7": 90, "v8": 10}; !cmp.Equal(got, want) {
		t.Errorf("traffic %v, want %v", got, want)
	}
	if r.Versions[1].Protocol != "http" {
		t.Errorf("default protocol = %q, want http", r.Versions[1].Protocol)
	}
	if got := r.Experiments[0].Match.Headers["x-country"]; !cmp.Equal(got, []string{"US", "CA"}) {
		t.Errorf("match = %v", got)
	}
	churn := set.Model("churn")
	if churn.Source.Line != 29 || churn.Line("traffic") != 36 {
		t.Errorf("churn source line %d, traffic line %d; want 29, 36", churn.Source.Line, churn.Line("traffic"))
	}
}

func TestLoadDirBadReportsEveryErrorWithLine(t *testing.T) {
	_, err := LoadDir("testdata/bad")
	if err == nil {
		t.Fatal("want errors")
	}
	want := []string{
		`testdata/bad/ranker.yaml:8: versions[1].endpoints[0]: "127.0.0.1:99999": port must be 1..65535`,
		`testdata/bad/ranker.yaml:9: versions[1].protocol: "http3": want http or grpc`,
		`testdata/bad/ranker.yaml:10: traffic: weights sum to 90, want 100`,
		`testdata/bad/ranker.yaml:12: traffic.v9: unknown version "v9" (versions: v7, v8)`,
		`testdata/bad/ranker.yaml:14: shadow[0].version: unknown version "v10" (versions: v7, v8)`,
		`testdata/bad/ranker.yaml:15: shadow[0].percent: 150 is outside (0, 100]`,
		`testdata/bad/ranker.yaml:21: experiments[0].arms[0].weight: 0: arm weights must be positive`,
		`testdata/bad/ranker.yaml:24: experiments[1].allocation: layer "ranking" is over-allocated: its experiments take 110% of users`,
		`testdata/bad/ranker.yaml:25: experiments[1].arms: an experiment needs at least one arm`,
		`testdata/bad/ranker.yaml:26: retries: 20 is outside 0..10`,
	}
	got := strings.Split(err.Error(), "\n")
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("errors (-want +got):\n%s", diff)
	}
	var re *Error
	if !errors.As(err, &re) {
		t.Errorf("errors are not *rollout.Error")
	}
}

func TestParseErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, doc, want string
	}{
		{"unknown field", "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: m\nweights: {}\n",
			`f.yaml:4: unknown field "weights"`},
		{"wrong type", "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: m\ntraffic: [1]\n",
			`f.yaml:4: wrong type: got seq, want a mapping`},
		{"syntax", "model: [unclosed\n", `f.yaml:`},
		{"not a mapping", "- a\n- b\n", `f.yaml:1: a rollout document must be a mapping`},
		{"duplicate key", "model: a\nmodel: b\n", `f.yaml:2: mapping key "model" already defined at line 1`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("f.yaml", []byte(tc.doc))
			if err == nil || !strings.HasPrefix(err.Error(), tc.want) {
				t.Errorf("got %v, want prefix %q", err, tc.want)
			}
		})
	}
}

func TestValidateCrossFile(t *testing.T) {
	dir := t.TempDir()
	doc := func(model, exp string) string {
		return "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: " + model +
			"\nversions: [{name: v1, endpoints: [\"10.0.0.1:80\"]}]\ntraffic: {v1: 100}\n" +
			"experiments: [{name: " + exp + ", layer: l, allocation: 60, arms: [{name: a, version: v1, weight: 1}]}]\n"
	}
	write := func(name, s string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("a.yaml", doc("m", "e1"))
	write("b.yaml", doc("m", "e1"))
	write(".hidden.yaml", "garbage: [")
	write("notes.txt", "ignored")
	_, err := LoadDir(dir)
	if err == nil {
		t.Fatal("want errors")
	}
	for _, want := range []string{
		`b.yaml:3: model: "m" is already defined at ` + filepath.Join(dir, "a.yaml") + `:3`,
		`b.yaml:6: experiments[0].name: experiment "e1" is already defined in`,
		`b.yaml:6: experiments[0].allocation: layer "l" is over-allocated: its experiments take 120% of users`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("missing %q in:\n%v", want, err)
		}
	}
}

func TestProtocolsAndNoDuplicateEndpoints(t *testing.T) {
	doc := "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: m\nversions:\n" +
		"  - {name: v1, endpoints: [\"10.0.0.1:80\", \"10.0.0.1:80\"]}\n" +
		"  - {name: v2, endpoints: [\"10.0.0.2:81\"], protocol: grpc}\n" +
		"  - {name: v3, endpoints: [\"10.0.0.3:80\"], grpcEndpoints: [\"10.0.0.3:90\", \"10.0.0.3:90\"], protocol: grpc}\n" +
		"  - {name: v4}\n" +
		"traffic: {v1: 50, v2: 50}\n"
	rs, err := Parse("m.yaml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	err = Validate(&Set{Rollouts: rs})
	for _, want := range []string{
		`m.yaml:5: versions[0].endpoints[1]: "10.0.0.1:80" is listed twice`,
		`m.yaml:4: versions: no protocol is served by every version with traffic or an experiment arm (v1: REST, v2: gRPC)`,
		`m.yaml:7: versions[2].grpcEndpoints: protocol: grpc says endpoints speak OIP gRPC`,
		`m.yaml:7: versions[2].grpcEndpoints[1]: "10.0.0.3:90" is listed twice`,
		`m.yaml:8: versions[3].endpoints: a version needs at least one endpoint`,
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("missing %q in %v", want, err)
		}
	}
}

// A model serves a protocol when every version with a share serves it; the others are
// only reachable by name over the protocols they have.
func TestModelServesAProtocolEveryVersionWithAShareServes(t *testing.T) {
	doc := "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: m\nversions:\n" +
		"  - {name: v1, endpoints: [\"10.0.0.1:80\"], grpcEndpoints: [\"10.0.0.1:90\"]}\n" +
		"  - {name: v2, endpoints: [\"10.0.0.2:90\"], protocol: grpc}\n" +
		"  - {name: v3, grpcEndpoints: [\"10.0.0.1:90\"]}\n" +
		"traffic: {v1: 100}\n" +
		"experiments:\n  - {name: e, layer: l, allocation: 10, arms: [{name: a, version: v2, weight: 1}]}\n"
	rs, err := Parse("m.yaml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	set := &Set{Rollouts: rs}
	if err := Validate(set); err != nil {
		t.Fatal(err)
	}
	r := rs[0]
	if r.Serves(REST) || !r.Serves(GRPC) {
		t.Fatalf("serves REST %v gRPC %v; want gRPC only (arm v2 has no REST endpoint)", r.Serves(REST), r.Serves(GRPC))
	}
	if got := r.Versions[1].GRPCAddrs(); len(got) != 1 || got[0] != "10.0.0.2:90" {
		t.Fatalf("protocol: grpc endpoints are gRPC addresses: %v", got)
	}
	if got := r.Versions[1].RESTEndpoints(); len(got) != 0 {
		t.Fatalf("protocol: grpc version has REST endpoints %v", got)
	}
	ws := Warnings(set)
	if len(ws) != 1 || !strings.Contains(ws[0].Error(), `m.yaml:7: versions[2].grpcEndpoints[0]: warning: gRPC endpoint "10.0.0.1:90" also serves version "v1"`) {
		t.Fatalf("warnings %v: want the shared gRPC endpoint of v3", ws)
	}
}

func TestTooManyLayers(t *testing.T) {
	r := &Rollout{APIVersion: APIVersion, Kind: Kind, Model: "m", Source: Position{File: "m.yaml", Line: 1},
		Versions: []Version{{Name: "v1", Endpoints: []string{"10.0.0.1:80"}, Protocol: "http"}}, Traffic: map[string]int{"v1": 100}}
	for i := 0; i <= MaxLayersPerModel; i++ {
		r.Experiments = append(r.Experiments, Experiment{Name: "e" + string(rune('a'+i)), Layer: "l" + string(rune('a'+i)), Allocation: 1,
			Arms: []Arm{{Name: "a", Version: "v1", Weight: 1}}})
	}
	err := Validate(&Set{Rollouts: []*Rollout{r}})
	if err == nil || !strings.Contains(err.Error(), "m.yaml:1: experiments: the experiments span 17 layers; at most 16 per model") {
		t.Fatalf("got %v", err)
	}
}

func FuzzParse(f *testing.F) {
	for _, p := range []string{"testdata/good/ranker.yaml", "testdata/bad/ranker.yaml", "testdata/analysis/good.yaml", "testdata/analysis/bad.yaml"} {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte("---\n---\nmodel: x\n"))
	// Properties beyond "nothing panics": every problem is an *Error naming the file and a
	// line > 0; a document that parses and validates, written back as YAML, parses and
	// validates to the same spec.
	f.Fuzz(func(t *testing.T, data []byte) {
		rs, err := Parse("fuzz.yaml", data)
		if err != nil {
			mustLocate(t, "Parse", err)
			return
		}
		if err := Validate(&Set{Rollouts: rs}); err != nil {
			mustLocate(t, "Validate", err)
			return
		}
		for _, r := range rs {
			out, err := yaml.Marshal(r)
			if err != nil {
				t.Fatalf("marshal a valid rollout: %v", err)
			}
			back, err := Parse("again.yaml", out)
			if err != nil || len(back) != 1 {
				t.Fatalf("a valid rollout written back does not parse to one rollout (%d): %v\n%s", len(back), err, out)
			}
			if err := Validate(&Set{Rollouts: back}); err != nil {
				t.Fatalf("a valid rollout written back does not validate: %v\n%s", err, out)
			}
			if d := cmp.Diff(r, back[0], cmpopts.IgnoreUnexported(Rollout{}), cmpopts.IgnoreFields(Rollout{}, "Source"), cmpopts.EquateEmpty()); d != "" {
				t.Fatalf("round trip changed the spec (-parsed +reparsed):\n%s\nwritten as:\n%s", d, out)
			}
		}
	})
}

// mustLocate fails unless every problem joined in err is an *Error with the file and a line.
func mustLocate(t *testing.T, what string, err error) {
	t.Helper()
	var walk func(error)
	walk = func(e error) {
		if j, ok := e.(interface{ Unwrap() []error }); ok {
			for _, c := range j.Unwrap() {
				walk(c)
			}
			return
		}
		var re *Error
		if !errors.As(e, &re) || re.File != "fuzz.yaml" || re.Line <= 0 {
			t.Fatalf("%s: a problem without file and line: %q", what, e)
		}
	}
	walk(err)
}

// host: says what kind of server runs a version: patchbay (default) or oip; anything else
// is refused with its file and line.
func TestVersionHostKind(t *testing.T) {
	doc := "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: m\nversions:\n" +
		"  - {name: v1, endpoints: [\"10.0.0.1:80\"]}\n" +
		"  - {name: v2, endpoints: [\"10.0.0.2:80\"], host: oip}\n" +
		"  - {name: v3, endpoints: [\"10.0.0.3:80\"], host: triton}\n" +
		"  - name: v4\n    endpoints: [\"10.0.0.4:80\"]\n    host: [oip]\n" +
		"traffic: {v1: 50, v2: 50}\n"
	if _, err := Parse("m.yaml", []byte(doc)); err == nil || !strings.Contains(err.Error(), "m.yaml:10: ") {
		t.Fatalf("host: [oip] parsed: %v, want an error at m.yaml:10", err)
	}
	doc = strings.Replace(doc, "host: [oip]", "host: patchbay", 1)
	rs, err := Parse("m.yaml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	r := rs[0]
	if r.Versions[0].Host != HostPatchbay || r.Versions[0].OIPHost() || !r.Versions[1].OIPHost() || r.Versions[3].OIPHost() {
		t.Fatalf("hosts %q %q %q: want patchbay (default), oip, patchbay", r.Versions[0].Host, r.Versions[1].Host, r.Versions[3].Host)
	}
	err = Validate(&Set{Rollouts: rs})
	want := `m.yaml:7: versions[2].host: "triton": want patchbay`
	if err == nil || !strings.Contains(err.Error(), want) || strings.Count(err.Error(), ".host:") != 1 {
		t.Fatalf("got %v, want only %q", err, want)
	}
}

// TestWarnsOnSharedRESTEndpointOfOIPHosts: two host: oip versions on one REST endpoint
// would answer every baseline-split request with the server's default version.
func TestWarnsOnSharedRESTEndpointOfOIPHosts(t *testing.T) {
	doc := "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: m\nversions:\n" +
		"  - {name: v1, endpoints: [\"10.0.0.1:80\"], host: oip}\n" +
		"  - {name: v2, endpoints: [\"10.0.0.1:80\"], host: oip}\n" +
		"traffic: {v1: 50, v2: 50}\n"
	rs, err := Parse("m.yaml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	set := &Set{Rollouts: rs}
	if err := Validate(set); err != nil {
		t.Fatal(err)
	}
	ws := Warnings(set)
	if len(ws) != 1 || !strings.Contains(ws[0].Error(), `m.yaml:6: versions[1].endpoints[0]: warning: REST endpoint "10.0.0.1:80" of a host: oip version also serves version "v1"`) {
		t.Fatalf("warnings %v: want the shared REST endpoint of v2", ws)
	}
	// The same layout on patchbay hosts (they read x-patchbay-version) is fine.
	patchbay := strings.ReplaceAll(doc, ", host: oip", "")
	if rs, err = Parse("m.yaml", []byte(patchbay)); err != nil {
		t.Fatal(err)
	}
	if ws := Warnings(&Set{Rollouts: rs}); len(ws) != 0 {
		t.Fatalf("patchbay hosts: warnings %v, want none", ws)
	}
}

// TestUnknownFieldsReportedWithEveryOtherProblem: an unknown field does not hide the file's
// other problems; each is reported at once with file:line, in line order.
func TestUnknownFieldsReportedWithEveryOtherProblem(t *testing.T) {
	doc := "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: m\nversions:\n" +
		"  - name: v1\n    endpoints: [\"127.0.0.1:9001\"]\n    wieght: 3\n" +
		"  - name: v2\n    endpoints: [\"127.0.0.1:9002\"]\n" +
		"traffic: {v1: 50, v2: 10}\nretires: 2\n"
	_, err := LoadData([]File{{Path: "f.yaml", Data: []byte(doc)}})
	if err == nil {
		t.Fatal("want errors")
	}
	want := []string{
		`f.yaml:7: unknown field "wieght"`,
		`f.yaml:10: traffic: weights sum to 60, want 100`,
		`f.yaml:11: unknown field "retires"`,
	}
	if diff := cmp.Diff(want, strings.Split(err.Error(), "\n")); diff != "" {
		t.Errorf("errors (-want +got):\n%s", diff)
	}
}
