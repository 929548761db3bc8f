package translate

import (
	"errors"
	"fmt"
	"path/filepath"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/patchbay-io/patchbay/xds/rollout"
)

// TLS on the data path.
//
// Envoy reads certificates through SDS secrets that the control plane serves over ADS and
// that hold only file paths (never key material), each with a watched_directory: Envoy
// watches the directory of an SDS-delivered secret's files and re-reads them when an entry
// there is moved (a Kubernetes Secret swapping its ..data link, cert-manager renewing), so
// rotation needs no push and no restart (envoy source/common/secret/sds_api.cc,
// SdsApi::onConfigUpdate sets the watches for any SDS source; api
// envoy/extensions/transport_sockets/tls/v3/common.proto: watched_directory "only applies
// when a TlsCertificate is delivered by SDS with references to filesystem paths").
//
// Why not sds_config with path_config_source: that file must be an SDS DiscoveryResponse
// on Envoy's disk, not a PEM file, and the control plane cannot write files on Envoy's
// machine; and why not inline tls_certificates with file names: those are read once when
// the cluster is built and never re-read (watched_directory does not apply to them).
const (
	SecretUpstreamCert = "patchbay_upstream_certificate" // Envoy's client certificate to model hosts
	SecretUpstreamCA   = "patchbay_upstream_ca"          // the CA model hosts' certificates chain to
	SecretEdgeCert     = "patchbay_edge_certificate"     // the edge listener's server certificate
	SecretEdgeClientCA = "patchbay_edge_client_ca"       // the CA edge clients' certificates chain to

	// ModelhostIdentity is the URI SAN Envoy and proxyless clients require of a model host.
	ModelhostIdentity = "spiffe://patchbay.local/role/modelhost"
	// CertProviderInstance is the certificate provider instance a proxyless gRPC client's
	// xDS bootstrap must define (grpc-go: "certificate_providers", e.g. the file_watcher
	// plugin) for TLS to model hosts (gRFC A29); it supplies both the client certificate
	// and the CA bundle.
	CertProviderInstance = "patchbay"

	tlsSocket = "envoy.transport_sockets.tls"
)

// CheckOptions reports TLS options that cannot give working TLS whatever the rollouts:
// --upstream-tls or a client certificate without a CA to verify hosts by, half a key
// pair, an edge client CA without an edge certificate. The command checks them at start.
func CheckOptions(opts Options) error {
	var errs []error
	u, e := opts.UpstreamTLS, opts.EdgeTLS
	if (u.Cert == "") != (u.Key == "") {
		errs = append(errs, errors.New("upstream TLS: --upstream-tls-cert and --upstream-tls-key go together"))
	}
	if u.CA == "" && opts.AllUpstreamTLS {
		errs = append(errs, errors.New("upstream TLS: --upstream-tls needs --upstream-tls-ca (the CA model hosts' certificates chain to)"))
	}
	if u.CA == "" && u.Cert != "" {
		errs = append(errs, errors.New("upstream TLS: --upstream-tls-cert needs --upstream-tls-ca"))
	}
	if (e.Cert == "") != (e.Key == "") {
		errs = append(errs, errors.New("edge TLS: --edge-tls-cert and --edge-tls-key go together"))
	}
	if e.CA != "" && e.Cert == "" {
		errs = append(errs, errors.New("edge TLS: --edge-client-ca needs --edge-tls-cert and --edge-tls-key"))
	}
	return errors.Join(errs...)
}

// checkTLS is CheckOptions plus the rollouts: a version with tls: true needs the upstream CA.
func checkTLS(set *rollout.Set, opts Options) error {
	errs := []error{CheckOptions(opts)}
	if opts.UpstreamTLS.CA == "" {
		for _, r := range set.Rollouts {
			for _, v := range r.Versions {
				if v.TLS {
					errs = append(errs, fmt.Errorf("model %s version %s: tls: true needs the control plane's --upstream-tls-ca (the CA model hosts' certificates chain to)", r.Model, v.Name))
				}
			}
		}
	}
	return errors.Join(errs...)
}

// upstreamTLS reports whether Envoy's (or a proxyless client's) cluster for v originates TLS.
func upstreamTLS(v rollout.Version, opts Options) bool {
	return opts.UpstreamTLS.CA != "" && (opts.AllUpstreamTLS || v.TLS)
}

func anyUpstreamTLS(set *rollout.Set, opts Options) bool {
	for _, r := range set.Rollouts {
		for _, v := range r.Versions {
			if upstreamTLS(v, opts) {
				return true
			}
		}
	}
	return false
}

// envoySecrets are the SDS secrets the Envoy resources refer to.
func envoySecrets(set *rollout.Set, opts Options, role Role) []types.Resource {
	var out []types.Resource
	if anyUpstreamTLS(set, opts) {
		out = append(out, caSecret(SecretUpstreamCA, opts.UpstreamTLS.CA))
		if opts.UpstreamTLS.Cert != "" {
			out = append(out, certSecret(SecretUpstreamCert, opts.UpstreamTLS))
		}
	}
	if role == Edge && opts.EdgeTLS.Cert != "" {
		out = append(out, certSecret(SecretEdgeCert, opts.EdgeTLS))
		if opts.EdgeTLS.CA != "" {
			out = append(out, caSecret(SecretEdgeClientCA, opts.EdgeTLS.CA))
		}
	}
	return out
}

func certSecret(name string, f TLSFiles) *tlsv3.Secret {
	return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
		CertificateChain: fileSource(f.Cert),
		PrivateKey:       fileSource(f.Key),
		WatchedDirectory: &corev3.WatchedDirectory{Path: filepath.Dir(f.Cert)},
	}}}
}

func caSecret(name, ca string) *tlsv3.Secret {
	return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
		TrustedCa:        fileSource(ca),
		WatchedDirectory: &corev3.WatchedDirectory{Path: filepath.Dir(ca)},
	}}}
}

func fileSource(path string) *corev3.DataSource {
	return &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: path}}
}

func sdsRef(name string) *tlsv3.SdsSecretConfig {
	return &tlsv3.SdsSecretConfig{Name: name, SdsConfig: adsSource()}
}

func uriSAN(id string) []*tlsv3.SubjectAltNameMatcher {
	return []*tlsv3.SubjectAltNameMatcher{{
		SanType: tlsv3.SubjectAltNameMatcher_URI,
		Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: id}},
	}}
}

// envoyUpstreamTLS puts an UpstreamTlsContext on an Envoy cluster to model hosts: the host
// must chain to the upstream CA and carry ModelhostIdentity; Envoy presents its client
// certificate when one is configured. gRPC servers require ALPN h2 over TLS.
func envoyUpstreamTLS(c *clusterv3.Cluster, protocol string, opts Options) {
	common := &tlsv3.CommonTlsContext{
		ValidationContextType: &tlsv3.CommonTlsContext_CombinedValidationContext{CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
			DefaultValidationContext:         &tlsv3.CertificateValidationContext{MatchTypedSubjectAltNames: uriSAN(ModelhostIdentity)},
			ValidationContextSdsSecretConfig: sdsRef(SecretUpstreamCA),
		}},
		AlpnProtocols: []string{"http/1.1"},
	}
	if protocol == rollout.GRPC {
		common.AlpnProtocols = []string{"h2"}
	}
	if opts.UpstreamTLS.Cert != "" {
		common.TlsCertificateSdsSecretConfigs = []*tlsv3.SdsSecretConfig{sdsRef(SecretUpstreamCert)}
	}
	c.TransportSocket = &corev3.TransportSocket{
		Name:       tlsSocket,
		ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(&tlsv3.UpstreamTlsContext{CommonTlsContext: common})},
	}
}

// edgeDownstreamTLS is the edge listener's DownstreamTlsContext: its certificate, and
// client certificates required and verified when a client CA is set. ALPN offers h2 first
// so gRPC clients can call through it.
func edgeDownstreamTLS(opts Options) *corev3.TransportSocket {
	common := &tlsv3.CommonTlsContext{
		TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{sdsRef(SecretEdgeCert)},
		AlpnProtocols:                  []string{"h2", "http/1.1"},
	}
	ctx := &tlsv3.DownstreamTlsContext{CommonTlsContext: common}
	if opts.EdgeTLS.CA != "" {
		common.ValidationContextType = &tlsv3.CommonTlsContext_ValidationContextSdsSecretConfig{ValidationContextSdsSecretConfig: sdsRef(SecretEdgeClientCA)}
		ctx.RequireClientCertificate = wrapperspb.Bool(true)
	}
	return &corev3.TransportSocket{Name: tlsSocket, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(ctx)}}
}

// grpcUpstreamTLS is the proxyless flavour: grpc-go accepts an UpstreamTlsContext only with
// certificate provider instances from its own bootstrap (gRFC A29; grpc-go
// internal/xds/xdsclient/xdsresource/unmarshal_cds.go). grpc-go checks SANs only through
// the deprecated match_subject_alt_names, which the validator gate refuses, so proxyless
// clients verify the host's chain to the CA but not its identity. A client that dials with xDS credentials then uses TLS with the
// "patchbay" instance's certificate and roots; one dialing with insecure credentials
// ignores this and stays plaintext.
func grpcUpstreamTLS(c *clusterv3.Cluster) {
	pi := &tlsv3.CertificateProviderPluginInstance{InstanceName: CertProviderInstance}
	common := &tlsv3.CommonTlsContext{
		TlsCertificateProviderInstance: pi,
		ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			CaCertificateProviderInstance: pi,
		}},
	}
	c.TransportSocket = &corev3.TransportSocket{
		Name:       tlsSocket,
		ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(&tlsv3.UpstreamTlsContext{CommonTlsContext: common})},
	}
}
