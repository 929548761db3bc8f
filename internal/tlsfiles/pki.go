package tlsfiles

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"time"
)

// CA is a throwaway certificate authority for `patchbay up --tls` and for tests: it issues
// short-lived ECDSA P-256 certificates. Production certificates come from cert-manager or
// the operator's own PKI; nothing in the product path depends on this type.
type CA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

// NewCA makes a self-signed CA valid for the given time.
func NewCA(name string, validFor time.Duration) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("ca key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"patchbay"}},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(validFor),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("ca certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// CertPEM is the CA certificate, for the trust bundle.
func (ca *CA) CertPEM() []byte { return ca.pem }

// Leaf describes a certificate to issue. Hosts are DNS names or IP addresses (SANs); URI is
// an optional SPIFFE-style identity (spiffe://patchbay/role/edge) that the control plane
// maps to a role.
type Leaf struct {
	Name     string
	Hosts    []string
	URI      string
	ValidFor time.Duration // default 24h
}

// Issue returns a PEM certificate and PEM PKCS#8 key for l, usable for both server and
// client authentication.
func (ca *CA) Issue(l Leaf) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("leaf key: %w", err)
	}
	if l.ValidFor <= 0 {
		l.ValidFor = 24 * time.Hour
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: l.Name, Organization: []string{"patchbay"}},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(l.ValidFor),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	for _, h := range l.Hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	if l.URI != "" {
		u, err := url.Parse(l.URI)
		if err != nil {
			return nil, nil, fmt.Errorf("leaf uri %q: %w", l.URI, err)
		}
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, nil, fmt.Errorf("leaf certificate: %w", err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), nil
}

// WriteLeaf issues l and writes dir/<base>.crt, dir/<base>.key (mode 0600) and dir/ca.crt,
// returning the Files that name them (CA set to the bundle).
func (ca *CA) WriteLeaf(dir, base string, l Leaf) (Files, error) {
	c, k, err := ca.Issue(l)
	if err != nil {
		return Files{}, err
	}
	f := Files{
		Cert: filepath.Join(dir, base+".crt"),
		Key:  filepath.Join(dir, base+".key"),
		CA:   filepath.Join(dir, "ca.crt"),
	}
	if err := os.WriteFile(f.CA, ca.pem, 0o644); err != nil {
		return Files{}, err
	}
	if err := os.WriteFile(f.Cert, c, 0o644); err != nil {
		return Files{}, err
	}
	if err := os.WriteFile(f.Key, k, 0o600); err != nil {
		return Files{}, err
	}
	return f, nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return big.NewInt(time.Now().UnixNano())
	}
	return n
}
