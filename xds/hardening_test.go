package xds

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/patchbay-io/patchbay/test/harness"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// newIdleServer builds a server that is not running (no watcher): the test calls Reload.
func newIdleServer(t *testing.T, dir string) *Server {
	t.Helper()
	s, err := New(Config{
		RolloutsDir: dir,
		Translate:   translate.Options{EdgeAddress: "127.0.0.1:10000", SidecarAddress: "127.0.0.1:15001"},
		AdminToken:  testToken,
		Settle:      -1,
		LookupHost:  fakeDNS.lookup,
		Logger:      zerolog.New(&harness.Buffer{}),
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func v2Share(t *testing.T, s *Server) int {
	t.Helper()
	st := s.Status()
	if len(st.Models) != 1 {
		t.Fatalf("%d models served", len(st.Models))
	}
	return st.Models[0].Traffic["v2"]
}

func splitDoc(v2 int) string {
	return rolloutDoc("m", map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002"}, fmt.Sprintf("{v1: %d, v2: %d}", 100-v2, v2), "")
}

// TestReloadsAreSerialised: a reload that read the files before they changed (held between
// its read and its apply) cannot apply its older read after a reload that read the newer
// files: reloads run one at a time, from read to apply. Before, the newer reload finished
// first and the older read was applied last, serving stale config until the next change.
func TestReloadsAreSerialised(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "m.yaml", splitDoc(10))
	s := newIdleServer(t, dir)
	oldRead, release := make(chan struct{}), make(chan struct{})
	s.afterRead = func(why string) {
		if why == "old" {
			close(oldRead)
			<-release
		}
	}
	ctx := context.Background()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); s.Reload(ctx, "old") }()
	<-oldRead
	writeFile(t, dir, "m.yaml", splitDoc(70))
	newDone := make(chan struct{})
	go func() { defer wg.Done(); s.Reload(ctx, "new"); close(newDone) }()
	// Without serialisation the newer reload completes while the older is held; with it,
	// it waits for the older one. Either way the older is released after a bounded wait.
	select {
	case <-newDone:
	case <-time.After(300 * time.Millisecond):
	}
	close(release)
	wg.Wait()
	if got := v2Share(t, s); got != 70 {
		t.Fatalf("after both reloads v2 has %d%%, want the newest file's 70%%", got)
	}
}

// TestConcurrentReloadsEndWithNewestFile: reloads from several goroutines while the file is
// rewritten over and over; once the writes stop and every reload has returned, what is
// served is the last content written.
func TestConcurrentReloadsEndWithNewestFile(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "m.yaml", splitDoc(1))
	s := newIdleServer(t, dir)
	ctx := context.Background()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					s.Reload(ctx, "final")
					return
				default:
					s.Reload(ctx, "loop")
				}
			}
		}()
	}
	for i := 2; i <= 40; i++ {
		writeFile(t, dir, "m.yaml", splitDoc(i))
	}
	close(stop)
	wg.Wait()
	if got := v2Share(t, s); got != 40 {
		t.Fatalf("v2 has %d%%, want the last file's 40%%", got)
	}
}

// TestAdminTimeouts: the admin server cuts off a client that stalls in the middle of a
// request body (read timeout) and closes a keep-alive connection left idle (idle timeout);
// before, only reading the headers was bounded and such connections stayed open forever.
func TestAdminTimeouts(t *testing.T) {
	saved := []time.Duration{adminReadTimeout, adminWriteTimeout, adminIdleTimeout}
	adminReadTimeout, adminWriteTimeout, adminIdleTimeout = 300*time.Millisecond, 2*time.Second, 300*time.Millisecond
	t.Cleanup(func() { adminReadTimeout, adminWriteTimeout, adminIdleTimeout = saved[0], saved[1], saved[2] })
	dir := t.TempDir()
	writeFile(t, dir, "m.yaml", splitDoc(10))
	c := startCP(t, dir)
	// closedByServer reads until the server closes the connection; the 10s deadline only
	// bounds the test.
	closedByServer := func(t *testing.T, conn net.Conn, r *bufio.Reader) {
		t.Helper()
		if err := conn.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
			t.Fatal(err)
		}
		_, err := io.Copy(io.Discard, r)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("the admin server kept the connection open")
		}
	}
	dial := func(t *testing.T) net.Conn {
		conn, err := net.Dial("tcp", c.adminAddr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return conn
	}
	t.Run("stalled body", func(t *testing.T) {
		conn := dial(t)
		fmt.Fprintf(conn, "POST /v1/models/m/rollback HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Length: 100\r\n\r\n{\"vers", testToken)
		closedByServer(t, conn, bufio.NewReader(conn))
	})
	t.Run("idle keep-alive", func(t *testing.T) {
		conn := dial(t)
		fmt.Fprint(conn, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
		r := bufio.NewReader(conn)
		line, err := r.ReadString('\n')
		if err != nil || !strings.Contains(line, "200") {
			t.Fatalf("healthz: %q %v", line, err)
		}
		closedByServer(t, conn, r)
	})
}
