package envoymodel

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
)

// secretNames lists the SDS secrets (sds_config: ads) the clusters' and the listener's TLS
// transport sockets name, sorted.
func secretNames(s *state) []string {
	seen := map[string]bool{}
	add := func(c *tlsv3.CommonTlsContext) {
		for _, r := range c.GetTlsCertificateSdsSecretConfigs() {
			seen[r.GetName()] = true
		}
		if r := c.GetValidationContextSdsSecretConfig(); r != nil {
			seen[r.GetName()] = true
		}
		if r := c.GetCombinedValidationContext().GetValidationContextSdsSecretConfig(); r != nil {
			seen[r.GetName()] = true
		}
	}
	for _, c := range s.clusters {
		u := &tlsv3.UpstreamTlsContext{}
		if c.GetTransportSocket().GetTypedConfig().UnmarshalTo(u) == nil {
			add(u.GetCommonTlsContext())
		}
	}
	for _, fc := range s.listener.GetFilterChains() {
		d := &tlsv3.DownstreamTlsContext{}
		if fc.GetTransportSocket().GetTypedConfig().UnmarshalTo(d) == nil {
			add(d.GetCommonTlsContext())
		}
	}
	out := make([]string, 0, len(seen))
	for n := range seen {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// upstreamTLSConfig builds the client side of a cluster's UpstreamTlsContext, for the subset
// patchbay emits: the client certificate and the CA from SDS secrets holding file names
// (read now, so a rotated file is used by the next connection, as Envoy's watched_directory
// makes it), URI SAN matchers, ALPN. As on Envoy without sni/auto_sni_san_validation, the
// host name is not checked: the chain must reach the CA and a SAN matcher must match
// (envoy source/common/tls/cert_validator/default_validator.cc). A secret that has not
// arrived fails the request (Envoy keeps such a cluster warming). Anything else is refused.
func (p *Proxy) upstreamTLSConfig(c *clusterv3.Cluster) (*tls.Config, error) {
	ts := c.GetTransportSocket()
	if ts.GetName() != "envoy.transport_sockets.tls" {
		return nil, fmt.Errorf("cluster %q: transport_socket %q is not modelled", c.GetName(), ts.GetName())
	}
	u := &tlsv3.UpstreamTlsContext{}
	if err := ts.GetTypedConfig().UnmarshalTo(u); err != nil {
		return nil, fmt.Errorf("cluster %q: %w", c.GetName(), err)
	}
	common := u.GetCommonTlsContext()
	if len(common.GetTlsCertificates()) > 0 || common.GetValidationContext() != nil || u.GetSni() != "" || u.GetAutoSniSanValidation() {
		return nil, fmt.Errorf("cluster %q: TLS settings beyond SDS secrets, SAN matchers and ALPN are not modelled", c.GetName())
	}
	secrets := p.state.Load().secrets
	secret := func(name string) (*tlsv3.Secret, error) {
		if s := secrets[name]; s != nil {
			return s, nil
		}
		return nil, fmt.Errorf("cluster %q: SDS secret %q has not arrived", c.GetName(), name)
	}
	cfg := &tls.Config{NextProtos: common.GetAlpnProtocols(), MinVersion: tls.VersionTLS12}
	for _, ref := range common.GetTlsCertificateSdsSecretConfigs() {
		s, err := secret(ref.GetName())
		if err != nil {
			return nil, err
		}
		tc := s.GetTlsCertificate()
		kp, err := tls.LoadX509KeyPair(tc.GetCertificateChain().GetFilename(), tc.GetPrivateKey().GetFilename())
		if err != nil {
			return nil, fmt.Errorf("cluster %q: secret %q: %w", c.GetName(), ref.GetName(), err)
		}
		cfg.Certificates = append(cfg.Certificates, kp)
	}
	cvc := common.GetCombinedValidationContext()
	if cvc == nil {
		return nil, fmt.Errorf("cluster %q: no validation context: Envoy would not verify the host, and patchbay never emits that", c.GetName())
	}
	s, err := secret(cvc.GetValidationContextSdsSecretConfig().GetName())
	if err != nil {
		return nil, err
	}
	pemCA, err := os.ReadFile(s.GetValidationContext().GetTrustedCa().GetFilename())
	if err != nil {
		return nil, fmt.Errorf("cluster %q: %w", c.GetName(), err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pemCA) {
		return nil, fmt.Errorf("cluster %q: no certificate in the trusted CA file", c.GetName())
	}
	var uris []string
	for _, m := range cvc.GetDefaultValidationContext().GetMatchTypedSubjectAltNames() {
		ex, ok := m.GetMatcher().GetMatchPattern().(*matcherv3.StringMatcher_Exact)
		if m.GetSanType() != tlsv3.SubjectAltNameMatcher_URI || !ok {
			return nil, fmt.Errorf("cluster %q: SAN matcher %v is not modelled", c.GetName(), m)
		}
		uris = append(uris, ex.Exact)
	}
	cfg.InsecureSkipVerify = true // verified below: chain to the CA, then the SAN matchers
	cfg.VerifyPeerCertificate = func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) == 0 {
			return errors.New("no server certificate")
		}
		certs := make([]*x509.Certificate, len(raw))
		for i, b := range raw {
			crt, err := x509.ParseCertificate(b)
			if err != nil {
				return err
			}
			certs[i] = crt
		}
		inter := x509.NewCertPool()
		for _, crt := range certs[1:] {
			inter.AddCert(crt)
		}
		if _, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			return err
		}
		if len(uris) == 0 {
			return nil
		}
		for _, u := range certs[0].URIs {
			for _, want := range uris {
				if u.String() == want {
					return nil
				}
			}
		}
		return fmt.Errorf("server certificate has none of the URI SANs %v", uris)
	}
	return cfg, nil
}

// Listener wraps lis as Envoy's listener: when the listener config's filter chain has a TLS
// transport socket (DownstreamTlsContext with SDS secrets naming files), each connection is
// a TLS server connection with its certificate, its ALPN list and, with
// require_client_certificate, client certificates required and verified against the
// validation context's CA; otherwise connections stay plaintext. Files are read at every
// handshake, as Envoy re-reads them when they change.
func (p *Proxy) Listener(lis net.Listener) net.Listener { return &tlsListener{Listener: lis, p: p} }

type tlsListener struct {
	net.Listener
	p *Proxy
}

func (l *tlsListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		s := l.p.state.Load()
		if s.listener == nil || len(s.listener.GetFilterChains()) == 0 || s.listener.GetFilterChains()[0].GetTransportSocket() == nil {
			return c, nil
		}
		cfg, err := downstreamTLSConfig(s)
		if err != nil {
			c.Close() // Envoy would not have the listener at all
			continue
		}
		return tls.Server(c, cfg), nil
	}
}

func downstreamTLSConfig(s *state) (*tls.Config, error) {
	ts := s.listener.GetFilterChains()[0].GetTransportSocket()
	d := &tlsv3.DownstreamTlsContext{}
	if ts.GetName() != "envoy.transport_sockets.tls" || ts.GetTypedConfig().UnmarshalTo(d) != nil {
		return nil, fmt.Errorf("listener transport socket %q is not modelled", ts.GetName())
	}
	common := d.GetCommonTlsContext()
	refs := common.GetTlsCertificateSdsSecretConfigs()
	if len(refs) != 1 || len(common.GetTlsCertificates()) > 0 {
		return nil, errors.New("listener: only one SDS certificate is modelled")
	}
	cert := s.secrets[refs[0].GetName()].GetTlsCertificate()
	if cert == nil {
		return nil, fmt.Errorf("listener: SDS secret %q has not arrived", refs[0].GetName())
	}
	kp, err := tls.LoadX509KeyPair(cert.GetCertificateChain().GetFilename(), cert.GetPrivateKey().GetFilename())
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{kp}, NextProtos: common.GetAlpnProtocols(), MinVersion: tls.VersionTLS12}
	if ref := common.GetValidationContextSdsSecretConfig(); ref != nil {
		vc := s.secrets[ref.GetName()].GetValidationContext()
		if vc == nil {
			return nil, fmt.Errorf("listener: SDS secret %q has not arrived", ref.GetName())
		}
		pemCA, err := os.ReadFile(vc.GetTrustedCa().GetFilename())
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pemCA) {
			return nil, errors.New("listener: no certificate in the client CA file")
		}
		cfg.ClientCAs = pool
		cfg.ClientAuth = tls.VerifyClientCertIfGiven
		if d.GetRequireClientCertificate().GetValue() {
			cfg.ClientAuth = tls.RequireAndVerifyClientCert
		}
	}
	return cfg, nil
}
