package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"go.yaml.in/yaml/v3"

	"github.com/patchbay-io/patchbay/api/headers"
	"github.com/patchbay-io/patchbay/modelhost"
)

// featureNameRE is model.yaml's feature name rule.
var featureNameRE = regexp.MustCompile(`^[a-z0-9_]{1,64}$`)

// exampleFeatures are the feature store's example contents: entity → feature → value.
type exampleFeatures map[string]map[string]float64

// parseFeatureFile reads an examples feature file: a YAML mapping of entity (the entity
// header's value, e.g. a user id) to a mapping of feature name to number. Every mistake
// is reported with file:line, all at once.
func parseFeatureFile(name string, b []byte) (exampleFeatures, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	out := exampleFeatures{}
	if len(doc.Content) == 0 {
		return out, nil // empty file: nothing to load
	}
	var errs []error
	bad := func(n *yaml.Node, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s:%d: %s", name, n.Line, fmt.Sprintf(format, args...)))
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		bad(root, "want a mapping of entity (e.g. user id) to {feature: value}")
		return nil, errors.Join(errs...)
	}
	for i := 0; i+1 < len(root.Content); i += 2 {
		k, v := root.Content[i], root.Content[i+1]
		entity := k.Value
		switch {
		case k.Kind != yaml.ScalarNode || entity == "":
			bad(k, "an entity must be a non-empty string")
			continue
		case len(entity) > 256 || strings.ContainsFunc(entity, func(r rune) bool { return r < 0x21 || r == 0x7f }):
			bad(k, "entity %q: at most 256 bytes, no spaces or control characters (it is a header value)", entity)
			continue
		case out[entity] != nil:
			bad(k, "entity %q is listed twice", entity)
			continue
		}
		if v.Kind != yaml.MappingNode {
			bad(v, "entity %q: want a mapping of feature name to number", entity)
			continue
		}
		vals := map[string]float64{}
		for j := 0; j+1 < len(v.Content); j += 2 {
			fk, fv := v.Content[j], v.Content[j+1]
			if fk.Kind != yaml.ScalarNode || !featureNameRE.MatchString(fk.Value) {
				bad(fk, "entity %q: feature name %q is not [a-z0-9_]{1,64}", entity, fk.Value)
				continue
			}
			if _, dup := vals[fk.Value]; dup {
				bad(fk, "entity %q: feature %q is listed twice", entity, fk.Value)
				continue
			}
			x, err := strconv.ParseFloat(fv.Value, 64)
			if fv.Kind != yaml.ScalarNode || err != nil || math.IsNaN(x) || math.IsInf(x, 0) {
				bad(fv, "entity %q: feature %q: want a finite number, got %q", entity, fk.Value, fv.Value)
				continue
			}
			vals[fk.Value] = x
		}
		out[entity] = vals
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return out, nil
}

// loadFeatureFile reads the examples feature file; a default path that does not exist
// is no features (an examples directory without any), an explicit one is an error.
func loadFeatureFile(path string, explicit bool) (exampleFeatures, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) && !explicit {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return parseFeatureFile(path, b)
}

// startFeatureStore gives the model hosts a feature store: the Redis at --feature-store,
// or a redis-server it starts (the one --redis-server names, else redis-server on PATH)
// on a free loopback port, without persistence, in the run's directory, stopped with the
// rest. It then loads the example features. It returns the address for the model hosts'
// --feature-store ("" when there is none) and fails open: without a Redis, every part
// still starts and store features take their declared defaults (the note says so).
func (u *upRun) startFeatureStore(ctx context.Context) (addr string) {
	c := u.cfg
	if c.featureStore != "" {
		u.featureNote = "Redis " + c.featureStore + " (--feature-store)"
		u.loadFeatures(ctx, c.featureStore)
		return c.featureStore
	}
	noStore := func(why string) string {
		u.featureNote = fmt.Sprintf("none: %s; store features take their defaults (apt-get install redis-server, or --feature-store HOST:PORT for a running Redis)", why)
		u.log.printf("up", "feature store: %s", u.featureNote)
		return ""
	}
	bin := c.redisServer
	switch bin {
	case "off":
		u.featureNote = "none (--redis-server off); store features take their defaults"
		return ""
	case "auto":
		p, err := exec.LookPath("redis-server")
		if err != nil {
			return noStore("no redis-server on PATH")
		}
		bin = p
	default:
		if _, err := exec.LookPath(bin); err != nil {
			return noStore(fmt.Sprintf("--redis-server %s: %v", bin, err))
		}
	}
	if ctx.Err() != nil {
		return ""
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return noStore(fmt.Sprintf("no free loopback port: %v", err))
	}
	addr = l.Addr().String()
	l.Close()
	_, port, _ := net.SplitHostPort(addr)
	dir := filepath.Join(u.dir, "redis")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return noStore(err.Error())
	}
	args := []string{"--port", port, "--bind", "127.0.0.1", "--protected-mode", "yes",
		"--save", "", "--appendonly", "no", "--dir", dir, "--loglevel", "warning",
		// Its startup banner and warnings go to a file in the run's directory, named
		// when it fails to start.
		"--logfile", filepath.Join(dir, "redis.log")}
	p, err := u.spawn("redis", bin, args)
	if err != nil {
		return noStore(err.Error())
	}
	if err := waitRedis(ctx, p, addr, c.readyTimeout); err != nil {
		u.parts = slices.DeleteFunc(u.parts, func(q *part) bool { return q == p })
		p.stop(c.stopGrace)
		msg := fmt.Sprintf("%s did not start: %v", bin, err)
		if log, rerr := os.ReadFile(filepath.Join(dir, "redis.log")); rerr == nil && len(log) > 0 {
			msg += fmt.Sprintf(" (its log: %q)", lastLines(string(log), 3))
		}
		return noStore(msg)
	}
	u.log.printf("up", "redis is ready (%s)", addr)
	u.featureNote = "Redis " + addr + " (" + filepath.Base(bin) + ", no persistence, stopped with the rest)"
	u.loadFeatures(ctx, addr)
	return addr
}

// waitRedis pings the Redis at addr until it answers, p exits, ctx ends or timeout passes.
func waitRedis(ctx context.Context, p *part, addr string, timeout time.Duration) error {
	rc := redis.NewClient(&redis.Options{Addr: addr, Protocol: 2, DisableIdentity: true, MaxRetries: -1})
	defer rc.Close()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		pctx, cancel := context.WithTimeout(ctx, time.Second)
		err := rc.Ping(pctx).Err()
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-p.done:
			return &exitedError{name: p.name, err: p.err}
		case <-deadline.C:
			return fmt.Errorf("no PONG from %s after %v: %v", addr, timeout, err)
		case <-tick.C:
		}
	}
}

// loadFeatures writes the example features into the Redis at addr, one HSET per entity
// (the model hosts' key layout, modelhost.FeatureKeyPrefix + entity) in one pipeline. A
// failure is logged, not fatal (the features then take their defaults).
func (u *upRun) loadFeatures(ctx context.Context, addr string) {
	f := u.cfg.features
	if len(f) == 0 {
		return
	}
	opt := &redis.Options{Addr: addr, Protocol: 2, DisableIdentity: true}
	if strings.Contains(addr, "://") {
		var err error
		if opt, err = redis.ParseURL(addr); err != nil {
			u.log.printf("up", "warning: example features not loaded: %v", err)
			return
		}
	}
	rc := redis.NewClient(opt)
	defer rc.Close()
	entities := make([]string, 0, len(f))
	for e := range f {
		entities = append(entities, e)
	}
	slices.Sort(entities)
	lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err := rc.Pipelined(lctx, func(p redis.Pipeliner) error {
		for _, e := range entities {
			var kv []any
			names := make([]string, 0, len(f[e]))
			for n := range f[e] {
				names = append(names, n)
			}
			slices.Sort(names)
			for _, n := range names {
				kv = append(kv, n, strconv.FormatFloat(f[e][n], 'g', -1, 64))
			}
			if len(kv) > 0 {
				p.HSet(lctx, modelhost.FeatureKeyPrefix+e, kv...)
			}
		}
		return nil
	})
	if err != nil {
		u.log.printf("up", "warning: example features not loaded into %s: %v (store features take their defaults)", addr, err)
		return
	}
	u.featureEntities = entities
	u.log.printf("up", "loaded the features of %d entities from %s into %s (%s<entity>)", len(entities), u.cfg.featureFile, addr, modelhost.FeatureKeyPrefix)
}

// featureModel is the example model whose input the model hosts assemble from the
// x-device header and the user's stored features (examples/models/propensity).
const featureModel = "propensity"

// featureUsers are two entities of the example features for the tour, or nil when the
// examples have no feature model or fewer than two users.
func (u *upRun) featureUsers() []string {
	if st, err := os.Stat(filepath.Join(u.cfg.repository, featureModel)); err != nil || !st.IsDir() || len(u.cfg.features) < 2 {
		return nil
	}
	users := make([]string, 0, len(u.cfg.features))
	for e := range u.cfg.features {
		users = append(users, e)
	}
	slices.Sort(users)
	return users[:2]
}

// printFeatureTry prints the tour's feature step: the same request from two users,
// whose client sends only what it knows (headers, no input), answered differently
// because the model host adds each user's stored features.
func (u *upRun) printFeatureTry(b *strings.Builder, curl string) {
	users := u.featureUsers()
	if users == nil {
		return
	}
	why := "each user's stored features (" + u.cfg.featureFile + ") make the answers differ"
	if len(u.featureEntities) == 0 {
		why = "no example features in a feature store here, so both answers use the defaults"
	}
	fmt.Fprintf(b, "  # features: %s's client sends only what it knows (%s, x-device, no input); the host adds\n", featureModel, headers.UserID)
	fmt.Fprintf(b, "  # the user's features from Redis: %s\n", why)
	for _, user := range users {
		fmt.Fprintf(b, "  %s -s -H '%s: %s' -H 'x-device: mobile' -d '{\"inputs\":[]}' %s/v2/models/%s/infer\n",
			curl, headers.UserID, user, u.url(u.cfg.hostHTTP[0], ""), featureModel)
	}
}

// lastLines is the last n lines of s.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
