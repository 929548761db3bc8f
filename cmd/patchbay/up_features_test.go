package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.yaml.in/yaml/v3"

	"github.com/patchbay-io/patchbay/test/harness"
)

// featureReference computes what examples/models/propensity/v1 must answer for a user
// and an x-device value, from the committed files alone (model.yaml's features, the
// linear model's weights, examples/features.yaml), read here independently of up's
// parser: logistic(w·x+b) over float32 inputs. stored=false: the features' defaults.
func featureReference(t *testing.T, user, device string, stored bool) float64 {
	t.Helper()
	examples := filepath.Join("..", "..", "examples")
	var spec struct {
		Features []struct {
			Name    string             `yaml:"name"`
			Column  int                `yaml:"column"`
			Source  string             `yaml:"source"`
			Header  string             `yaml:"header"`
			Map     map[string]float64 `yaml:"map"`
			Default float64            `yaml:"default"`
		} `yaml:"features"`
	}
	var lin struct {
		Weights []float64 `json:"weights"`
		Bias    float64   `json:"bias"`
		Link    string    `json:"link"`
	}
	var users map[string]map[string]float64
	dir := filepath.Join(examples, "models", featureModel, "v1")
	for _, f := range []struct {
		path string
		into any
		json bool
	}{{filepath.Join(dir, "model.yaml"), &spec, false}, {filepath.Join(dir, "linear.json"), &lin, true}, {filepath.Join(examples, "features.yaml"), &users, false}} {
		b, err := os.ReadFile(f.path)
		if err != nil {
			t.Fatal(err)
		}
		if f.json {
			err = json.Unmarshal(b, f.into)
		} else {
			err = yaml.Unmarshal(b, f.into)
		}
		if err != nil {
			t.Fatalf("%s: %v", f.path, err)
		}
	}
	if lin.Link != "logistic" || len(lin.Weights) != len(spec.Features) {
		t.Fatalf("propensity v1: link %q, %d weights for %d features", lin.Link, len(lin.Weights), len(spec.Features))
	}
	z := lin.Bias
	for _, f := range spec.Features {
		x := f.Default
		switch f.Source {
		case "header":
			if v, ok := f.Map[device]; ok && f.Header == "x-device" {
				x = v
			}
		case "store":
			if v, ok := users[user][f.Name]; ok && stored {
				x = v
			}
		default:
			t.Fatalf("feature %s: source %s is not computed by this test", f.Name, f.Source)
		}
		z += lin.Weights[f.Column] * float64(float32(x))
	}
	return 1 / (1 + math.Exp(-z))
}

var featureLineRE = regexp.MustCompile(`-H 'x-user-id: (\S+)' -H 'x-device: (\S+)' .*/v2/models/` + featureModel + `/infer$`)

// runFeatureTour runs the tour's feature lines (curl, as printed, through bash) and
// returns each user's probability.
func runFeatureTour(t *testing.T, banner string) map[string]float64 {
	t.Helper()
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("curl is not on PATH: the tour's lines are curl lines")
	}
	out := map[string]float64{}
	for _, line := range tryLines(t, banner) {
		m := featureLineRE.FindStringSubmatch(line)
		if m == nil || !strings.HasPrefix(line, "curl ") {
			continue
		}
		cmd := exec.Command("bash", "-c", line)
		cmd.Dir = filepath.Join("..", "..")
		b, err := cmd.Output()
		if err != nil {
			t.Fatalf("%s: %v", line, err)
		}
		var resp struct {
			Version string `json:"model_version"`
			Outputs []struct {
				Name string    `json:"name"`
				Data []float64 `json:"data"`
			} `json:"outputs"`
		}
		if err := json.Unmarshal(b, &resp); err != nil || len(resp.Outputs) != 1 || len(resp.Outputs[0].Data) != 1 {
			t.Fatalf("%s answered %s (%v)", line, b, err)
		}
		if m[2] != "mobile" {
			t.Fatalf("the tour sends x-device %q; this test computes the reference for mobile", m[2])
		}
		out[m[1]] = resp.Outputs[0].Data[0]
	}
	if len(out) != 2 {
		t.Fatalf("want the feature step's curl lines for two users in the tour, got %v:\n%s", out, banner)
	}
	return out
}

// TestUpFeatureStore runs `patchbay up` with a real redis-server: up starts it on a free
// loopback port, loads examples/features.yaml and points the model hosts at it; the
// tour's two feature lines (run as printed) answer with the model of each user's stored
// features, which differ; and the redis-server is gone after up stops.
func TestUpFeatureStore(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and starts the patchbay binary")
	}
	redisBin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Skip("redis-server not found (make test-deps installs Debian's redis-server): up's feature store needs one")
	}
	u := startUpForTest(t, "--redis-server", redisBin)
	t.Logf("banner:\n%s", u.banner)
	if !regexp.MustCompile(`feature store +Redis 127\.0\.0\.1:\d+ `).MatchString(u.banner) {
		t.Errorf("banner does not name the Redis up started:\n%s", u.banner)
	}
	got := runFeatureTour(t, u.banner)
	for user, p := range got {
		if want := featureReference(t, user, "mobile", true); math.Abs(p-want) > 1e-6 {
			t.Errorf("%s: prediction %v, want %v (logistic of the stored features)", user, p, want)
		}
		if def := featureReference(t, user, "mobile", false); math.Abs(p-def) < 1e-6 {
			t.Errorf("%s: prediction %v is the one with default features", user, p)
		}
	}
	var ps []float64
	for _, p := range got {
		ps = append(ps, p)
	}
	if ps[0] == ps[1] {
		t.Errorf("both users get %v: their stored features make no difference", ps[0])
	}

	// Stopped with the rest.
	log := u.stderr.String()
	pid, ok := startedPIDs(log)["redis"]
	if !ok {
		t.Fatalf("up did not log starting redis:\n%s", log)
	}
	u.cancel()
	err = <-u.done
	u.done <- err
	for i := 0; !processGone(pid); i++ {
		if i == 100 {
			t.Fatalf("redis-server (pid %d) still runs after up stopped", pid)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestUpWithoutRedisFailsOpen: with no redis-server (--redis-server naming a missing
// file) up still starts everything, says in one line that store features take their
// defaults and how to get a Redis, and the tour's feature lines answer with the defaults.
func TestUpWithoutRedisFailsOpen(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and starts the patchbay binary")
	}
	u := startUpForTest(t, "--redis-server", filepath.Join(t.TempDir(), "no-such-redis-server"))
	var lines []string
	for _, l := range strings.Split(u.stderr.String(), "\n") {
		if strings.Contains(l, "store features take their defaults") {
			lines = append(lines, l)
		}
	}
	if len(lines) != 1 || !strings.Contains(lines[0], "apt-get install redis-server") || !strings.Contains(lines[0], "--feature-store") {
		t.Errorf("want one log line saying features use their defaults and how to get a Redis, got %q", lines)
	}
	if !strings.Contains(u.banner, "feature store    none: ") {
		t.Errorf("banner does not say there is no feature store:\n%s", u.banner)
	}
	for user, p := range runFeatureTour(t, u.banner) {
		if want := featureReference(t, user, "mobile", false); math.Abs(p-want) > 1e-6 {
			t.Errorf("%s without a feature store: prediction %v, want %v (the defaults)", user, p, want)
		}
	}
}

// TestUpFeatureFlags: an explicit --features file that is missing or wrong is a usage
// error naming file:line; the default one is loaded from the examples.
func TestUpFeatureFlags(t *testing.T) {
	t.Parallel()
	examples := filepath.Join("..", "..", "examples")
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(bad, []byte("alice: {visits_7d: 1}\nbob: {Visits: x}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--examples", examples, "--features", filepath.Join(t.TempDir(), "none.yaml")}, "none.yaml"},
		{[]string{"--examples", examples, "--features", bad}, bad + ":2: entity \"bob\": feature name \"Visits\""},
		{[]string{"--examples", examples, "--redis-server", ""}, "--redis-server"},
	} {
		_, err := parseUp(tc.args, io.Discard, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !errors.Is(err, errUsage) {
			t.Errorf("parseUp(%q) = %v, want a usage error containing %q", tc.args, err, tc.want)
		}
	}
	c, err := parseUp([]string{"--examples", examples}, io.Discard, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.redisServer != "auto" || len(c.features) < 2 || c.featureFile != filepath.Join(examples, "features.yaml") {
		t.Errorf("defaults: redis %q, %d entities from %s", c.redisServer, len(c.features), c.featureFile)
	}
	// An examples directory without features.yaml (the canary walk-through) loads none.
	c, err = parseUp([]string{"--examples", filepath.Join(examples, "canary")}, io.Discard, io.Discard)
	if err != nil || len(c.features) != 0 {
		t.Errorf("canary examples: %d entities, %v", len(c.features), err)
	}
}

func TestParseFeatureFile(t *testing.T) {
	t.Parallel()
	got, err := parseFeatureFile("f.yaml", []byte("# users\nu1: {a: 1, b_2: -0.5}\n\"u 2\": {a: 1}\nu3: [1]\nu4: {a: .inf}\nu1: {a: 2}\nu5: {a: 1, a: 2}\n"))
	if got != nil || err == nil {
		t.Fatalf("want errors, got %v", got)
	}
	for _, want := range []string{"f.yaml:3: entity \"u 2\"", "f.yaml:4: entity \"u3\": want a mapping", "f.yaml:5: entity \"u4\": feature \"a\": want a finite number", "f.yaml:6: entity \"u1\" is listed twice", "f.yaml:7: entity \"u5\": feature \"a\" is listed twice"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
	got, err = parseFeatureFile("f.yaml", []byte("u1: {a: 1, b_2: -0.5}\nu2: {}\n"))
	if err != nil || len(got) != 2 || got["u1"]["a"] != 1 || got["u1"]["b_2"] != -0.5 || len(got["u2"]) != 0 {
		t.Errorf("got %v, %v", got, err)
	}
	if got, err := parseFeatureFile("f.yaml", nil); err != nil || len(got) != 0 {
		t.Errorf("empty file: %v, %v", got, err)
	}
	if _, err := parseFeatureFile("f.yaml", []byte("[1, 2]\n")); err == nil || !strings.Contains(err.Error(), "f.yaml:1:") {
		t.Errorf("a list: %v", err)
	}
}

// FuzzParseFeatureFile: any input is parsed or refused without a panic, and what is
// accepted holds only valid names and finite numbers.
func FuzzParseFeatureFile(f *testing.F) {
	for _, s := range []string{"u1: {a: 1}\n", "u1: {a: .nan}\n", "[1]", "a: b", "u: {A: 1}", "&x {a: *x}", ""} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		got, err := parseFeatureFile("f", b)
		if err != nil {
			return
		}
		for e, vals := range got {
			if e == "" || strings.ContainsAny(e, " \t\r\n") {
				t.Errorf("accepted entity %q", e)
			}
			for n, v := range vals {
				if !featureNameRE.MatchString(n) || math.IsNaN(v) || math.IsInf(v, 0) {
					t.Errorf("accepted %s=%v", n, v)
				}
			}
		}
	})
}

// TestUpFeatureStoreDirect drives up's feature store step alone: a redis-server that
// exits at once (false) leaves no store and says so (fail open); --feature-store names a
// running Redis, which up does not start but loads with the example features in the key
// layout the model hosts read (HGETALL patchbay:features:<user>).
func TestUpFeatureStoreDirect(t *testing.T) {
	examples := filepath.Join("..", "..", "examples")
	c, err := parseUp([]string{"--examples", examples}, io.Discard, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	c.readyTimeout, c.stopGrace = 10*time.Second, time.Second
	newRun := func(c upConfig) (*upRun, *harness.Buffer) {
		var log harness.Buffer
		return &upRun{cfg: c, stdout: io.Discard, log: &prefixLog{w: &log}, dir: t.TempDir()}, &log
	}
	if falseBin, err := exec.LookPath("false"); err == nil {
		c := c
		c.redisServer = falseBin
		u, log := newRun(c)
		if addr := u.startFeatureStore(context.Background()); addr != "" || len(u.parts) != 0 {
			t.Errorf("a redis-server that exits: store %q, %d parts left", addr, len(u.parts))
		}
		if !strings.Contains(log.String(), "did not start") || !strings.Contains(u.featureNote, "store features take their defaults") {
			t.Errorf("a redis-server that exits: note %q, log:\n%s", u.featureNote, log.String())
		}
	}

	redisBin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Skip("redis-server not found (make test-deps installs Debian's redis-server)")
	}
	// A running Redis of the user's own (here: one started by up's code for another run).
	own, _ := newRun(upConfig{redisServer: redisBin, readyTimeout: 10 * time.Second, stopGrace: time.Second})
	addr := own.startFeatureStore(context.Background())
	defer own.stopAll()
	if addr == "" {
		t.Fatalf("redis-server did not start: %s", own.featureNote)
	}
	c.featureStore = addr
	u, _ := newRun(c)
	if got := u.startFeatureStore(context.Background()); got != addr || len(u.parts) != 0 {
		t.Fatalf("--feature-store %s: store %q, %d parts started", addr, got, len(u.parts))
	}
	rc := redis.NewClient(&redis.Options{Addr: addr, Protocol: 2, DisableIdentity: true})
	defer rc.Close()
	for user, vals := range c.features {
		got, err := rc.HGetAll(context.Background(), "patchbay:features:"+user).Result()
		if err != nil || len(got) != len(vals) {
			t.Fatalf("HGETALL %s: %v, %v; want %v", user, got, err, vals)
		}
		for name, v := range vals {
			if x, err := strconv.ParseFloat(got[name], 64); err != nil || x != v {
				t.Errorf("%s %s = %q, want %v", user, name, got[name], v)
			}
		}
	}
}
