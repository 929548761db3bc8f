package tlsfiles

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// serve accepts TLS connections on 127.0.0.1:0 and answers each with the peer's URI SAN.
func serve(t *testing.T, cfg *tls.Config) string {
	t.Helper()
	l, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				defer c.Close()
				tc := c.(*tls.Conn)
				if err := tc.Handshake(); err != nil {
					return
				}
				cs := tc.ConnectionState()
				_, _ = io.WriteString(c, "uri="+PeerURI(&cs)+"\n")
			}(c)
		}
	}()
	return l.Addr().String()
}

// dial connects, reads the server's one line and returns it with the server's leaf serial.
func dial(addr string, cfg *tls.Config) (string, string, error) {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return "", "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil {
		return "", "", err
	}
	if len(b) == 0 {
		return "", "", errors.New("connection closed without an answer")
	}
	return strings.TrimSpace(string(b)), c.ConnectionState().PeerCertificates[0].SerialNumber.String(), nil
}

func newCA(t *testing.T) *CA {
	t.Helper()
	ca, err := NewCA("test-ca", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func TestMutualTLSRequiresAClientCertificateFromTheCA(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	ca := newCA(t)
	srvFiles, err := ca.WriteLeaf(dir, "server", Leaf{Name: "xds", Hosts: []string{"127.0.0.1"}})
	if err != nil {
		t.Fatal(err)
	}
	src, err := Load(srvFiles, Options{})
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, src.ServerConfig())

	cliFiles, err := ca.WriteLeaf(dir, "client", Leaf{Name: "sidecar", URI: "spiffe://patchbay.local/role/sidecar"})
	if err != nil {
		t.Fatal(err)
	}
	cli, err := Load(cliFiles, Options{})
	if err != nil {
		t.Fatal(err)
	}
	got, _, err := dial(addr, cli.ClientConfig(ServerNameOf(addr)))
	if err != nil {
		t.Fatalf("client with a certificate from the CA: %v", err)
	}
	if got != "uri=spiffe://patchbay.local/role/sidecar" {
		t.Errorf("server saw %q, want the client's URI SAN", got)
	}

	// Only the CA, no certificate: the server requires one.
	caOnly, err := Load(Files{CA: cliFiles.CA}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := dial(addr, caOnly.ClientConfig("127.0.0.1")); err == nil {
		t.Error("client without a certificate was served; want the handshake refused")
	}

	// A certificate from another CA is refused.
	otherDir := t.TempDir()
	other, err := newCA(t).WriteLeaf(otherDir, "client", Leaf{Name: "intruder", URI: "spiffe://patchbay.local/role/edge"})
	if err != nil {
		t.Fatal(err)
	}
	mixed, err := Load(Files{Cert: other.Cert, Key: other.Key, CA: cliFiles.CA}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := dial(addr, mixed.ClientConfig("127.0.0.1")); err == nil {
		t.Error("client certificate from a foreign CA was accepted")
	}

	// The client refuses a server whose name does not match.
	if _, _, err := dial(addr, cli.ClientConfig("xds.example")); err == nil {
		t.Error("client accepted a server certificate for another name")
	}
}

func TestRotationIsPickedUpWithoutRestart(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	ca := newCA(t)
	files, err := ca.WriteLeaf(dir, "server", Leaf{Name: "v1", Hosts: []string{"127.0.0.1"}})
	if err != nil {
		t.Fatal(err)
	}
	var reloads atomic.Int32
	src, err := Load(Files{Cert: files.Cert, Key: files.Key}, Options{CheckInterval: 10 * time.Millisecond, OnReload: func() { reloads.Add(1) }})
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, src.ServerConfig())
	cli, err := Load(Files{CA: files.CA}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	_, first, err := dial(addr, cli.ClientConfig("127.0.0.1"))
	if err != nil {
		t.Fatal(err)
	}

	// A half-written certificate keeps the old one in force, and is reported.
	var failures atomic.Int32
	src.opts.OnError = func(error) { failures.Add(1) }
	full, _ := os.ReadFile(files.Cert)
	if err := os.WriteFile(files.Cert, full[:len(full)/2], 0o644); err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	_, during, err := dial(addr, cli.ClientConfig("127.0.0.1"))
	if err != nil {
		t.Fatalf("a half-written file broke serving: %v", err)
	}
	if during != first || failures.Load() == 0 {
		t.Errorf("half-written file: serial %s (want old %s), failures reported %d (want > 0)", during, first, failures.Load())
	}

	// Rotate: a new certificate and key from the same CA, written in place.
	c, k, err := ca.Issue(Leaf{Name: "v2", Hosts: []string{"127.0.0.1"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(files.Key, k, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(files.Cert, c, 0o644); err != nil {
		t.Fatal(err)
	}
	var now string
	for i := 0; i < 200; i++ { // bounded: ~2 s
		time.Sleep(10 * time.Millisecond)
		if _, now, err = dial(addr, cli.ClientConfig("127.0.0.1")); err == nil && now != first {
			break
		}
	}
	if now == first {
		t.Fatalf("server still presents serial %s after rotation", first)
	}
	if reloads.Load() == 0 {
		t.Error("OnReload was not called")
	}
}

func TestKubernetesSecretSymlinkSwap(t *testing.T) {
	t.Parallel()
	// A Secret volume: <dir>/tls.crt -> ..data/tls.crt, ..data -> ..<timestamp>; an update
	// writes a new timestamped directory and swaps the ..data symlink atomically.
	dir := t.TempDir()
	ca := newCA(t)
	write := func(name string) {
		d := filepath.Join(dir, name)
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if _, err := ca.WriteLeaf(d, "tls", Leaf{Name: name, Hosts: []string{"127.0.0.1"}}); err != nil {
			t.Fatal(err)
		}
		tmp := filepath.Join(dir, "..data_tmp")
		if err := os.Symlink(name, tmp); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, "..data")); err != nil {
			t.Fatal(err)
		}
	}
	write("..2026_01")
	for _, f := range []string{"tls.crt", "tls.key", "ca.crt"} {
		if err := os.Symlink(filepath.Join("..data", f), filepath.Join(dir, f)); err != nil {
			t.Fatal(err)
		}
	}
	src, err := Load(Files{Cert: filepath.Join(dir, "tls.crt"), Key: filepath.Join(dir, "tls.key")}, Options{CheckInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, src.ServerConfig())
	cli, err := Load(Files{CA: filepath.Join(dir, "ca.crt")}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	_, first, err := dial(addr, cli.ClientConfig("127.0.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond) // a distinct modification time
	write("..2026_02")
	var now string
	for i := 0; i < 200; i++ {
		time.Sleep(10 * time.Millisecond)
		if _, now, err = dial(addr, cli.ClientConfig("127.0.0.1")); err == nil && now != first {
			break
		}
	}
	if now == first {
		t.Fatal("symlink swap not picked up")
	}
}

func TestLoadRefusesBadInput(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage.pem")
	if err := os.WriteFile(garbage, []byte("not a pem"), 0o644); err != nil {
		t.Fatal(err)
	}
	for name, f := range map[string]Files{
		"nothing":         {},
		"cert, no key":    {Cert: garbage},
		"missing file":    {Cert: filepath.Join(dir, "nope.crt"), Key: filepath.Join(dir, "nope.key")},
		"garbage CA":      {CA: garbage},
		"garbage keypair": {Cert: garbage, Key: garbage},
	} {
		if _, err := Load(f, Options{}); err == nil {
			t.Errorf("%s: Load succeeded, want an error", name)
		}
	}
}
