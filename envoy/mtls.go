package envoy

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"slices"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/patchbay-io/patchbay/internal/envoyvalidate"
)

// Mutual TLS between Envoy and patchbay's gRPC servers.
//
// The mTLS bootstraps (<role>-mtls.yaml) put an UpstreamTlsContext on patchbay_xds and
// patchbay_extproc whose certificate and CA come through SDS from files
// (path_config_source with a watched_directory), not inline: Envoy re-reads them when the
// directory's entries are moved, which is how Kubernetes swaps a mounted Secret or
// ConfigMap and how cert-manager's renewals arrive, so rotation needs no restart. Each
// cluster checks the server's URI SAN, and the node presents a certificate whose URI SAN
// is Identity(role); the control plane takes the node's role from it.
const (
	// IdentityPrefix starts every patchbay identity (a URI SAN): IdentityPrefix + role.
	IdentityPrefix = "spiffe://patchbay.local/role/"

	SecretCertificate = "patchbay_tls_certificate" // SDS secret: this node's certificate and key
	SecretTrustedCA   = "patchbay_trusted_ca"      // SDS secret: the CA bundle servers chain to

	SDSCertificateFile = "tls-certificate.yaml"    // SDS file holding SecretCertificate
	SDSValidationFile  = "validation-context.yaml" // SDS file holding SecretTrustedCA

	DefaultSDSDir = "/etc/patchbay/sds" // where the shipped mTLS bootstraps read the SDS files
	DefaultTLSDir = "/etc/patchbay/tls" // where the shipped SDS files read tls.crt, tls.key, ca.crt

	tlsSocketName = "envoy.transport_sockets.tls"
)

// Identity is the URI SAN a certificate carries for a role ("edge", "sidecar", "grpc",
// "extproc", "modelhost", "operator", and "xds" for the control plane's server
// certificate).
func Identity(role string) string { return IdentityPrefix + role }

// serverIdentity is the URI SAN each mTLS cluster requires of its server.
var serverIdentity = map[string]string{
	ClusterXDS:     Identity("xds"),
	ClusterExtProc: Identity("extproc"),
}

// ServerIdentity is the URI SAN Envoy requires of the server behind a static cluster
// (ClusterXDS or ClusterExtProc) in the mTLS bootstraps; "" for other clusters.
func ServerIdentity(cluster string) string { return serverIdentity[cluster] }

// SDSFile returns a shipped SDS file (SDSCertificateFile or SDSValidationFile), which names
// the PEM files in DefaultTLSDir.
func SDSFile(name string) ([]byte, error) {
	if name != SDSCertificateFile && name != SDSValidationFile {
		return nil, fmt.Errorf("envoy sds: no shipped file %q", name)
	}
	return files.ReadFile(path.Join("sds", name))
}

// CheckMTLS is Check, and requires both patchbay_xds and patchbay_extproc to use TLS:
// UpstreamTlsContext with ALPN h2 (gRPC servers refuse TLS without it), the node's
// certificate and the CA bundle through SDS from files with a watched directory (no
// inline key material, which could not rotate), and the server's URI SAN matched
// exactly (ServerIdentity).
func CheckMTLS(role Role, b *bootstrapv3.Bootstrap) error {
	errs := []error{Check(role, b)}
	for _, name := range []string{ClusterXDS, ClusterExtProc} {
		c := staticCluster(b, name)
		if c != nil && c.GetTransportSocket() == nil {
			errs = append(errs, fmt.Errorf("cluster %s: no transport_socket: plain text to the server in an mTLS bootstrap", name))
		}
	}
	return errors.Join(errs...)
}

// upstreamTLS unpacks a cluster's TLS transport socket.
func upstreamTLS(c *clusterv3.Cluster) (*tlsv3.UpstreamTlsContext, error) {
	ts := c.GetTransportSocket()
	if ts.GetName() != tlsSocketName {
		return nil, fmt.Errorf("transport_socket.name = %q, want %s", ts.GetName(), tlsSocketName)
	}
	ctx := new(tlsv3.UpstreamTlsContext)
	if ts.GetTypedConfig() == nil || ts.GetTypedConfig().UnmarshalTo(ctx) != nil {
		return nil, fmt.Errorf("transport_socket.typed_config is not an %s", ctx.ProtoReflect().Descriptor().FullName())
	}
	return ctx, nil
}

func checkUpstreamMTLS(c *clusterv3.Cluster, wantSAN string) error {
	ctx, err := upstreamTLS(c)
	if err != nil {
		return err
	}
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	ctc := ctx.GetCommonTlsContext()
	if !slices.Contains(ctc.GetAlpnProtocols(), "h2") {
		bad("common_tls_context.alpn_protocols lacks h2: gRPC servers refuse TLS without ALPN h2")
	}
	if len(ctc.GetTlsCertificates()) > 0 || len(ctc.GetTlsCertificateProviderInstance().GetInstanceName()) > 0 {
		bad("common_tls_context: certificates inline; give them through tls_certificate_sds_secret_configs so they rotate")
	}
	sds := ctc.GetTlsCertificateSdsSecretConfigs()
	if len(sds) != 1 {
		bad("common_tls_context.tls_certificate_sds_secret_configs has %d entries, want 1 (the node's client certificate)", len(sds))
	}
	for _, s := range sds {
		if err := checkFileSDS(s, SecretCertificate); err != nil {
			bad("tls_certificate_sds_secret_configs: %v", err)
		}
	}
	cvc := ctc.GetCombinedValidationContext()
	if cvc == nil {
		bad("common_tls_context: no combined_validation_context: the server would not be verified by name")
	} else {
		if err := checkFileSDS(cvc.GetValidationContextSdsSecretConfig(), SecretTrustedCA); err != nil {
			bad("combined_validation_context.validation_context_sds_secret_config: %v", err)
		}
		dvc := cvc.GetDefaultValidationContext()
		if dvc.GetTrustedCa() != nil {
			bad("default_validation_context.trusted_ca is inline; the CA comes through SDS")
		}
		ok := false
		for _, m := range dvc.GetMatchTypedSubjectAltNames() {
			if m.GetSanType() == tlsv3.SubjectAltNameMatcher_URI && m.GetMatcher().GetExact() == wantSAN && !m.GetMatcher().GetIgnoreCase() {
				ok = true
			} else {
				bad("default_validation_context.match_typed_subject_alt_names: %v %v accepts another identity than %s", m.GetSanType(), m.GetMatcher(), wantSAN)
			}
		}
		if !ok {
			bad("default_validation_context: the server's URI SAN is not matched exactly against %s: any certificate of the CA would do", wantSAN)
		}
	}
	if ctc.GetValidationContext() != nil || ctc.GetValidationContextSdsSecretConfig() != nil {
		bad("common_tls_context: validation context set twice (use combined_validation_context only)")
	}
	return errors.Join(errs...)
}

// checkFileSDS requires an SDS secret config read from a file in a watched directory.
func checkFileSDS(s *tlsv3.SdsSecretConfig, wantName string) error {
	if s.GetName() != wantName {
		return fmt.Errorf("secret name %q, want %q", s.GetName(), wantName)
	}
	pcs := s.GetSdsConfig().GetPathConfigSource()
	if pcs == nil {
		return fmt.Errorf("secret %s: sds_config is not a path_config_source (files): want certificates from files that rotate", wantName)
	}
	if pcs.GetWatchedDirectory().GetPath() == "" {
		return fmt.Errorf("secret %s: path_config_source has no watched_directory: a Kubernetes volume update (a symlink swap) would go unseen", wantName)
	}
	if d := filepath.Dir(pcs.GetPath()); d != filepath.Clean(pcs.GetWatchedDirectory().GetPath()) {
		return fmt.Errorf("secret %s: watched_directory %q is not the directory of %q", wantName, pcs.GetWatchedDirectory().GetPath(), pcs.GetPath())
	}
	if s.GetSdsConfig().GetResourceApiVersion() != corev3.ApiVersion_V3 {
		return fmt.Errorf("secret %s: sds_config.resource_api_version must be V3", wantName)
	}
	return nil
}

// SDSPaths lists the SDS files (path_config_source paths) the bootstrap's TLS clusters
// read, each once, in order.
func SDSPaths(b *bootstrapv3.Bootstrap) []string {
	var out []string
	add := func(s *tlsv3.SdsSecretConfig) {
		if p := s.GetSdsConfig().GetPathConfigSource().GetPath(); p != "" && !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	for _, c := range b.GetStaticResources().GetClusters() {
		if c.GetTransportSocket() == nil {
			continue
		}
		ctx, err := upstreamTLS(c)
		if err != nil {
			continue
		}
		for _, s := range ctx.GetCommonTlsContext().GetTlsCertificateSdsSecretConfigs() {
			add(s)
		}
		add(ctx.GetCommonTlsContext().GetCombinedValidationContext().GetValidationContextSdsSecretConfig())
	}
	return out
}

// setSDSDir moves every SDS file the TLS clusters read into dir (same base names), and
// watches dir.
func setSDSDir(b *bootstrapv3.Bootstrap, dir string) error {
	if !filepath.IsAbs(dir) {
		return fmt.Errorf("sds directory %q is not absolute (Envoy resolves it from its own working directory)", dir)
	}
	move := func(s *tlsv3.SdsSecretConfig) {
		if pcs := s.GetSdsConfig().GetPathConfigSource(); pcs != nil {
			pcs.Path = filepath.Join(dir, filepath.Base(pcs.GetPath()))
			pcs.WatchedDirectory = &corev3.WatchedDirectory{Path: dir}
		}
	}
	for _, c := range b.GetStaticResources().GetClusters() {
		if c.GetTransportSocket() == nil {
			continue
		}
		ctx, err := upstreamTLS(c)
		if err != nil {
			return fmt.Errorf("cluster %s: %w", c.GetName(), err)
		}
		for _, s := range ctx.GetCommonTlsContext().GetTlsCertificateSdsSecretConfigs() {
			move(s)
		}
		move(ctx.GetCommonTlsContext().GetCombinedValidationContext().GetValidationContextSdsSecretConfig())
		a, err := anypb.New(ctx)
		if err != nil {
			return err
		}
		c.GetTransportSocket().ConfigType = &corev3.TransportSocket_TypedConfig{TypedConfig: a}
	}
	return nil
}

// PEMFiles name the PEM files an SDS file points Envoy at. WatchDir is the directory
// Envoy watches for moves to re-read them (default: the directory of Cert, or of CA).
type PEMFiles struct {
	Cert, Key, CA string
	WatchDir      string
}

// SDSSecrets returns the two SDS secrets for f: the node's certificate
// (SecretCertificate) and the CA bundle (SecretTrustedCA).
func SDSSecrets(f PEMFiles) (cert, ca *tlsv3.Secret, err error) {
	if f.Cert == "" || f.Key == "" || f.CA == "" {
		return nil, nil, errors.New("envoy sds: certificate, key and CA files are all needed for mTLS")
	}
	watch := f.WatchDir
	if watch == "" {
		watch = filepath.Dir(f.Cert)
	}
	file := func(p string) *corev3.DataSource {
		return &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: p}}
	}
	cert = &tlsv3.Secret{Name: SecretCertificate, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
		CertificateChain: file(f.Cert), PrivateKey: file(f.Key), WatchedDirectory: &corev3.WatchedDirectory{Path: watch},
	}}}
	caWatch := f.WatchDir
	if caWatch == "" {
		caWatch = filepath.Dir(f.CA)
	}
	ca = &tlsv3.Secret{Name: SecretTrustedCA, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
		TrustedCa: file(f.CA), WatchedDirectory: &corev3.WatchedDirectory{Path: caWatch},
	}}}
	for _, s := range []*tlsv3.Secret{cert, ca} {
		if err := envoyvalidate.Validate(s); err != nil {
			return nil, nil, fmt.Errorf("envoy sds: %w", err)
		}
	}
	return cert, ca, nil
}

// MarshalSDS encodes secrets as an SDS resource file (a DiscoveryResponse, JSON, which
// Envoy's YAML loader reads too).
func MarshalSDS(secrets ...*tlsv3.Secret) ([]byte, error) {
	resp := &discoveryv3.DiscoveryResponse{}
	for _, s := range secrets {
		a, err := anypb.New(s)
		if err != nil {
			return nil, err
		}
		resp.Resources = append(resp.Resources, a)
	}
	return protojson.MarshalOptions{Multiline: true, UseProtoNames: true}.Marshal(resp)
}

// WriteSDS writes SDSCertificateFile and SDSValidationFile into dir for f, atomically
// (write then rename, so a watching Envoy never reads half a file).
func WriteSDS(dir string, f PEMFiles) error {
	cert, ca, err := SDSSecrets(f)
	if err != nil {
		return err
	}
	for name, s := range map[string]*tlsv3.Secret{SDSCertificateFile: cert, SDSValidationFile: ca} {
		data, err := MarshalSDS(s)
		if err != nil {
			return err
		}
		tmp := filepath.Join(dir, "."+name+".tmp")
		if err := os.WriteFile(tmp, data, 0o644); err != nil {
			return fmt.Errorf("envoy sds: %w", err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
			return fmt.Errorf("envoy sds: %w", err)
		}
	}
	return nil
}

// ParseSDS decodes an SDS resource file strictly (YAML or JSON DiscoveryResponse, unknown
// fields are errors) and validates every resource as an
// envoy.extensions.transport_sockets.tls.v3.Secret, inside every Any.
func ParseSDS(data []byte) ([]*tlsv3.Secret, error) {
	var doc any
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("envoy sds: yaml: %w", err)
	}
	js, err := json.Marshal(doc)
	if err != nil {
		return nil, fmt.Errorf("envoy sds: yaml to json: %w", err)
	}
	resp := new(discoveryv3.DiscoveryResponse)
	if err := protojson.Unmarshal(js, resp); err != nil {
		return nil, fmt.Errorf("envoy sds: %w", err)
	}
	if len(resp.GetResources()) == 0 {
		return nil, errors.New("envoy sds: no resources")
	}
	var out []*tlsv3.Secret
	var errs []error
	for i, a := range resp.GetResources() {
		s := new(tlsv3.Secret)
		if err := a.UnmarshalTo(s); err != nil {
			errs = append(errs, fmt.Errorf("envoy sds: resources[%d] is %s, want a %s", i, a.GetTypeUrl(), s.ProtoReflect().Descriptor().FullName()))
			continue
		}
		if err := envoyvalidate.Validate(s); err != nil {
			errs = append(errs, fmt.Errorf("envoy sds: resources[%d]: %w", i, err))
			continue
		}
		out = append(out, s)
	}
	return out, errors.Join(errs...)
}

// CheckSDS checks an SDS file a bootstrap names: it parses (ParseSDS), and holds the
// secret the file is for, with its key material in files (so it rotates) and a watched
// directory: SDSCertificateFile a tls_certificate with certificate_chain and private_key,
// SDSValidationFile a validation_context with trusted_ca.
func CheckSDS(name string, data []byte) error {
	secrets, err := ParseSDS(data)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	want := map[string]string{SDSCertificateFile: SecretCertificate, SDSValidationFile: SecretTrustedCA}[filepath.Base(name)]
	if want == "" {
		return fmt.Errorf("%s: not an SDS file patchbay's bootstraps name (%s or %s)", name, SDSCertificateFile, SDSValidationFile)
	}
	var errs []error
	found := false
	for _, s := range secrets {
		if s.GetName() != want {
			continue
		}
		found = true
		switch want {
		case SecretCertificate:
			tc := s.GetTlsCertificate()
			if tc.GetCertificateChain().GetFilename() == "" || tc.GetPrivateKey().GetFilename() == "" {
				errs = append(errs, fmt.Errorf("%s: secret %s: want tls_certificate with certificate_chain and private_key as filenames", name, want))
			}
			if tc.GetWatchedDirectory().GetPath() == "" {
				errs = append(errs, fmt.Errorf("%s: secret %s: no watched_directory", name, want))
			}
		case SecretTrustedCA:
			vc := s.GetValidationContext()
			if vc.GetTrustedCa().GetFilename() == "" {
				errs = append(errs, fmt.Errorf("%s: secret %s: want validation_context with trusted_ca as a filename", name, want))
			}
			if vc.GetWatchedDirectory().GetPath() == "" {
				errs = append(errs, fmt.Errorf("%s: secret %s: no watched_directory", name, want))
			}
		}
	}
	if !found {
		errs = append(errs, fmt.Errorf("%s: no secret named %s", name, want))
	}
	return errors.Join(errs...)
}
