package main

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	funceapi "github.com/tetratelabs/func-e/api"

	pbenvoy "github.com/patchbay-io/patchbay/envoy"
)

// TestUpFuncEFailureSaysWhatWasTried: with no ENVOY_BIN, no envoy on PATH and a func-e
// download that fails (its archive, here a local server, answers 503), `up` says what it
// tried in order, why func-e failed, and what to do next, and does not claim an Envoy
// log that does not exist (Envoy never ran).
func TestUpFuncEFailureSaysWhatWasTried(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	var hits atomic.Int32
	archive := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		http.Error(w, "archive unavailable", http.StatusServiceUnavailable)
	}))
	defer archive.Close()
	// A free loopback port for Envoy's /ready that nothing answers on.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	stats := l.Addr().String()
	l.Close()

	var log bytes.Buffer
	u := &upRun{
		cfg: upConfig{
			envoy: "auto", download: true, xdsListen: "127.0.0.1:18000", extprocListen: "127.0.0.1:18080",
			envoyAdmin: "127.0.0.1:9901", envoyStat: stats,
			readyTimeout: time.Minute, envoyTimeout: time.Minute, stopGrace: time.Second,
		},
		stdout: &bytes.Buffer{}, log: &prefixLog{w: &log}, dir: t.TempDir(),
		funceOptions: []funceapi.RunOption{
			funceapi.HomeDir(t.TempDir()),
			funceapi.EnvoyVersionsURL(archive.URL + "/envoy-versions.json"),
		},
	}
	ok, note := u.startEnvoy(context.Background())
	u.stopAll()
	if ok {
		t.Fatal("startEnvoy reported Envoy up without any Envoy")
	}
	if hits.Load() == 0 {
		t.Fatalf("func-e never asked the archive; note:\n%s", note)
	}
	for _, want := range []string{
		"$ENVOY_BIN: not set", "envoy on PATH: none found",
		"func-e: could not get Envoy " + pbenvoy.Version() + " running", archive.URL, // what failed, and where
		"archive.tetratelabs.io", "HTTPS_PROXY", // what to check
		"func-e use " + pbenvoy.Version(), "envoyproxy/envoy:v" + pbenvoy.Version(), "ENVOY_BIN", // what to do next
		"model hosts", "proxyless", // what still runs
	} {
		if !strings.Contains(note, want) {
			t.Errorf("note lacks %q:\n%s", want, note)
		}
	}
	for _, lie := range []string{"log is above", "exited before it was ready"} {
		if strings.Contains(note, lie) {
			t.Errorf("note says %q, but Envoy never ran:\n%s", lie, note)
		}
	}
	t.Logf("note:\n%s\nlog:\n%s", note, log.String())
}
