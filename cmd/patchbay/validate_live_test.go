package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/patchbay-io/patchbay/internal/tlsfiles"
	"github.com/patchbay-io/patchbay/modelhost"
)

// liveHost runs a real patchbay model host in process, on 127.0.0.1:0, over a repository
// of model m with versions v1 (input features FP32 [-1, 4]) and v2 (input x instead: it
// breaks a contract on features). It returns the REST and gRPC addresses.
func liveHost(t *testing.T, tls *tlsfiles.Source) (rest, grpcAddr string) {
	t.Helper()
	repo := t.TempDir()
	for v, input := range map[string]string{"v1": "features", "v2": "x"} {
		dir := filepath.Join(repo, "m", v)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		yaml := fmt.Sprintf("runtime: linear\nartifact: linear.json\ninputs: [{name: %s, datatype: FP32, shape: [-1, 4]}]\noutputs: [{name: probability, datatype: FP32, shape: [-1]}]\n", input)
		if err := os.WriteFile(filepath.Join(dir, "model.yaml"), []byte(yaml), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "linear.json"), []byte(`{"link":"logistic","weights":[0.8,-0.5,0.3,1.2],"bias":-0.2}`), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	srv, err := modelhost.New(modelhost.Config{Repository: repo, Logger: zerolog.Nop(), TLS: tls})
	if err != nil {
		t.Fatal(err)
	}
	hl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, hl, gl) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("model host did not stop")
		}
	})
	return hl.Addr().String(), gl.Addr().String()
}

func liveRollout(t *testing.T, versions string) string {
	t.Helper()
	dir := t.TempDir()
	doc := "apiVersion: patchbay.io/v1\nkind: Rollout\nmodel: m\nversions:\n" + versions +
		"traffic: {v1: 100}\ncontract:\n  inputs: [{name: features, datatype: FP32, shape: [-1, 4]}]\n  outputs: [{name: probability, datatype: FP32, shape: [-1]}]\n"
	path := filepath.Join(dir, "m.yaml")
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func validateLiveRun(t *testing.T, path string, flags ...string) (string, string, error) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	args := append(append([]string{"rollout", "validate", "--live", "--timeout", "5s"}, flags...), path)
	err := run(context.Background(), args, &stdout, &stderr)
	return stdout.String(), stderr.String(), err
}

// TestValidateLive: `rollout validate --live` reads each contracted version's metadata from
// a real model host, over REST and (for a gRPC-only version) gRPC ModelMetadata: versions
// that keep the contract pass (exit 0); one whose host renamed a contracted input fails,
// naming file:line, model/version and the breach; an address nothing listens on fails,
// naming it.
func TestValidateLive(t *testing.T) {
	rest, grpcAddr := liveHost(t, nil)

	t.Run("compatible", func(t *testing.T) {
		// v1 over REST, then as a gRPC-only version (ModelMetadata).
		for _, versions := range []string{
			fmt.Sprintf("  - {name: v1, endpoints: [%q]}\n", rest),
			fmt.Sprintf("  - {name: v1, grpcEndpoints: [%q]}\n", grpcAddr),
		} {
			path := liveRollout(t, versions)
			out, errOut, err := validateLiveRun(t, path)
			if err != nil {
				t.Fatalf("validate --live: %v\n%s%s", err, out, errOut)
			}
			if !strings.Contains(out, path+":5: m/v1 keeps the contract") {
				t.Errorf("stdout lacks the kept version at file:line:\n%s", out)
			}
		}
	})

	t.Run("breaking", func(t *testing.T) {
		for _, versions := range []string{
			fmt.Sprintf("  - {name: v1, endpoints: [%q]}\n  - {name: v2, endpoints: [%q]}\n", rest, rest),
			fmt.Sprintf("  - {name: v1, endpoints: [%q]}\n  - {name: v2, protocol: grpc, endpoints: [%q]}\n", rest, grpcAddr),
		} {
			path := liveRollout(t, versions)
			out, errOut, err := validateLiveRun(t, path)
			if err == nil {
				t.Fatalf("validate --live passed a breaking version:\n%s", out)
			}
			if exitCode(err) == 0 {
				t.Fatalf("exit code 0 for %v", err)
			}
			if want := path + `:6: m/v2: breaks the contract`; !strings.Contains(errOut, want) || !strings.Contains(errOut, `input "features" is missing`) {
				t.Errorf("stderr lacks %q and the missing input:\n%s", want, errOut)
			}
			if strings.Contains(errOut, "m/v1:") {
				t.Errorf("v1 reported though it keeps the contract:\n%s", errOut)
			}
		}
	})

	t.Run("unreachable", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		silent := l.Addr().String()
		l.Close() // nothing listens there now
		path := liveRollout(t, fmt.Sprintf("  - {name: v1, endpoints: [%q]}\n", silent))
		_, errOut, err := validateLiveRun(t, path)
		if err == nil || exitCode(err) == 0 {
			t.Fatalf("validate --live: %v, want a failure", err)
		}
		if !strings.Contains(errOut, path+":5: m/v1: metadata unreadable") || !strings.Contains(errOut, silent) {
			t.Errorf("stderr lacks file:line and the address %s:\n%s", silent, errOut)
		}
	})
}

// TestValidateLiveTLS: versions with tls: true are read over TLS from a model host that
// requires a client certificate, with --ca, --cert and --key, over REST and gRPC; without
// --ca the version is reported unreadable.
func TestValidateLiveTLS(t *testing.T) {
	pki := t.TempDir()
	ca, err := tlsfiles.NewCA("test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	hostFiles, err := ca.WriteLeaf(pki, "host", tlsfiles.Leaf{Name: "host", Hosts: []string{"127.0.0.1"}, URI: "spiffe://patchbay.local/role/modelhost"})
	if err != nil {
		t.Fatal(err)
	}
	ci, err := ca.WriteLeaf(pki, "ci", tlsfiles.Leaf{Name: "ci", URI: "spiffe://patchbay.local/role/operator"})
	if err != nil {
		t.Fatal(err)
	}
	src, err := tlsfiles.Load(hostFiles, tlsfiles.Options{}) // with the CA: client certificates required
	if err != nil {
		t.Fatal(err)
	}
	rest, grpcAddr := liveHost(t, src)
	path := liveRollout(t, fmt.Sprintf("  - {name: v1, tls: true, endpoints: [%q], grpcEndpoints: [%q]}\n", rest, grpcAddr))
	if out, errOut, err := validateLiveRun(t, path, "--ca", ci.CA, "--cert", ci.Cert, "--key", ci.Key); err != nil {
		t.Fatalf("validate --live over TLS: %v\n%s%s", err, out, errOut)
	}
	grpcOnly := liveRollout(t, fmt.Sprintf("  - {name: v1, tls: true, protocol: grpc, endpoints: [%q]}\n", grpcAddr))
	if out, errOut, err := validateLiveRun(t, grpcOnly, "--ca", ci.CA, "--cert", ci.Cert, "--key", ci.Key); err != nil {
		t.Fatalf("validate --live over TLS (gRPC): %v\n%s%s", err, out, errOut)
	}
	_, errOut, err := validateLiveRun(t, path)
	if err == nil || !strings.Contains(errOut, "no --ca given") {
		t.Fatalf("without --ca: %v\n%s", err, errOut)
	}
}
