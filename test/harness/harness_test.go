package harness

import (
	"fmt"
	"net/http"
	"os"
	"strings"
	"testing"
)

func TestMain(m *testing.M) { os.Exit(Main(m)) }

// TestPartsStartAndStop starts a model host, the control plane and ext_proc the way
// the Envoy tests do, checks each answers, then stops them and checks they are gone.
func TestPartsStartAndStop(t *testing.T) {
	if testing.Short() {
		t.Skip("starts the patchbay binary")
	}
	host := StartModelHost(t, "modelhost", RepoWith(t, "ranker/v7"))
	dir := t.TempDir()
	WriteRollout(t, dir, "ranker.yaml", fmt.Sprintf(`apiVersion: patchbay.io/v1
kind: Rollout
model: ranker
versions:
  - {name: v7, endpoints: [%q]}
traffic: {v7: 100}
`, host.HTTP))
	cp := StartControlPlane(t, dir)
	ep := StartExtProc(t, cp.ADS)

	resp, err := http.Post("http://"+host.HTTP+"/v2/models/ranker/infer", "application/json",
		strings.NewReader(`{"inputs":[{"name":"features","datatype":"FP32","shape":[1,8],"data":[1,2,3,4,5,6,7,8]}]}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("inference on the harness model host: %s", resp.Status)
	}
	if !OK("http://" + cp.Admin + "/status") {
		t.Error("control plane /status is not 200")
	}

	for _, p := range []*Process{ep.Process, cp.Process, host.Process} {
		p.Stop()
		if !p.Exited() {
			t.Errorf("%s still running after Stop", p.Name)
		}
	}
	if OK("http://" + host.HTTP + "/v2/health/ready") {
		t.Error("model host still answers after Stop")
	}
}

// TestEnvoyBinarySkipsWithAClearMessage: with no ENVOY_BIN and no envoy on PATH, a test
// asking for Envoy is skipped (the message names both), never failed or run.
func TestEnvoyBinarySkipsWithAClearMessage(t *testing.T) {
	t.Setenv("ENVOY_BIN", "")
	t.Setenv("PATH", t.TempDir()) // no envoy here
	skipped := false
	t.Run("inner", func(t *testing.T) {
		defer func() { skipped = t.Skipped() }()
		EnvoyBinary(t)
		t.Error("EnvoyBinary returned without Envoy")
	})
	if !skipped {
		t.Fatal("a test needing Envoy was not skipped")
	}
}
