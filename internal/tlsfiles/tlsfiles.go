// Package tlsfiles serves and dials TLS from PEM files that are re-read when they change,
// so cert-manager or a Kubernetes Secret can rotate certificates without a restart.
//
// A Source holds one certificate, its key and an optional CA bundle. Servers take
// ServerConfig (the CA, if given, verifies client certificates, which are then required);
// clients take ClientConfig (the CA verifies the server; the certificate, if given, is
// presented). Files are checked at most once per CheckInterval, on a handshake; a file
// caught half-written, or any other bad read, keeps the last good material and is reported
// through OnError, so a rotation in progress never breaks serving.
package tlsfiles

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Files names PEM files. Cert and Key go together; CA is a bundle of trusted roots: for a
// server, the roots that client certificates must chain to (given: client certificates are
// required); for a client, the roots the server's certificate must chain to.
type Files struct {
	Cert, Key, CA string
}

// Enabled reports whether any file is named.
func (f Files) Enabled() bool { return f.Cert != "" || f.Key != "" || f.CA != "" }

// Options tune a Source. The zero value is usable.
type Options struct {
	// CheckInterval is the least time between two looks at the files (default 1s).
	CheckInterval time.Duration
	// OnError is told of a reload that failed; the last good material stays in use.
	OnError func(error)
	// OnReload is told after new material was loaded.
	OnReload func()
}

// Source is a set of TLS files kept current. It is safe for concurrent use.
type Source struct {
	files Files
	opts  Options

	cur       atomic.Pointer[material]
	nextCheck atomic.Int64 // unix nanos
	mu        sync.Mutex   // serialises reloads
}

type material struct {
	cert  *tls.Certificate // nil when no Cert/Key
	pool  *x509.CertPool   // nil when no CA
	stamp string           // identity of the files' current contents on disk
}

// Load reads the files once and returns a Source that re-reads them when they change.
// Cert and Key must be given together. An unreadable or invalid file is an error here.
func Load(f Files, o Options) (*Source, error) {
	if (f.Cert == "") != (f.Key == "") {
		return nil, fmt.Errorf("tls: a certificate and its key go together (cert %q, key %q)", f.Cert, f.Key)
	}
	if !f.Enabled() {
		return nil, errors.New("tls: no files named")
	}
	if o.CheckInterval <= 0 {
		o.CheckInterval = time.Second
	}
	s := &Source{files: f, opts: o}
	m, err := s.read()
	if err != nil {
		return nil, err
	}
	s.cur.Store(m)
	s.nextCheck.Store(time.Now().Add(o.CheckInterval).UnixNano())
	return s, nil
}

// stamp identifies the files' contents cheaply: path, size and modification time of each,
// after following symlinks (a Kubernetes Secret volume swaps a symlinked directory).
func (s *Source) stamp() (string, error) {
	var b bytes.Buffer
	for _, p := range []string{s.files.Cert, s.files.Key, s.files.CA} {
		if p == "" {
			continue
		}
		st, err := os.Stat(p)
		if err != nil {
			return "", fmt.Errorf("tls: %w", err)
		}
		fmt.Fprintf(&b, "%s|%d|%d;", p, st.Size(), st.ModTime().UnixNano())
	}
	return b.String(), nil
}

func (s *Source) read() (*material, error) {
	stamp, err := s.stamp()
	if err != nil {
		return nil, err
	}
	m := &material{stamp: stamp}
	if s.files.Cert != "" {
		c, err := tls.LoadX509KeyPair(s.files.Cert, s.files.Key)
		if err != nil {
			return nil, fmt.Errorf("tls: load %s and %s: %w", s.files.Cert, s.files.Key, err)
		}
		m.cert = &c
	}
	if s.files.CA != "" {
		pem, err := os.ReadFile(s.files.CA)
		if err != nil {
			return nil, fmt.Errorf("tls: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("tls: %s holds no PEM certificate", s.files.CA)
		}
		m.pool = pool
	}
	return m, nil
}

// current returns the material in force, looking at the files first when it is time.
func (s *Source) current() *material {
	now := time.Now().UnixNano()
	if now < s.nextCheck.Load() {
		return s.cur.Load()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if now < s.nextCheck.Load() { // another handshake just looked
		return s.cur.Load()
	}
	s.nextCheck.Store(now + int64(s.opts.CheckInterval))
	old := s.cur.Load()
	if st, err := s.stamp(); err == nil && st == old.stamp {
		return old
	}
	m, err := s.read()
	if err != nil {
		if s.opts.OnError != nil {
			s.opts.OnError(err)
		}
		return old
	}
	s.cur.Store(m)
	if s.opts.OnReload != nil {
		s.opts.OnReload()
	}
	return m
}

// Reload looks at the files now, whatever the interval, and reports a failed read.
func (s *Source) Reload() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, err := s.read()
	if err != nil {
		return err
	}
	s.cur.Store(m)
	s.nextCheck.Store(time.Now().Add(s.opts.CheckInterval).UnixNano())
	return nil
}

// ServerConfig is a server's TLS config: it presents the current certificate and, when a CA
// is given, requires a client certificate that chains to it. nextProtos is the ALPN list
// ("h2" for gRPC, "h2","http/1.1" for HTTP servers); nil leaves it to the server.
func (s *Source) ServerConfig(nextProtos ...string) *tls.Config {
	base := &tls.Config{MinVersion: tls.VersionTLS12, NextProtos: nextProtos}
	base.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		m := s.current()
		if m.cert == nil {
			return nil, errors.New("tls: this server has no certificate")
		}
		c := &tls.Config{
			MinVersion:   tls.VersionTLS12,
			NextProtos:   nextProtos,
			Certificates: []tls.Certificate{*m.cert},
		}
		if m.pool != nil {
			c.ClientCAs = m.pool
			c.ClientAuth = tls.RequireAndVerifyClientCert
		}
		return c, nil
	}
	return base
}

// ClientConfig is a client's TLS config: the server's chain is verified against the current
// CA (re-read on rotation, which a static RootCAs could not follow) and its name against
// serverName (a host name or IP address; see ServerNameOf). With serverName empty, only a
// name sent as SNI is checked, which an IP address never is: always give it. The current
// certificate, if any, is presented.
func (s *Source) ClientConfig(serverName string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		ServerName: serverName,
		// Verification is done in VerifyConnection against the CA in force at handshake time.
		InsecureSkipVerify: true, //nolint:gosec // verified below, against rotating roots
		VerifyConnection: func(cs tls.ConnectionState) error {
			// crypto/tls leaves cs.ServerName empty for an IP address (no SNI), so the name
			// to check is taken from the caller when it gave one.
			name := serverName
			if name == "" {
				name = cs.ServerName
			}
			return s.verifyServer(cs, name)
		},
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			if m := s.current(); m.cert != nil {
				return m.cert, nil
			}
			return &tls.Certificate{}, nil // no certificate: the server decides
		},
	}
}

func (s *Source) verifyServer(cs tls.ConnectionState, name string) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("tls: server presented no certificate")
	}
	m := s.current()
	opts := x509.VerifyOptions{
		Roots:         m.pool, // nil: the system roots
		Intermediates: x509.NewCertPool(),
		DNSName:       name,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, c := range cs.PeerCertificates[1:] {
		opts.Intermediates.AddCert(c)
	}
	if _, err := cs.PeerCertificates[0].Verify(opts); err != nil {
		return fmt.Errorf("tls: verify server certificate: %w", err)
	}
	return nil
}

// PeerURI returns the first URI SAN of a verified peer certificate ("spiffe://..."), or ""
// when the connection has no verified client certificate.
func PeerURI(cs *tls.ConnectionState) string {
	if cs == nil || len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return ""
	}
	for _, u := range cs.VerifiedChains[0][0].URIs {
		return u.String()
	}
	return ""
}

// ServerNameOf returns the host part of a host:port dial address, for ClientConfig.
func ServerNameOf(addr string) string {
	if h, _, err := net.SplitHostPort(addr); err == nil {
		return h
	}
	return addr
}
