package extprocbench

import (
	"context"
	"crypto/tls"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
	"github.com/patchbay-io/patchbay/internal/tlsfiles"
	"github.com/patchbay-io/patchbay/test/harness"
)

// buildPatchbay builds the shipped binary (cmd/patchbay) into a temporary directory.
func buildPatchbay(b *testing.B) string {
	bin := filepath.Join(b.TempDir(), "patchbay")
	cmd := exec.Command("go", "build", "-o", bin, "github.com/patchbay-io/patchbay/cmd/patchbay")
	cmd.Stderr = os.Stderr
	if err := cmd.Run(); err != nil {
		b.Fatalf("go build cmd/patchbay: %v", err)
	}
	return bin
}

// freeAddr returns a 127.0.0.1 port free at the time of the call, for a child's flag.
func freeAddr(b *testing.B) string {
	return harness.FreeAddr(b)
}

// startTLSADS serves the bench policy from go-control-plane's ADS server over mutual TLS.
func startTLSADS(b *testing.B, cfg *tls.Config) string {
	c := cachev3.NewLinearCache(policyv1.TypeURL)
	if err := c.UpdateResource(policyv1.ResourceName, benchPolicy()); err != nil {
		b.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(cfg)))
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(gs, serverv3.NewServer(ctx, c, nil))
	go func() { _ = gs.Serve(lis) }()
	b.Cleanup(func() { gs.Stop(); cancel() })
	return lis.Addr().String()
}

// startExtproc runs `patchbay extproc` (the shipped binary) with args and two client
// connections using creds, as a two-worker Envoy would hold.
func startExtproc(b *testing.B, name, bin string, creds credentials.TransportCredentials, args ...string) *child {
	addr := freeAddr(b)
	cmd := exec.Command(bin, append([]string{"extproc", "--listen", addr, "--admin", freeAddr(b), "--log-level", "warn"}, args...)...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = cmd.Process.Signal(os.Interrupt); _ = cmd.Wait() })
	c := &child{name: name, addr: addr, cmd: cmd}
	for range 2 {
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { conn.Close() })
		c.conn = append(c.conn, conn)
	}
	return c
}

// waitDeciding waits until c answers with a decision (it has its policy).
func waitDeciding(b *testing.B, c *child, req *extprocv3.ProcessingRequest) {
	deadline := time.Now().Add(20 * time.Second)
	for _, conn := range c.conn {
		for {
			err := once(context.Background(), extprocv3.NewExternalProcessorClient(conn), req)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("%s never decided: %v", c.name, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// BenchmarkExtprocMTLS measures what mutual TLS costs on the ext_proc decision path: the
// shipped `patchbay extproc` binary twice, as separate processes, one plaintext and one
// with --tls-cert/--tls-key/--client-ca (and its xDS client on mutual TLS too), driven
// alike with Envoy-like streams (one stream per request over two long-lived HTTP/2
// connections; TLS handshakes happen once per connection, as with Envoy). Same schedule
// as BenchmarkExtprocVsFloor. It prints the ratios TLS on / TLS off; a measurement, not
// a pass/fail test.
func BenchmarkExtprocMTLS(b *testing.B) {
	bin := buildPatchbay(b)
	ca, err := tlsfiles.NewCA("bench-ca", time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	dir := b.TempDir()
	leaf := func(base, role string) tlsfiles.Files {
		f, err := ca.WriteLeaf(dir, base, tlsfiles.Leaf{Name: role, Hosts: []string{"127.0.0.1"}, URI: "spiffe://patchbay.local/role/" + role})
		if err != nil {
			b.Fatal(err)
		}
		return f
	}
	xdsFiles, epFiles, edgeFiles := leaf("xds", "xds"), leaf("extproc", "extproc"), leaf("edge", "edge")
	xdsSrc, err := tlsfiles.Load(xdsFiles, tlsfiles.Options{})
	if err != nil {
		b.Fatal(err)
	}
	edgeSrc, err := tlsfiles.Load(edgeFiles, tlsfiles.Options{})
	if err != nil {
		b.Fatal(err)
	}

	plainADS, tlsADS := startADS(b), startTLSADS(b, xdsSrc.ServerConfig("h2"))
	off := startExtproc(b, "tls-off", bin, insecure.NewCredentials(), "--xds", plainADS)
	on := startExtproc(b, "mtls-on", bin, credentials.NewTLS(edgeSrc.ClientConfig("127.0.0.1")),
		"--xds", tlsADS, "--xds-ca", epFiles.CA, "--xds-cert", epFiles.Cert, "--xds-key", epFiles.Key,
		"--tls-cert", epFiles.Cert, "--tls-key", epFiles.Key, "--client-ca", epFiles.CA)

	reqs := make([]*extprocv3.ProcessingRequest, 4096)
	for i := range reqs {
		reqs[i] = request("user-" + strconv.Itoa(i))
	}
	waitDeciding(b, off, reqs[0])
	waitDeciding(b, on, reqs[0])
	for _, c := range []*child{off, on} {
		w := &child{name: c.name, cmd: c.cmd, conn: c.conn}
		w.round(b, reqs, 300*time.Millisecond)
	}

	b.ResetTimer()
	for r := range rounds {
		order := []*child{on, off}
		if r%2 == 1 {
			order = []*child{off, on}
		}
		for _, c := range order {
			c.round(b, reqs, roundTime)
		}
	}
	b.StopTimer()
	onRPS, onCPU, onP50, onP99 := on.report(b)
	offRPS, offCPU, offP50, offP99 := off.report(b)
	b.Logf("ratios mTLS on/off: throughput %.3f   CPU per decision %.3f (on/off)   p50 %.2fx   p99 %.2fx",
		onRPS/offRPS, onCPU/offCPU, float64(onP50)/float64(offP50), float64(onP99)/float64(offP99))
	var tr, cr []float64
	for i := range on.roundRPS {
		tr = append(tr, on.roundRPS[i]/off.roundRPS[i])
		cr = append(cr, on.roundCPU[i]/off.roundCPU[i])
	}
	b.Logf("per-round ratios on/off: throughput %s (median %.3f)   CPU per decision %s (median %.3f)",
		fmtRatios(tr), median(tr), fmtRatios(cr), median(cr))
	b.ReportMetric(onRPS/offRPS, "mtls-throughput-ratio")
	b.ReportMetric(median(tr), "mtls-median-throughput-ratio")
	b.ReportMetric(onCPU/offCPU, "mtls-cpu-ratio")
	b.ReportMetric(median(cr), "mtls-median-cpu-ratio")
	b.ReportMetric(onCPU, "mtls-cpu-us/decision")
	b.ReportMetric(offCPU, "plain-cpu-us/decision")
	b.ReportMetric(float64(slices.Max([]time.Duration{onP50 - offP50, 0}).Microseconds()), "mtls-added-p50-us")
}
