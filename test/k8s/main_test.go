package k8s

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// server is the API server every test of this binary shares (see startAPIServer), with
// the chart's CRDs installed.
var server *apiServer

// crdDir is the chart's CRD directory (Helm installs it before the templates).
var crdDir = filepath.Join("..", "..", "charts", "patchbay", "crds")

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	s, err := startAPIServer()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer s.Stop()
	server = s
	t0 := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := installCRDs(ctx, s.Config, crdDir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	s.CRDInstall = time.Since(t0)
	fmt.Printf("kube-apiserver in process: etcd started in %v, API server in %v, chart CRDs Established in %v\n",
		s.EtcdStart.Round(time.Millisecond), s.APIStart.Round(time.Millisecond), s.CRDInstall.Round(time.Millisecond))
	return m.Run()
}
