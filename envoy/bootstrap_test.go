package envoy

import (
	"bytes"
	"os"
	"regexp"
	"strings"
	"testing"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	downstreamv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/resource_monitors/downstream_connections/v3"
	fixedheapv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/resource_monitors/fixed_heap/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/google/go-cmp/cmp"
)

func mustParse(t testing.TB, role Role) *bootstrapv3.Bootstrap {
	t.Helper()
	data, err := File(role)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Parse(data)
	if err != nil {
		t.Fatalf("%s.yaml: %v", role, err)
	}
	return b
}

// TestBootstrapFiles is the Envoy-facing proof available without an Envoy binary:
// every shipped bootstrap decodes strictly into v3 Bootstrap and passes every
// validation rule, inside every Any, plus patchbay's cross-checks.
func TestBootstrapFiles(t *testing.T) {
	t.Parallel()
	for _, role := range Roles {
		t.Run(string(role), func(t *testing.T) {
			t.Parallel()
			b := mustParse(t, role)
			if err := Check(role, b); err != nil {
				t.Fatalf("%s.yaml fails its checks:\n%v", role, err)
			}
			// The other role's checks must reject it: the checks look at the role.
			other := Edge
			if role == Edge {
				other = Sidecar
			}
			if err := Check(other, b); err == nil {
				t.Errorf("%s.yaml passes the checks of role %s", role, other)
			}
		})
	}
}

func TestParseIsStrict(t *testing.T) {
	t.Parallel()
	edge, err := File(Edge)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, from, to, want string
	}{
		{"unknown top-level field", "layered_runtime:", "layerd_runtime:", "layerd_runtime"},
		{"unknown nested field", "connect_timeout: 1s", "connect_timeot: 1s", "connect_timeot"},
		{"unknown field inside an Any", "max_heap_size_bytes:", "max_heap_bytes:", "max_heap_bytes"},
		{"wrong type", "port_value: 18000", "port_value: eighteen-thousand", "eighteen-thousand"},
		{"bad duration", "connect_timeout: 1s", "connect_timeout: soon", "soon"},
		{"bad enum", "api_type: GRPC", "api_type: CARRIER_PIGEON", "CARRIER_PIGEON"},
		{"duplicate key", "  cluster: patchbay-edge\n", "  cluster: patchbay-edge\n  cluster: again\n", "already defined"},
		{"not yaml", "node:", "node: [", "yaml"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if !bytes.Contains(edge, []byte(tc.from)) {
				t.Fatalf("edge.yaml no longer contains %q: update the test", tc.from)
			}
			broken := bytes.Replace(edge, []byte(tc.from), []byte(tc.to), 1)
			_, err := Parse(broken)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Parse = %v, want an error mentioning %q", err, tc.want)
			}
		})
	}
}

// TestCheckCatchesBrokenBootstraps proves the checks can fail: each case breaks one
// rule in an otherwise valid edge bootstrap.
func TestCheckCatchesBrokenBootstraps(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		break_ func(t *testing.T, b *bootstrapv3.Bootstrap)
		want   string
	}{
		{"ext_proc cluster missing", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			removeCluster(b, ClusterExtProc)
		}, `"patchbay_extproc" is missing`},
		{"ext_proc cluster on HTTP/1.1", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			staticCluster(b, ClusterExtProc).TypedExtensionProtocolOptions = nil
		}, "cluster patchbay_extproc: no typed_extension_protocol_options"},
		{"ext_proc cluster without health checks", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			staticCluster(b, ClusterExtProc).HealthChecks = nil
		}, "cluster patchbay_extproc: no gRPC health check"},
		{"ext_proc cluster health-checked over HTTP", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			hc := staticCluster(b, ClusterExtProc).HealthChecks[0]
			hc.HealthChecker = &corev3.HealthCheck_HttpHealthCheck_{HttpHealthCheck: &corev3.HealthCheck_HttpHealthCheck{Path: "/readyz"}}
		}, "cluster patchbay_extproc: no gRPC health check"},
		{"ext_proc health check of another service", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			staticCluster(b, ClusterExtProc).HealthChecks[0].GetGrpcHealthCheck().ServiceName = "grpc.health.v1.Health"
		}, `gRPC health check of service "grpc.health.v1.Health"`},
		{"ext_proc health check timeout not below interval", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			hc := staticCluster(b, ClusterExtProc).HealthChecks[0]
			hc.Timeout = hc.Interval
		}, "must be below its interval"},
		{"ext_proc health check idle for 60 s before traffic", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			staticCluster(b, ClusterExtProc).HealthChecks[0].NoTrafficInterval = nil
		}, "no_traffic_interval"},
		{"ext_proc cluster without outlier detection", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			staticCluster(b, ClusterExtProc).OutlierDetection = nil
		}, "cluster patchbay_extproc: no outlier_detection"},
		{"ext_proc gateway failures not enforced", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			staticCluster(b, ClusterExtProc).OutlierDetection.EnforcingConsecutiveGatewayFailure = nil
		}, "enforce consecutive_gateway_failure"},
		{"ext_proc local-origin failures not split", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			staticCluster(b, ClusterExtProc).OutlierDetection.SplitExternalLocalOriginErrors = false
		}, "consecutive_local_origin_failure"},
		{"ext_proc ejection capped at Envoy's default 10%", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			staticCluster(b, ClusterExtProc).OutlierDetection.MaxEjectionPercent = nil
		}, "max_ejection_percent"},
		{"ext_proc cluster with panic routing", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			staticCluster(b, ClusterExtProc).CommonLbConfig = nil
		}, "healthy_panic_threshold must be 0"},
		{"xds cluster with auto protocol", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			c := staticCluster(b, ClusterXDS)
			c.TypedExtensionProtocolOptions[httpOptionsKey] = mustAny(t, &fixedheapv3.FixedHeapConfig{MaxHeapSizeBytes: 1})
		}, "cluster patchbay_xds: typed_extension_protocol_options"},
		{"trace collector cluster missing", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			removeCluster(b, ClusterOTel)
		}, `"patchbay_otel" is missing`},
		{"ADS names an unknown cluster", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			b.DynamicResources.AdsConfig.GrpcServices[0].GetEnvoyGrpc().ClusterName = "nope"
		}, `cluster "nope" is not a static cluster`},
		{"LDS not over ADS", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			b.DynamicResources.LdsConfig = &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_Path{Path: "/tmp/lds.yaml"}}
		}, "lds_config must use ads"},
		{"admin on every interface", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			b.Admin.Address.GetSocketAddress().Address = "0.0.0.0"
		}, "is not a loopback IP"},
		{"wrong role metadata", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			b.Node.Metadata.Fields[RoleKey].Kind = nil
		}, "node.metadata"},
		{"stats route to a missing cluster", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			removeCluster(b, ClusterAdmin)
		}, `routes to cluster "envoy_admin"`},
		{"rule broken inside an Any (connection cap 0)", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			b.OverloadManager.ResourceMonitors[1].ConfigType = typedConfig(mustAny(t, &downstreamv3.DownstreamConnectionsConfig{}))
		}, "<envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig>: invalid DownstreamConnectionsConfig.MaxActiveDownstreamConnections"},
		{"rule broken at the top (no cluster name)", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			staticCluster(b, ClusterOTel).Name = ""
		}, "Name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := mustParse(t, Edge)
			tc.break_(t, b)
			err := Check(Edge, b)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Check = %v\nwant an error containing %q", err, tc.want)
			}
		})
	}
}

func TestRender(t *testing.T) {
	t.Parallel()
	p := Params{
		NodeID: "edge-0", XDS: "patchbay-xds.ml.svc:18000", ExtProc: "patchbay-extproc.ml.svc:18080",
		OTel: "otel-collector.observability:4317", Admin: "127.0.0.1:19901", Stats: "0.0.0.0:19902",
		MaxHeapBytes: 512 << 20, MaxConnections: 1234,
	}
	b, err := Render(Edge, p)
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{ClusterXDS: "patchbay-xds.ml.svc", ClusterExtProc: "patchbay-extproc.ml.svc", ClusterOTel: "otel-collector.observability", ClusterAdmin: "127.0.0.1"} {
		if got := firstEndpoint(staticCluster(b, name)).GetSocketAddress().GetAddress(); got != want {
			t.Errorf("cluster %s endpoint = %q, want %q", name, got, want)
		}
	}
	if got := b.GetAdmin().GetAddress().GetSocketAddress().GetPortValue(); got != 19901 {
		t.Errorf("admin port = %d", got)
	}
	if got := b.GetNode().GetId(); got != "edge-0" {
		t.Errorf("node id = %q", got)
	}
	for _, l := range b.GetLayeredRuntime().GetLayers() {
		if l.GetName() == "static" {
			if got := l.GetStaticLayer().GetFields()[ListenerLimitKey(Edge)].GetNumberValue(); got != 987 {
				t.Errorf("listener connection limit = %v, want 987 (4/5 of 1234)", got)
			}
		}
	}
	heap := new(fixedheapv3.FixedHeapConfig)
	if err := b.GetOverloadManager().GetResourceMonitors()[0].GetTypedConfig().UnmarshalTo(heap); err != nil || heap.GetMaxHeapSizeBytes() != 512<<20 {
		t.Errorf("fixed heap = %v, %v", heap, err)
	}

	// The JSON Render's callers hand to Envoy parses back to the same bootstrap.
	js, err := MarshalJSON(b)
	if err != nil {
		t.Fatal(err)
	}
	back, err := Parse(js)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(b, back, protocmp.Transform()); diff != "" {
		t.Errorf("JSON round trip (-rendered +parsed):\n%s", diff)
	}

	// Without params, Render is the file.
	plain, err := Render(Sidecar, Params{})
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(plain, mustParse(t, Sidecar)) {
		t.Error("Render(Sidecar, Params{}) differs from sidecar.yaml")
	}
}

func TestRenderRejectsBadParams(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		p    Params
		want string
	}{
		{"no port", Params{XDS: "127.0.0.1"}, "missing port"},
		{"port zero", Params{ExtProc: "127.0.0.1:0"}, "port must be"},
		{"port too big", Params{OTel: "127.0.0.1:70000"}, "port must be"},
		{"empty host", Params{XDS: ":18000"}, "empty host"},
		{"public admin", Params{Admin: "0.0.0.0:9901"}, "not a loopback IP"},
		{"admin by name", Params{Admin: "localhost:9901"}, "not a loopback IP"},
		{"stats listener by name", Params{Stats: "localhost:9902"}, "not an IP"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := Render(Edge, tc.p)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Render = %v, want an error containing %q", err, tc.want)
			}
		})
	}
	if _, err := Render("ingress", Params{}); err == nil {
		t.Error(`Render("ingress") = nil error`)
	}
}

// TestEnvoyVersionMatchesProtos keeps the pinned Envoy and the protos the checks use
// on the same release: go-control-plane's envoy module is tagged per Envoy release.
func TestEnvoyVersionMatchesProtos(t *testing.T) {
	t.Parallel()
	pin, err := os.ReadFile(".envoy-version")
	if err != nil {
		t.Fatal(err)
	}
	version := strings.TrimSpace(string(pin))
	if !regexp.MustCompile(`^\d+\.\d+\.\d+$`).MatchString(version) {
		t.Fatalf(".envoy-version = %q, want MAJOR.MINOR.PATCH", version)
	}
	gomod, err := os.ReadFile("../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`github.com/envoyproxy/go-control-plane/envoy v(\d+\.\d+)\.\d+`).FindSubmatch(gomod)
	if m == nil {
		t.Fatal("go.mod does not require github.com/envoyproxy/go-control-plane/envoy")
	}
	if minor := string(m[1]); !strings.HasPrefix(version, minor+".") {
		t.Errorf("Envoy pinned at %s but the protos are go-control-plane/envoy v%s.x: move them together", version, minor)
	}
}

// FuzzParse: a bootstrap parser must return an error on any input, never panic.
func FuzzParse(f *testing.F) {
	for _, role := range Roles {
		for _, file := range []func(Role) ([]byte, error){File, MTLSFile} {
			data, err := file(role)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(data)
		}
	}
	f.Add([]byte("node: {id: x}\nadmin: [1, 2]"))
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := Parse(data)
		if err == nil {
			_ = CheckMTLS(Edge, b)
			_ = SDSPaths(b)
		}
	})
}

func removeCluster(b *bootstrapv3.Bootstrap, name string) {
	cs := b.StaticResources.Clusters[:0]
	for _, c := range b.StaticResources.Clusters {
		if c.GetName() != name {
			cs = append(cs, c)
		}
	}
	b.StaticResources.Clusters = cs
}

func mustAny(t testing.TB, m proto.Message) *anypb.Any {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestVersionIsEmbedded(t *testing.T) {
	t.Parallel()
	pin, err := os.ReadFile(".envoy-version")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := Version(), strings.TrimSpace(string(pin)); got != want || got == "" {
		t.Fatalf("Version() = %q, want %q", got, want)
	}
}

// TestFilesListenerLimit keeps the files' per-listener cap at 4/5 of the global one,
// the rule Render and the Helm chart apply.
func TestFilesListenerLimit(t *testing.T) {
	t.Parallel()
	for _, role := range Roles {
		b := mustParse(t, role)
		conn := new(downstreamv3.DownstreamConnectionsConfig)
		if err := b.GetOverloadManager().GetResourceMonitors()[1].GetTypedConfig().UnmarshalTo(conn); err != nil {
			t.Fatal(err)
		}
		var got float64
		for _, l := range b.GetLayeredRuntime().GetLayers() {
			if l.GetName() == "static" {
				got = l.GetStaticLayer().GetFields()[ListenerLimitKey(role)].GetNumberValue()
			}
		}
		if want := float64(conn.GetMaxActiveDownstreamConnections() * 4 / 5); got != want {
			t.Errorf("%s.yaml: %s = %v, want %v", role, ListenerLimitKey(role), got, want)
		}
	}
}

// TestPinnedEnvoyEverywhere: every place that fetches or runs Envoy names the pinned
// release, so bumping .envoy-version without them fails here.
func TestPinnedEnvoyEverywhere(t *testing.T) {
	t.Parallel()
	tag := "v" + Version()
	for file, pattern := range map[string]string{
		"../compose.yaml":                           `image: envoyproxy/envoy:(v[0-9.]+)`,
		"../charts/patchbay/values.yaml":            `tag: (v[0-9.]+)\s+# envoy/.envoy-version`,
		"../charts/patchbay/templates/_helpers.tpl": `default "envoyproxy/envoy:(v[0-9.]+)"`,
		"../charts/testdata/full-values.yaml":       `repository: envoyproxy/envoy, tag: (v[0-9.]+)`,
	} {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		m := regexp.MustCompile(pattern).FindSubmatch(data)
		if m == nil {
			t.Errorf("%s: no Envoy version found (pattern %s)", file, pattern)
			continue
		}
		if string(m[1]) != tag {
			t.Errorf("%s names Envoy %s, want %s (.envoy-version)", file, m[1], tag)
		}
	}
	wf, err := os.ReadFile("../.github/workflows/envoy-e2e.yml")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(wf, []byte("envoy/.envoy-version")) {
		t.Error("the e2e workflow does not install the version in envoy/.envoy-version")
	}
}
