package extproc

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/patchbay-io/patchbay/api/headers"
)

// childEnv makes the test binary run as an ext_proc server process (see TestMain).
const childEnv = "PATCHBAY_EXTPROC_TEST_CHILD_XDS"

func TestMain(m *testing.M) {
	if xds := os.Getenv(childEnv); xds != "" {
		os.Exit(runChild(xds))
	}
	code := m.Run()
	if code == 0 {
		if leaked := leakedGoroutines(5 * time.Second); leaked != "" {
			fmt.Fprintf(os.Stderr, "goroutines leaked by the tests:\n%s\n", leaked)
			code = 1
		}
	}
	os.Exit(code)
}

// leakedGoroutines waits up to d for goroutines of this module's servers and of gRPC
// to end, and returns the stacks of those that did not.
func leakedGoroutines(d time.Duration) string {
	deadline := time.Now().Add(d)
	for {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		var leaked []string
		for _, g := range strings.Split(string(buf), "\n\n") {
			if strings.Contains(g, "patchbay-io/patchbay/extproc") && !strings.Contains(g, "leakedGoroutines") ||
				strings.Contains(g, "google.golang.org/grpc") {
				leaked = append(leaked, g)
			}
		}
		if len(leaked) == 0 || time.Now().After(deadline) {
			return strings.Join(leaked, "\n\n")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// runChild serves ext_proc on 127.0.0.1:0 with its policy from xds, prints the address,
// and exits when stdin closes.
func runChild(xds string) int {
	srv, err := New(Config{XDSAddress: xds, XDSMinBackoff: 20 * time.Millisecond})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); cancel() }()
	fmt.Println(lis.Addr().String())
	if err := srv.Serve(ctx, lis); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// startChild runs an ext_proc server process and returns its address and a stop func.
func startChild(t *testing.T, xds string) (string, func()) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+xds)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	stop := func() {
		stdin.Close()
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	}
	t.Cleanup(stop)
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("child address: %v", err)
	}
	return strings.TrimSpace(line), stop
}

// decideAll asks the server at addr for users u0..u(n-1), on one stream, and returns
// each answer's set headers rendered as text.
func decideAll(t *testing.T, addr string, n int) []string {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := extprocv3.NewExternalProcessorClient(conn)
	render := func(r *extprocv3.ProcessingResponse) string {
		var b strings.Builder
		for _, h := range r.GetRequestHeaders().GetResponse().GetHeaderMutation().GetSetHeaders() {
			fmt.Fprintf(&b, "%s=%s;", h.GetHeader().GetKey(), h.GetHeader().GetRawValue())
		}
		return b.String()
	}
	// Wait until the child has its policy (its answers carry a bucket).
	eventually(t, 5*time.Second, "child policy", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		s, err := c.Process(ctx)
		if err != nil || s.Send(reqHeaders(true, ":path", "/v2/models/ranker/infer", headers.UserID, "probe")) != nil {
			return false
		}
		r, err := s.Recv()
		return err == nil && strings.Contains(render(r), headers.Bucket)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	s, err := c.Process(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Pipelined: the sender runs ahead of the receiver (answers come back in order).
	sendErr := make(chan error, 1)
	go func() {
		for i := range n {
			if err := s.Send(reqHeaders(true, ":path", "/v2/models/ranker/infer", headers.UserID, "u"+strconv.Itoa(i))); err != nil {
				sendErr <- err
				return
			}
		}
		sendErr <- s.CloseSend()
	}()
	out := make([]string, n)
	for i := range out {
		r, err := s.Recv()
		if err != nil {
			t.Fatal(err)
		}
		out[i] = render(r)
	}
	if err := <-sendErr; err != nil {
		t.Fatal(err)
	}
	return out
}

// TestStickyAcrossRestart decides 10,000 users in one ext_proc process, restarts it
// (a new process, policy again from the control plane) and checks every user gets the
// same bucket, version and experiments.
func TestStickyAcrossRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	const n = 10000
	cp := startControlPlane(t, "127.0.0.1:0", testPolicy("c1"))
	addr, stop := startChild(t, cp.addr)
	before := decideAll(t, addr, n)
	stop()
	addr, _ = startChild(t, cp.addr)
	after := decideAll(t, addr, n)
	var exposed int
	for i := range before {
		if before[i] != after[i] {
			t.Fatalf("user u%d: %q before the restart, %q after", i, before[i], after[i])
		}
		if strings.Contains(before[i], headers.Experiments) {
			exposed++
		}
	}
	if exposed < n/4 {
		t.Errorf("only %d of %d users in experiments: the comparison is too weak", exposed, n)
	}
}
