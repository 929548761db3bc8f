package harness

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/patchbay-io/patchbay/envoy"
)

// ModelHost is a running `patchbay modelhost`.
type ModelHost struct {
	*Process
	HTTP, GRPC string // host:port
}

// StartModelHost serves the model repository repo.
func StartModelHost(t testing.TB, name, repo string) *ModelHost {
	t.Helper()
	m := &ModelHost{HTTP: FreeAddr(t), GRPC: FreeAddr(t)}
	m.Process = Start(t, name, "http://"+m.HTTP+"/v2/health/ready", Binary(t),
		"modelhost", "--repository", repo, "--http", m.HTTP, "--grpc", m.GRPC, "--admin", FreeAddr(t), "--log-level", "debug")
	return m
}

// ControlPlane is a running `patchbay xds`.
type ControlPlane struct {
	*Process
	ADS, Admin      string // host:port
	Edge, Sidecar   string // the listener addresses it gives Envoy nodes
	Rollouts, Token string // the watched directory; the rollback API's bearer token
}

// StartControlPlane watches the rollout directory dir.
func StartControlPlane(t testing.TB, dir string) *ControlPlane {
	t.Helper()
	c := &ControlPlane{ADS: FreeAddr(t), Admin: FreeAddr(t), Edge: FreeAddr(t), Sidecar: FreeAddr(t), Rollouts: dir, Token: "harness-token-at-least-32-bytes-long-0123"}
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(c.Token), 0o600); err != nil {
		t.Fatal(err)
	}
	c.Process = Start(t, "xds", "http://"+c.Admin+"/readyz", Binary(t),
		"xds", "--rollouts", dir, "--listen", c.ADS, "--admin", c.Admin,
		"--edge-listener", c.Edge, "--sidecar-listener", c.Sidecar,
		"--admin-token-file", tokenFile, "--log-level", "debug")
	return c
}

// ExtProc is a running `patchbay extproc`.
type ExtProc struct {
	*Process
	Listen, Admin string
}

// StartExtProc connects an ext_proc router to the control plane at ads.
func StartExtProc(t testing.TB, ads string) *ExtProc {
	t.Helper()
	e := &ExtProc{Listen: FreeAddr(t), Admin: FreeAddr(t)}
	e.Process = Start(t, "extproc", "http://"+e.Admin+"/readyz", Binary(t),
		"extproc", "--listen", e.Listen, "--xds", ads, "--admin", e.Admin, "--log-level", "debug")
	return e
}

// EnvoyBinary returns $ENVOY_BIN, else envoy on PATH, else skips the test saying so.
func EnvoyBinary(t testing.TB) string {
	t.Helper()
	if b := os.Getenv("ENVOY_BIN"); b != "" {
		return b
	}
	if b, err := exec.LookPath("envoy"); err == nil {
		return b
	}
	t.Skipf("no Envoy: set ENVOY_BIN or put envoy on PATH (Envoy %s: envoy/README.md says how to get it)", envoy.Version())
	return ""
}

// Envoy is a running Envoy with a patchbay bootstrap.
type Envoy struct {
	*Process
	Admin, Stats string
	// Listener is where the control plane told this node to listen (edge or sidecar).
	Listener string
}

// StartEnvoy runs Envoy with the role's bootstrap (envoy.Render) pointed at the
// control plane and ext_proc, and waits until it is ready (its listener came over ADS).
func StartEnvoy(t testing.TB, role envoy.Role, cp *ControlPlane, ep *ExtProc) *Envoy {
	t.Helper()
	bin := EnvoyBinary(t)
	e := &Envoy{Admin: FreeAddr(t), Stats: FreeAddr(t), Listener: cp.Edge}
	if role == envoy.Sidecar {
		e.Listener = cp.Sidecar
	}
	b, err := envoy.Render(role, envoy.Params{NodeID: "harness-" + string(role), XDS: cp.ADS, ExtProc: ep.Listen, Admin: e.Admin, Stats: e.Stats})
	if err != nil {
		t.Fatal(err)
	}
	js, err := envoy.MarshalJSON(b)
	if err != nil {
		t.Fatal(err)
	}
	config := filepath.Join(t.TempDir(), "envoy.json")
	if err := os.WriteFile(config, js, 0o600); err != nil {
		t.Fatal(err)
	}
	e.Process = Start(t, "envoy-"+string(role), "http://"+e.Stats+"/ready", bin,
		"-c", config, "--use-dynamic-base-id", "--log-level", "info", "--drain-time-s", "1")
	return e
}

// RepoWith makes a model repository holding only the named versions ("ranker/v7")
// of examples/models, so a host's answers identify the version that ran.
func RepoWith(t testing.TB, versions ...string) string {
	t.Helper()
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	dst := t.TempDir()
	for _, mv := range versions {
		src := filepath.Join(root, "examples", "models", mv)
		entries, err := os.ReadDir(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Join(dst, mv), 0o755); err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			b, err := os.ReadFile(filepath.Join(src, e.Name()))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dst, mv, e.Name()), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	return dst
}

// WriteRollout writes a rollout file atomically (write + rename), as an editor or a
// ConfigMap update does, so the control plane never reads half a file.
func WriteRollout(t testing.TB, dir, name, content string) {
	t.Helper()
	tmp := filepath.Join(dir, "."+name+".tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		t.Fatal(err)
	}
}
