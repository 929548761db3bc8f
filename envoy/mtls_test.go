package envoy

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"

	"github.com/google/go-cmp/cmp"
)

func mustParseMTLS(t testing.TB, role Role) *bootstrapv3.Bootstrap {
	t.Helper()
	data, err := MTLSFile(role)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Parse(data)
	if err != nil {
		t.Fatalf("%s-mtls.yaml: %v", role, err)
	}
	return b
}

// TestMTLSBootstrapFiles: each shipped mTLS bootstrap passes every validation rule and
// cross-check, has TLS on both gRPC clusters with the server's identity matched, names
// only SDS files that are shipped and valid, and differs from the plain file only by
// those transport sockets (so the two cannot drift).
func TestMTLSBootstrapFiles(t *testing.T) {
	t.Parallel()
	for _, role := range Roles {
		t.Run(string(role), func(t *testing.T) {
			t.Parallel()
			b := mustParseMTLS(t, role)
			if err := CheckMTLS(role, b); err != nil {
				t.Fatalf("%s-mtls.yaml fails its checks:\n%v", role, err)
			}
			other := map[Role]Role{Edge: Sidecar, Sidecar: Edge}[role]
			if err := CheckMTLS(other, b); err == nil {
				t.Errorf("%s-mtls.yaml passes the checks of role %s", role, other)
			}
			// The plain bootstrap is not an mTLS one.
			if err := CheckMTLS(role, mustParse(t, role)); err == nil || !strings.Contains(err.Error(), "no transport_socket") {
				t.Errorf("CheckMTLS(%s.yaml) = %v, want plain text refused", role, err)
			}
			for _, name := range []string{ClusterXDS, ClusterExtProc} {
				ctx, err := upstreamTLS(staticCluster(b, name))
				if err != nil {
					t.Fatalf("%s: %v", name, err)
				}
				sans := ctx.GetCommonTlsContext().GetCombinedValidationContext().GetDefaultValidationContext().GetMatchTypedSubjectAltNames()
				if len(sans) != 1 || sans[0].GetMatcher().GetExact() != ServerIdentity(name) {
					t.Errorf("%s matches server SANs %v, want exactly %s", name, sans, ServerIdentity(name))
				}
			}
			paths := SDSPaths(b)
			want := []string{DefaultSDSDir + "/" + SDSCertificateFile, DefaultSDSDir + "/" + SDSValidationFile}
			if !cmp.Equal(paths, want) {
				t.Errorf("SDS files = %v, want %v", paths, want)
			}
			for _, p := range paths {
				data, err := SDSFile(filepath.Base(p))
				if err != nil {
					t.Fatalf("%s names %s, which is not shipped: %v", role, p, err)
				}
				if err := CheckSDS(p, data); err != nil {
					t.Errorf("shipped %s: %v", p, err)
				}
			}
			// Without the transport sockets (and the header comment) it is the plain file.
			for _, c := range b.GetStaticResources().GetClusters() {
				c.TransportSocket = nil
			}
			if diff := cmp.Diff(mustParse(t, role), b, protocmp.Transform()); diff != "" {
				t.Errorf("%s-mtls.yaml drifted from %s.yaml beyond TLS (-plain +mtls):\n%s", role, role, diff)
			}
		})
	}
}

// TestShippedSDSFilesNamePEMsInTLSDir: the shipped SDS files read tls.crt, tls.key and ca.crt
// (a cert-manager Secret's keys) from DefaultTLSDir and watch it.
func TestShippedSDSFilesNamePEMsInTLSDir(t *testing.T) {
	t.Parallel()
	want := map[string]*tlsv3.Secret{}
	var err error
	want[SDSCertificateFile], want[SDSValidationFile], err = SDSSecrets(PEMFiles{
		Cert: DefaultTLSDir + "/tls.crt", Key: DefaultTLSDir + "/tls.key", CA: DefaultTLSDir + "/ca.crt",
	})
	if err != nil {
		t.Fatal(err)
	}
	for name, w := range want {
		data, err := SDSFile(name)
		if err != nil {
			t.Fatal(err)
		}
		got, err := ParseSDS(data)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 1 || !proto.Equal(got[0], w) {
			t.Errorf("sds/%s = %v, want %v", name, got, w)
		}
	}
	if _, err := SDSFile("../edge.yaml"); err == nil {
		t.Error("SDSFile reads outside sds/")
	}
}

// TestCheckMTLSCatchesBrokenTLS proves each mTLS rule can fail: each case breaks one thing
// in an otherwise valid edge-mtls bootstrap.
func TestCheckMTLSCatchesBrokenTLS(t *testing.T) {
	t.Parallel()
	edit := func(t *testing.T, b *bootstrapv3.Bootstrap, cluster string, f func(*tlsv3.UpstreamTlsContext)) {
		t.Helper()
		c := staticCluster(b, cluster)
		ctx, err := upstreamTLS(c)
		if err != nil {
			t.Fatal(err)
		}
		f(ctx)
		c.TransportSocket.ConfigType = &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(t, ctx)}
	}
	for _, tc := range []struct {
		name   string
		break_ func(t *testing.T, b *bootstrapv3.Bootstrap)
		want   string
	}{
		{"ext_proc in plain text", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			staticCluster(b, ClusterExtProc).TransportSocket = nil
		}, "cluster patchbay_extproc: no transport_socket"},
		{"xds in plain text", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			staticCluster(b, ClusterXDS).TransportSocket = nil
		}, "cluster patchbay_xds: no transport_socket"},
		{"server SAN not checked", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			edit(t, b, ClusterXDS, func(c *tlsv3.UpstreamTlsContext) {
				c.CommonTlsContext.GetCombinedValidationContext().DefaultValidationContext.MatchTypedSubjectAltNames = nil
			})
		}, "not matched exactly against spiffe://patchbay.local/role/xds"},
		{"ext_proc accepts the control plane's identity", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			edit(t, b, ClusterExtProc, func(c *tlsv3.UpstreamTlsContext) {
				c.CommonTlsContext.GetCombinedValidationContext().DefaultValidationContext.MatchTypedSubjectAltNames[0].Matcher =
					&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: Identity("xds")}}
			})
		}, "accepts another identity"},
		{"SAN by prefix", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			edit(t, b, ClusterXDS, func(c *tlsv3.UpstreamTlsContext) {
				c.CommonTlsContext.GetCombinedValidationContext().DefaultValidationContext.MatchTypedSubjectAltNames[0].Matcher =
					&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: IdentityPrefix}}
			})
		}, "accepts another identity"},
		{"no ALPN h2", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			edit(t, b, ClusterXDS, func(c *tlsv3.UpstreamTlsContext) { c.CommonTlsContext.AlpnProtocols = nil })
		}, "lacks h2"},
		{"certificate inline", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			edit(t, b, ClusterExtProc, func(c *tlsv3.UpstreamTlsContext) {
				c.CommonTlsContext.TlsCertificateSdsSecretConfigs = nil
				c.CommonTlsContext.TlsCertificates = []*tlsv3.TlsCertificate{{
					CertificateChain: &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: "/x.crt"}},
					PrivateKey:       &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: "/x.key"}},
				}}
			})
		}, "certificates inline"},
		{"no client certificate", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			edit(t, b, ClusterExtProc, func(c *tlsv3.UpstreamTlsContext) { c.CommonTlsContext.TlsCertificateSdsSecretConfigs = nil })
		}, "has 0 entries"},
		{"SDS not from a file", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			edit(t, b, ClusterXDS, func(c *tlsv3.UpstreamTlsContext) {
				c.CommonTlsContext.TlsCertificateSdsSecretConfigs[0].SdsConfig = &corev3.ConfigSource{
					ResourceApiVersion: corev3.ApiVersion_V3, ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
				}
			})
		}, "not a path_config_source"},
		{"SDS file not watched", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			edit(t, b, ClusterXDS, func(c *tlsv3.UpstreamTlsContext) {
				c.CommonTlsContext.GetCombinedValidationContext().ValidationContextSdsSecretConfig.GetSdsConfig().GetPathConfigSource().WatchedDirectory = nil
			})
		}, "no watched_directory"},
		{"watching another directory", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			edit(t, b, ClusterXDS, func(c *tlsv3.UpstreamTlsContext) {
				c.CommonTlsContext.TlsCertificateSdsSecretConfigs[0].GetSdsConfig().GetPathConfigSource().WatchedDirectory.Path = "/tmp"
			})
		}, "is not the directory of"},
		{"wrong secret name", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			edit(t, b, ClusterXDS, func(c *tlsv3.UpstreamTlsContext) {
				c.CommonTlsContext.TlsCertificateSdsSecretConfigs[0].Name = "other"
			})
		}, `secret name "other"`},
		{"no server verification", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			edit(t, b, ClusterExtProc, func(c *tlsv3.UpstreamTlsContext) { c.CommonTlsContext.ValidationContextType = nil })
		}, "no combined_validation_context"},
		{"not a TLS socket", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			staticCluster(b, ClusterXDS).TransportSocket.Name = "envoy.transport_sockets.raw_buffer"
		}, "transport_socket.name"},
		{"rule broken inside the TLS Any (empty SDS path)", func(t *testing.T, b *bootstrapv3.Bootstrap) {
			edit(t, b, ClusterXDS, func(c *tlsv3.UpstreamTlsContext) {
				c.CommonTlsContext.TlsCertificateSdsSecretConfigs[0].GetSdsConfig().GetPathConfigSource().Path = ""
			})
		}, "PathConfigSource.Path"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := mustParseMTLS(t, Edge)
			tc.break_(t, b)
			err := CheckMTLS(Edge, b)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("CheckMTLS = %v\nwant an error containing %q", err, tc.want)
			}
			// A TLS socket that is there but wrong fails the plain Check too: it is never
			// taken for plain text.
			if staticCluster(b, ClusterXDS).GetTransportSocket() != nil && staticCluster(b, ClusterExtProc).GetTransportSocket() != nil {
				if err := Check(Edge, b); err == nil {
					t.Error("Check passes a broken TLS cluster")
				}
			}
		})
	}
}

// TestRenderMTLS: Render with MTLS moves the SDS files into the given directory and the
// files WriteSDS puts there are the ones the bootstrap names, and valid.
func TestRenderMTLS(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	b, err := Render(Sidecar, Params{MTLS: true, SDSDir: dir, XDS: "xds.ns.svc:18000", ExtProc: "extproc.ns.svc:18080"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{filepath.Join(dir, SDSCertificateFile), filepath.Join(dir, SDSValidationFile)}
	if got := SDSPaths(b); !cmp.Equal(got, want) {
		t.Errorf("SDS files = %v, want %v", got, want)
	}
	pems := PEMFiles{Cert: filepath.Join(dir, "sidecar.crt"), Key: filepath.Join(dir, "sidecar.key"), CA: filepath.Join(dir, "ca.crt")}
	if err := WriteSDS(dir, pems); err != nil {
		t.Fatal(err)
	}
	for _, p := range SDSPaths(b) {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := CheckSDS(p, data); err != nil {
			t.Error(err)
		}
		for _, pem := range map[string][]string{SDSCertificateFile: {pems.Cert, pems.Key}, SDSValidationFile: {pems.CA}}[filepath.Base(p)] {
			if !strings.Contains(string(data), pem) {
				t.Errorf("%s does not name %s", p, pem)
			}
		}
	}
	// Default SDS directory: the file as shipped with addresses set.
	b, err = Render(Edge, Params{MTLS: true})
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(b, mustParseMTLS(t, Edge)) {
		t.Error("Render(Edge, {MTLS}) differs from edge-mtls.yaml")
	}
	for _, tc := range []struct {
		p    Params
		want string
	}{
		{Params{SDSDir: dir}, "only for the mTLS bootstrap"},
		{Params{MTLS: true, SDSDir: "sds"}, "not absolute"},
	} {
		if _, err := Render(Edge, tc.p); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Render(%+v) = %v, want %q", tc.p, err, tc.want)
		}
	}
	if err := WriteSDS(dir, PEMFiles{Cert: "/a.crt"}); err == nil {
		t.Error("WriteSDS without key and CA: no error")
	}
}

func TestCheckSDSRejects(t *testing.T) {
	t.Parallel()
	good, err := SDSFile(SDSCertificateFile)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, file, from, to, want string
	}{
		{"unknown field", SDSCertificateFile, "private_key:", "private_kye:", "private_kye"},
		{"not a Secret", SDSCertificateFile, "tls.v3.Secret\n    name: patchbay_tls_certificate\n    tls_certificate:\n      certificate_chain: {filename: /etc/patchbay/tls/tls.crt}\n      private_key: {filename: /etc/patchbay/tls/tls.key}\n      watched_directory: {path: /etc/patchbay/tls}\n",
			"tls.v3.SdsSecretConfig\n    name: patchbay_tls_certificate\n", "want a envoy.extensions.transport_sockets.tls.v3.Secret"},
		{"rule inside the Secret (empty filename)", SDSCertificateFile, "{filename: /etc/patchbay/tls/tls.key}", `{filename: ""}`, "Filename"},
		{"key inline", SDSCertificateFile, "{filename: /etc/patchbay/tls/tls.key}", `{inline_string: "PRIVATE"}`, "as filenames"},
		{"wrong secret in the file", SDSCertificateFile, "name: patchbay_tls_certificate", "name: other", "no secret named patchbay_tls_certificate"},
		{"unwatched", SDSCertificateFile, "      watched_directory: {path: /etc/patchbay/tls}\n", "", "no watched_directory"},
		{"not yaml", SDSCertificateFile, "resources:", "resources: [", "yaml"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if !strings.Contains(string(good), tc.from) {
				t.Fatalf("%s no longer contains %q", tc.file, tc.from)
			}
			err := CheckSDS(tc.file, []byte(strings.Replace(string(good), tc.from, tc.to, 1)))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("CheckSDS = %v, want an error containing %q", err, tc.want)
			}
		})
	}
	if err := CheckSDS("other.yaml", good); err == nil {
		t.Error("CheckSDS of an unknown file name: no error")
	}
	if err := CheckSDS(SDSValidationFile, good); err == nil {
		t.Error("the certificate file passes as the validation file")
	}
}

// FuzzParseSDS: the SDS file parser returns an error on any input, never panics.
func FuzzParseSDS(f *testing.F) {
	for _, name := range []string{SDSCertificateFile, SDSValidationFile} {
		data, err := SDSFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte(`{"resources":[{"@type":"type.googleapis.com/google.protobuf.Empty"}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		if _, err := ParseSDS(data); err == nil {
			_ = CheckSDS(SDSCertificateFile, data)
		}
	})
}
