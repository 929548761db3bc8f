package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestReportListsSkipsAndFailures(t *testing.T) {
	in := strings.Join([]string{
		`{"Action":"run","Package":"p","Test":"TestA"}`,
		`{"Action":"output","Package":"p","Test":"TestA","Output":"=== RUN   TestA\n"}`,
		`{"Action":"output","Package":"p","Test":"TestA","Output":"    a_test.go:9: no envoy on PATH; set ENVOY_BIN\n"}`,
		`{"Action":"output","Package":"p","Test":"TestA","Output":"--- SKIP: TestA (0.00s)\n"}`,
		`{"Action":"skip","Package":"p","Test":"TestA"}`,
		`{"Action":"output","Package":"p","Test":"TestB","Output":"    b_test.go:3: want 2, got 3\n"}`,
		`{"Action":"fail","Package":"p","Test":"TestB"}`,
		`{"Action":"pass","Package":"p","Test":"TestC"}`,
		`{"Action":"output","Package":"p","Output":"PASS\n"}`,
		`{"Action":"output","Package":"p","Output":"FAIL\tp\t0.1s\n"}`,
		`{"Action":"fail","Package":"p"}`,
		`{"Action":"build-output","ImportPath":"q [q.test]","Output":"q/x.go:1: syntax error\n"}`,
		`{"Action":"build-fail","ImportPath":"q [q.test]"}`,
		`not json`,
	}, "\n")
	var out bytes.Buffer
	if rc := run(strings.NewReader(in), &out); rc != 1 {
		t.Errorf("exit %d, want 1", rc)
	}
	got := out.String()
	for _, want := range []string{
		"want 2, got 3",
		"FAIL\tp\t0.1s",
		"q/x.go:1: syntax error",
		"not json",
		"skipped (1):\n  p TestA: a_test.go:9: no envoy on PATH; set ENVOY_BIN\n",
		"1 passed, 1 failed, 1 skipped\n",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q:\n%s", want, got)
		}
	}

	out.Reset()
	if rc := run(strings.NewReader(`{"Action":"pass","Package":"p","Test":"TestC"}`), &out); rc != 0 {
		t.Errorf("all passed: exit %d, want 0", rc)
	}
}
