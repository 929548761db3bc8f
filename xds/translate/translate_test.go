package translate

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/patchbay-io/patchbay/xds/rollout"
)

var update = flag.Bool("update", false, "rewrite golden files")

var testOpts = Options{EdgeAddress: "0.0.0.0:10000", SidecarAddress: "127.0.0.1:15001", AccessLog: true}

func loadInput(t *testing.T, path string) *Input {
	t.Helper()
	set, err := rollout.LoadFiles(path)
	if err != nil {
		t.Fatal(err)
	}
	return &Input{Set: set, Resolved: map[string][]string{
		"thumbs-v1.models.svc":   {"10.1.0.7", "10.1.0.3"},
		"model-host.default.svc": {"10.2.0.1"},
		"grpc-host.default.svc":  {"10.3.0.1"},
	}}
}

// normalize renders messages as indented JSON with sorted keys: protojson's own output
// is deliberately unstable, so it is re-encoded through encoding/json.
func normalize(t *testing.T, v any) []byte {
	t.Helper()
	var conv func(any) any
	conv = func(v any) any {
		switch x := v.(type) {
		case proto.Message:
			b, err := protojson.Marshal(x)
			if err != nil {
				t.Fatal(err)
			}
			var out any
			if err := json.Unmarshal(b, &out); err != nil {
				t.Fatal(err)
			}
			return out
		case []types.Resource:
			out := make([]any, len(x))
			for i, m := range x {
				out[i] = conv(m)
			}
			return out
		case map[string]any:
			out := map[string]any{}
			for k, e := range x {
				out[k] = conv(e)
			}
			return out
		default:
			return v
		}
	}
	b, err := json.MarshalIndent(conv(v), "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	return append(b, '\n')
}

func TestGolden(t *testing.T) {
	cases, _ := filepath.Glob("testdata/*.yaml")
	if len(cases) == 0 {
		t.Fatal("no cases")
	}
	for _, path := range cases {
		name := strings.TrimSuffix(filepath.Base(path), ".yaml")
		t.Run(name, func(t *testing.T) {
			in := loadInput(t, path)
			b, err := Build(in, testOpts)
			if err != nil {
				t.Fatalf("Build: %v", err)
			}
			edge, _ := Envoy(in, testOpts, Edge)
			got := normalize(t, map[string]any{
				"version":   b.Version,
				"listeners": edge[resource.ListenerType],
				"routes":    edge[resource.RouteType],
				"scopes":    edge[resource.ScopedRouteType],
				"clusters":  edge[resource.ClusterType],
				"endpoints": edge[resource.EndpointType],
				"grpc":      map[string]any{"listeners": GRPC(in)[resource.ListenerType], "clusters": GRPC(in)[resource.ClusterType]},
				"policy":    b.Policy,
			})
			golden := filepath.Join("testdata", name+".golden.json")
			if *update {
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test -update)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s differs from the translation; run go test ./xds/translate -update and review the diff", golden)
			}
		})
	}
}

func TestBuildIsDeterministic(t *testing.T) {
	in := loadInput(t, "testdata/split.yaml")
	a, err := Build(in, testOpts)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Build(loadInput(t, "testdata/split.yaml"), testOpts)
	if err != nil {
		t.Fatal(err)
	}
	if a.Version != b.Version || a.Policy.ConfigVersion != a.Version {
		t.Fatalf("versions %s / %s / policy %s", a.Version, b.Version, a.Policy.ConfigVersion)
	}
	in.Set.Rollouts[0].Experiments[0].Allocation = 3000 // 30%, in hundredths
	e, err := Build(in, testOpts)
	if err != nil {
		t.Fatal(err)
	}
	if e.Version == a.Version {
		t.Fatal("an experiment change (policy only) kept the version")
	}
	in.Set.Rollouts[0].Traffic = map[string]int{"v7": 80, "v8": 20}
	c, err := Build(in, testOpts)
	if err != nil {
		t.Fatal(err)
	}
	if c.Version == a.Version {
		t.Fatal("a weight change kept the version")
	}
}

// TestBuildRefusesInvalid shows the validator gate: an input that slipped past rollout
// validation (no traffic at all) yields an empty weighted cluster, which Envoy's rules
// reject, and Build returns no snapshot.
func TestBuildRefusesInvalid(t *testing.T) {
	in := loadInput(t, "testdata/split.yaml")
	in.Set.Rollouts[0].Traffic = map[string]int{}
	b, err := Build(in, testOpts)
	if err == nil || b != nil {
		t.Fatalf("Build accepted an empty split: %v", b)
	}
	if !strings.Contains(strings.ToLower(err.Error()), "cluster") {
		t.Errorf("error does not name the field: %v", err)
	}
}

func TestDNSNamesResolveToEDS(t *testing.T) {
	in := loadInput(t, "testdata/pinning.yaml")
	if got := Hostnames(in.Set); len(got) != 1 || got[0] != "thumbs-v1.models.svc" {
		t.Fatalf("Hostnames = %v", got)
	}
	b1, err := Build(in, testOpts)
	if err != nil {
		t.Fatal(err)
	}
	in.Resolved["thumbs-v1.models.svc"] = []string{"10.1.0.9"}
	b2, err := Build(in, testOpts)
	if err != nil {
		t.Fatal(err)
	}
	if b1.Version == b2.Version {
		t.Fatal("new addresses for a name did not change the version")
	}
	// thumbs is protocol: grpc, so its endpoints are its gRPC cluster's.
	cla := b2.Edge.GetResources(resource.EndpointType)["thumbs_v1_grpc"]
	if !strings.Contains(protojson.Format(cla), "10.1.0.9") {
		t.Fatalf("EDS lacks the new address: %v", cla)
	}
}

// tlsCases are the TLS variants: options per case in testdata/tls/<case>.yaml.
var tlsCases = map[string]Options{
	// Only versions with tls: true; Envoy presents a client certificate; plain edge.
	"version": {EdgeAddress: "0.0.0.0:10000", SidecarAddress: "127.0.0.1:15001",
		UpstreamTLS: TLSFiles{CA: "/etc/patchbay/upstream/ca.crt", Cert: "/etc/patchbay/upstream/tls.crt", Key: "/etc/patchbay/upstream/tls.key"}},
	// Every version (--upstream-tls), CA only; edge TLS requiring client certificates.
	"all": {EdgeAddress: "0.0.0.0:10443", SidecarAddress: "127.0.0.1:15001", AllUpstreamTLS: true,
		UpstreamTLS: TLSFiles{CA: "/etc/patchbay/upstream/ca.crt"},
		EdgeTLS:     TLSFiles{Cert: "/etc/patchbay/edge/tls.crt", Key: "/etc/patchbay/edge/tls.key", CA: "/etc/patchbay/edge-clients/ca.crt"}},
}

func TestGoldenTLS(t *testing.T) {
	for name, opts := range tlsCases {
		t.Run(name, func(t *testing.T) {
			in := loadInput(t, filepath.Join("testdata", "tls", name+".yaml"))
			b, err := Build(in, opts)
			if err != nil {
				t.Fatalf("Build: %v", err)
			}
			edge, _ := Envoy(in, opts, Edge)
			sidecar, _ := Envoy(in, opts, Sidecar)
			grpc := GRPCWith(in, opts)
			got := normalize(t, map[string]any{
				"version":         b.Version,
				"edge_listeners":  edge[resource.ListenerType],
				"edge_secrets":    edge[resource.SecretType],
				"sidecar_secrets": sidecar[resource.SecretType],
				"clusters":        edge[resource.ClusterType],
				"grpc_clusters":   grpc[resource.ClusterType],
			})
			golden := filepath.Join("testdata", "tls", name+".golden.json")
			if *update {
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test -update)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s differs from the translation; run go test ./xds/translate -update and review the diff", golden)
			}
			// Sidecars never get the edge's certificate.
			for _, s := range sidecar[resource.SecretType] {
				if n := cachev3.GetResourceName(s); n == SecretEdgeCert || n == SecretEdgeClientCA {
					t.Errorf("sidecar got edge secret %s", n)
				}
			}
		})
	}
}

// TestTLSNeedsCA: a version asking for TLS, or --upstream-tls, without an upstream CA is a
// build error naming the version, as are half key pairs; nothing is served.
func TestTLSNeedsCA(t *testing.T) {
	for _, tc := range []struct {
		file string
		opts Options
		want string
	}{
		{"testdata/tls/version.yaml", testOpts, "model ranker version v7: tls: true needs the control plane's --upstream-tls-ca"},
		{"testdata/split.yaml", Options{EdgeAddress: "0.0.0.0:1", SidecarAddress: "127.0.0.1:2", AllUpstreamTLS: true}, "--upstream-tls needs --upstream-tls-ca"},
		{"testdata/split.yaml", Options{EdgeAddress: "0.0.0.0:1", SidecarAddress: "127.0.0.1:2", UpstreamTLS: TLSFiles{CA: "/ca", Cert: "/c"}}, "--upstream-tls-cert and --upstream-tls-key go together"},
		{"testdata/split.yaml", Options{EdgeAddress: "0.0.0.0:1", SidecarAddress: "127.0.0.1:2", EdgeTLS: TLSFiles{CA: "/ca"}}, "--edge-client-ca needs --edge-tls-cert"},
		{"testdata/split.yaml", Options{EdgeAddress: "0.0.0.0:1", SidecarAddress: "127.0.0.1:2", EdgeTLS: TLSFiles{Cert: "/c"}}, "--edge-tls-cert and --edge-tls-key go together"},
	} {
		b, err := Build(loadInput(t, tc.file), tc.opts)
		if err == nil || b != nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s %+v: Build = %v, %v; want error %q", tc.file, tc.opts, b, err, tc.want)
		}
	}
}
