package xds

import (
	"context"
	"encoding/json"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestResyncReportsEachMistakeOnce: the resync (Reload on a timer, see Run) meeting the same
// files again logs no "config applied", and a bad file left in place is logged as rejected
// and counted in patchbay_xds_rejected_configs_total once, not on every reload; a different
// bad content is a new rejection.
func TestResyncReportsEachMistakeOnce(t *testing.T) {
	dir := t.TempDir()
	eps := map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002"}
	writeFile(t, dir, "r.yaml", rolloutDoc("r", eps, "{v1: 100, v2: 0}", ""))
	c := startCP(t, dir)
	ctx := context.Background()
	count := func(msg string) int { return strings.Count(c.logs.String(), `"message":"`+msg+`"`) }
	rejectedMetric := func() string {
		_, body := httpDo(t, http.MethodGet, "http://"+c.adminAddr+"/metrics", "", "")
		m := regexp.MustCompile(`(?m)^patchbay_xds_rejected_configs_total(?:\{[^}]*\})? (\S+)$`).FindStringSubmatch(body)
		if m == nil {
			return "absent"
		}
		return m[1]
	}
	applied := count("config applied")
	for range 3 {
		c.srv.Reload(ctx, "files changed")
	}
	if n := count("config applied"); n != applied {
		t.Fatalf("3 reloads of unchanged files logged %d more \"config applied\"", n-applied)
	}

	writeFile(t, dir, "r.yaml", rolloutDoc("r", eps, "{v1: 50, v2: 10}", ""))
	waitFor(t, 5*time.Second, "the bad file rejected", func() bool { return c.srv.Status().CurrentError != nil })
	for range 3 {
		c.srv.Reload(ctx, "files changed")
	}
	if n, m := count("config rejected"), rejectedMetric(); n != 1 || m != "1" {
		t.Fatalf("one bad file met by 4+ reloads: logged %d times, metric %s; want 1 and 1", n, m)
	}
	if st := c.srv.Status(); st.RejectedConfigs != 1 || len(st.Errors) != 1 {
		t.Fatalf("status after one mistake: %d rejected, %d errors", st.RejectedConfigs, len(st.Errors))
	}
	writeFile(t, dir, "r.yaml", rolloutDoc("r", eps, "{v1: 50, v2: 20}", ""))
	waitFor(t, 5*time.Second, "the second bad file rejected", func() bool { return c.srv.Status().RejectedConfigs == 2 })
	c.srv.Reload(ctx, "files changed")
	if n, m := count("config rejected"), rejectedMetric(); n != 2 || m != "2" {
		t.Fatalf("two distinct bad files: logged %d times, metric %s; want 2 and 2", n, m)
	}
}

// TestStatusErrorsAreHistory: /status shows the current error only while the last reload
// failed, keeps past errors as a list with times, and uses snake_case JSON names throughout.
func TestStatusErrorsAreHistory(t *testing.T) {
	dir := t.TempDir()
	eps := map[string]string{"v1": "127.0.0.1:9001", "v2": "127.0.0.1:9002"}
	writeFile(t, dir, "r.yaml", rolloutDoc("r", eps, "{v1: 100, v2: 0}", ""))
	c := startCP(t, dir)
	get := func() (map[string]any, string) {
		code, body := httpDo(t, http.MethodGet, "http://"+c.adminAddr+"/status", "", "")
		var m map[string]any
		if err := json.Unmarshal([]byte(body), &m); code != http.StatusOK || err != nil {
			t.Fatalf("/status: %d %v\n%s", code, err, body)
		}
		return m, body
	}
	writeFile(t, dir, "r.yaml", rolloutDoc("r", eps, "{v1: 50, v2: 10}", ""))
	waitFor(t, 5*time.Second, "the bad file rejected", func() bool { return c.srv.Status().CurrentError != nil })
	m, body := get()
	cur, _ := m["current_error"].(map[string]any)
	if cur == nil || !strings.Contains(cur["message"].(string), "weights sum to 60") {
		t.Fatalf("current_error while a bad file is in place:\n%s", body)
	}
	before := c.srv.Version()
	writeFile(t, dir, "r.yaml", rolloutDoc("r", eps, "{v1: 50, v2: 50}", ""))
	waitFor(t, 5*time.Second, "the good file applied", func() bool { return c.srv.Version() != before })
	m, body = get()
	if _, ok := m["current_error"]; ok {
		t.Fatalf("current_error still shown after a good config was applied:\n%s", body)
	}
	if _, ok := m["last_error"]; ok {
		t.Fatalf("last_error still shown:\n%s", body)
	}
	errs, _ := m["errors"].([]any)
	if len(errs) != 1 {
		t.Fatalf("errors: want the one past rejection:\n%s", body)
	}
	e := errs[0].(map[string]any)
	if at, _ := e["at"].(string); at == "" || !strings.Contains(e["message"].(string), "weights sum to 60") {
		t.Fatalf("an error in the history lacks its time or message: %v", e)
	}
	// Every key in the document is snake_case (model names, versions and hosts are values
	// or map keys chosen by the user: the test's are lower case).
	snake := regexp.MustCompile(`^[a-z0-9_.:\-]+$`)
	var walk func(v any, path string)
	walk = func(v any, path string) {
		switch x := v.(type) {
		case map[string]any:
			for k, c := range x {
				if !snake.MatchString(k) {
					t.Errorf("%s: key %q is not snake_case", path, k)
				}
				walk(c, path+"."+k)
			}
		case []any:
			for _, c := range x {
				walk(c, path+"[]")
			}
		}
	}
	walk(m, "status")
	runs, _ := m["models"].([]any)[0].(map[string]any)["slot_runs"].([]any)
	if len(runs) == 0 || runs[0].(map[string]any)["version"] == nil || runs[0].(map[string]any)["weight"] == nil {
		t.Fatalf("slot_runs entries want version and weight:\n%s", body)
	}
}
