package main

import (
	"io"
	"net/http"
	"strings"
	"testing"
)

// TestEveryPartNamesItsService scrapes each part's /metrics under `patchbay up` and
// finds its OpenTelemetry service.name in target_info (it used to be
// unknown_service:patchbay for all three).
func TestEveryPartNamesItsService(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and starts the patchbay binary")
	}
	u := startUpForTest(t)
	for _, c := range []struct{ admin, want string }{
		{u.xdsAdmin, "patchbay-xds"},
		{u.extprocAdmin, "patchbay-extproc"},
		{u.hostAdmin[0], "patchbay-modelhost"},
	} {
		resp, err := http.Get("http://" + c.admin + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("%s/metrics: %d %v", c.admin, resp.StatusCode, err)
		}
		var info string
		for _, line := range strings.Split(string(body), "\n") {
			if strings.HasPrefix(line, "target_info{") {
				info = line
			}
		}
		if !strings.Contains(info, `service_name="`+c.want+`"`) {
			t.Errorf("%s: target_info %q, want service_name=%q", c.admin, info, c.want)
		}
	}
}
