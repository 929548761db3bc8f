package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestValidateCountsInEnglish: `patchbay rollout validate` says "1 version" and
// "1 experiment", never "1 versions"; the example rollouts have 1 and 2 versions and
// 0 and 1 experiments.
func TestValidateCountsInEnglish(t *testing.T) {
	t.Parallel()
	var stdout, stderr bytes.Buffer
	dir := filepath.Join("..", "..", "examples", "rollouts")
	if err := run(context.Background(), []string{"rollout", "validate", dir}, &stdout, &stderr); err != nil {
		t.Fatalf("validate: %v\n%s", err, stderr.String())
	}
	out := stdout.String()
	for _, want := range []string{
		"model churn: 2 versions, 0 experiments\n",
		"model ranker: 2 versions, 1 experiment\n",
		"model recs: 1 version, 0 experiments\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, " 1 versions") || strings.Contains(out, " 1 experiments") {
		t.Errorf("plural after 1:\n%s", out)
	}
}

// TestMakeUpHelpSaysWhereEnvoyComesFrom: `make help`'s line for `make up` names the
// three places `up --envoy auto` looks for Envoy, in the order it tries them.
func TestMakeUpHelpSaysWhereEnvoyComesFrom(t *testing.T) {
	t.Parallel()
	mk, err := os.ReadFile(filepath.Join("..", "..", "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^up:.*## (.*)$`).FindStringSubmatch(string(mk))
	if m == nil {
		t.Fatal("no `up: ## help` line in the Makefile")
	}
	line, last := m[1], -1
	for _, want := range []string{"ENVOY_BIN", "PATH", "func-e download"} {
		i := strings.Index(line, want)
		if i < 0 || i < last {
			t.Errorf("make up's help line should name %q after the places before it: %q", want, line)
		}
		last = i
	}
}
