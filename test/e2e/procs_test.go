package e2e

import (
	"os"
	"testing"

	"github.com/patchbay-io/patchbay/test/harness"
)

func TestMain(m *testing.M) { os.Exit(harness.Main(m)) }

// proc is a restartable part: harness.Start again with the same arguments (and so the
// same ports) after a kill.
type proc struct {
	t           testing.TB
	name, ready string
	args        []string
	p           *harness.Process
}

func startProc(t testing.TB, name, ready string, args ...string) *proc {
	t.Helper()
	p := &proc{t: t, name: name, ready: ready, args: args}
	p.start()
	return p
}

func (p *proc) start() {
	p.t.Helper()
	p.p = harness.Start(p.t, p.name, p.ready, harness.Binary(p.t), p.args...)
}

// kill ends the process at once (SIGKILL): a crash, not a shutdown.
func (p *proc) kill() { p.p.Kill() }

var (
	freeAddr     = harness.FreeAddr
	waitFor      = harness.Eventually
	repoWith     = harness.RepoWith
	writeRollout = harness.WriteRollout
)

// host is a model host process with its addresses.
type host struct {
	*proc
	http, grpc string
}

func startHost(t testing.TB, name string, models ...string) *host {
	h := &host{http: freeAddr(t), grpc: freeAddr(t)}
	h.proc = startProc(t, name, "http://"+h.http+"/v2/health/ready",
		"modelhost", "--repository", repoWith(t, models...), "--http", h.http, "--grpc", h.grpc, "--admin", freeAddr(t), "--log-level", "warn")
	return h
}
