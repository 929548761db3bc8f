package envoye2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/patchbay-io/patchbay/envoy"
	"github.com/patchbay-io/patchbay/internal/tlsfiles"
	"github.com/patchbay-io/patchbay/test/harness"
)

// TestEnvoyValidatesMTLSBootstraps: the real Envoy accepts each mTLS bootstrap
// (`envoy --mode validate`), rendered as `patchbay up --tls` renders it: SDS files written by
// envoy.WriteSDS naming PEMs made by a throwaway CA. Validate mode builds the clusters'
// TLS contexts and SDS subscriptions, so a bad SDS path or secret shape fails here.
func TestEnvoyValidatesMTLSBootstraps(t *testing.T) {
	bin := harness.EnvoyBinary(t)
	ca, err := tlsfiles.NewCA("patchbay test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	for _, role := range envoy.Roles {
		t.Run(string(role), func(t *testing.T) {
			dir := t.TempDir()
			tlsDir, sdsDir := filepath.Join(dir, "tls"), filepath.Join(dir, "sds")
			for _, d := range []string{tlsDir, sdsDir} {
				if err := os.Mkdir(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			f, err := ca.WriteLeaf(tlsDir, string(role), tlsfiles.Leaf{Name: string(role), Hosts: []string{"127.0.0.1"}, URI: envoy.Identity(string(role))})
			if err != nil {
				t.Fatal(err)
			}
			if err := envoy.WriteSDS(sdsDir, envoy.PEMFiles{Cert: f.Cert, Key: f.Key, CA: f.CA}); err != nil {
				t.Fatal(err)
			}
			b, err := envoy.Render(role, envoy.Params{MTLS: true, SDSDir: sdsDir})
			if err != nil {
				t.Fatal(err)
			}
			js, err := envoy.MarshalJSON(b)
			if err != nil {
				t.Fatal(err)
			}
			config := filepath.Join(dir, "envoy.json")
			if err := os.WriteFile(config, js, 0o600); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			out, err := exec.CommandContext(ctx, bin, "--mode", "validate", "-c", config).CombinedOutput()
			if err != nil {
				t.Fatalf("envoy --mode validate %s-mtls: %v\n%s", role, err, out)
			}
		})
	}
}
