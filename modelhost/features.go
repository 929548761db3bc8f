package modelhost

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/patchbay-io/patchbay/api/headers"
	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

// Feature extraction (issue 15): a model version's model.yaml may declare features the
// client does not send. Each fills one column of an input tensor from the request's
// context (a header, the hour of the request) or from the online store (Redis). The host
// assembles an input from its features whenever the client leaves that input out.

// Feature sources.
const (
	sourceHeader = "header" // a request header: numeric, or mapped through map
	sourceHour   = "hour"   // the request's hour of day, UTC (0..23)
	sourceStore  = "store"  // the Redis hash patchbay:features:<entity>, field = feature name
	// sourceIdentity: who is asking. identity: known = 1 when the identity header
	// (x-user-id unless header: says otherwise) is present, else 0; identity: bucket = the
	// router's sticky bucket (x-patchbay-bucket, a decimal uint64) as value/2^64 in [0, 1).
	sourceIdentity = "identity"
)

// Kinds of identity feature.
const (
	identityKnown  = "known"
	identityBucket = "bucket"
)

// FeatureKeyPrefix starts the Redis key of an entity's features: the hash
// FeatureKeyPrefix + <entity> holds one field per feature name.
const FeatureKeyPrefix = "patchbay:features:"

// Feature store defaults.
const (
	DefaultFeatureTimeout   = 20 * time.Millisecond
	DefaultFeatureCacheSize = 10000
	DefaultFeatureCacheTTL  = time.Second
)

// Reasons a feature took its default (the reason label of
// patchbay_modelhost_feature_defaults_total).
const (
	reasonMissing    = iota // no header / no value stored for the entity
	reasonInvalid           // a value that is not a number / not in map
	reasonNoEntity          // the entity header is absent
	reasonTimeout           // the store did not answer within the timeout
	reasonStoreError        // the store is down or failed
	reasonNoStore           // the host has no feature store configured
	numReasons
)

var reasonNames = [numReasons]string{"missing", "invalid", "no_entity", "timeout", "store_error", "no_store"}

type yamlFeature struct {
	Name     string             `yaml:"name"`
	Input    string             `yaml:"input"`
	Column   int                `yaml:"column"`
	Source   string             `yaml:"source"`
	Header   string             `yaml:"header"`
	Map      map[string]float64 `yaml:"map"`
	Entity   string             `yaml:"entity"`
	Identity string             `yaml:"identity"`
	Default  *float64           `yaml:"default"`
	Required bool               `yaml:"required"`
}

// featureSpec is one checked feature of a version.
type featureSpec struct {
	Name, Input, Source string
	Column              int
	Header              string // header and identity sources: lower-case header name read
	Identity            string // identity source: known or bucket
	Map                 map[string]float64
	Default             float64
	Required            bool
}

// featureInput is an input tensor assembled from features, one per column.
type featureInput struct {
	Name     string
	Datatype tensor.Datatype
	Shape    []int64 // the signature's: [-1, n] or [n]
	Cols     []int   // Cols[c] = index into Features
}

var featureNameRE = regexp.MustCompile(`^[a-z0-9_]{1,64}$`)
var headerNameRE = regexp.MustCompile(`^[a-z0-9-]{1,128}$`)

// checkFeatures validates model.yaml's features against the inputs; bad reports with
// file:line. It returns the features, the inputs they fill, and the entity header of the
// store features ("" when none).
func checkFeatures(in []yamlFeature, inputs []tensor.Meta, bad func(path []any, format string, args ...any)) ([]featureSpec, []featureInput, string) {
	if len(in) == 0 {
		return nil, nil, ""
	}
	seen := map[string]bool{}
	var out []featureSpec
	var fins []featureInput
	finIdx := map[string]int{}
	entity := ""
	for i, f := range in {
		at := func(field string) []any {
			if field == "" {
				return []any{"features", i}
			}
			return []any{"features", i, field}
		}
		ok := true
		switch {
		case !featureNameRE.MatchString(f.Name):
			bad(at("name"), "features[%d].name: %q, want 1-64 of [a-z0-9_]", i, f.Name)
			ok = false
		case seen[f.Name]:
			bad(at("name"), "features[%d].name: %q twice", i, f.Name)
			ok = false
		}
		seen[f.Name] = true
		var meta *tensor.Meta
		for j := range inputs {
			if inputs[j].Name == f.Input {
				meta = &inputs[j]
			}
		}
		cols := 0
		if meta == nil {
			bad(at("input"), "features[%d].input: %q is not one of the inputs", i, f.Input)
			ok = false
		} else {
			switch {
			case meta.Datatype != tensor.FP32 && meta.Datatype != tensor.FP64:
				bad(at("input"), "features[%d].input: %q is %s; features fill FP32 or FP64 inputs", i, f.Input, meta.Datatype)
				ok = false
			case len(meta.Shape) == 2 && meta.Shape[0] == -1 && meta.Shape[1] > 0:
				cols = int(meta.Shape[1])
			case len(meta.Shape) == 1 && meta.Shape[0] > 0:
				cols = int(meta.Shape[0])
			default:
				bad(at("input"), "features[%d].input: %q has shape %v; features fill [-1, n] or [n]", i, f.Input, meta.Shape)
				ok = false
			}
		}
		if cols > 0 && (f.Column < 0 || f.Column >= cols) {
			bad(at("column"), "features[%d].column: %d, want 0..%d", i, f.Column, cols-1)
			ok = false
		}
		switch f.Source {
		case sourceHeader:
			if !headerNameRE.MatchString(strings.ToLower(f.Header)) {
				bad(at("header"), "features[%d].header: %q, want a header name (e.g. x-country)", i, f.Header)
			}
		case sourceStore:
			e := strings.ToLower(f.Entity)
			switch {
			case !headerNameRE.MatchString(e):
				bad(at("entity"), "features[%d].entity: %q, want the header naming the entity (e.g. x-user-id)", i, f.Entity)
			case entity != "" && e != entity:
				bad(at("entity"), "features[%d].entity: %q, but an earlier feature uses %q; one entity per version (one Redis round trip)", i, f.Entity, entity)
			default:
				entity = e
			}
		case sourceIdentity:
			switch f.Identity {
			case identityKnown:
				if f.Header == "" {
					f.Header = headers.UserID
				} else if !headerNameRE.MatchString(strings.ToLower(f.Header)) {
					bad(at("header"), "features[%d].header: %q, want the identity header's name (default x-user-id)", i, f.Header)
				}
			case identityBucket:
				if f.Header != "" {
					bad(at("header"), "features[%d].header: identity bucket always reads %s (set by the router)", i, headers.Bucket)
				}
				f.Header = headers.Bucket
			default:
				bad(at("identity"), "features[%d].identity: %q, want known or bucket", i, f.Identity)
			}
		case sourceHour:
		default:
			bad(at("source"), "features[%d].source: %q, want header, hour or store, or identity", i, f.Source)
		}
		if f.Source != sourceIdentity && f.Identity != "" {
			bad(at("identity"), "features[%d].identity: only source identity has one", i)
		}
		if f.Source != sourceHeader && f.Map != nil {
			bad(at("map"), "features[%d].map: only source header has a map", i)
		}
		if f.Source != sourceHeader && f.Source != sourceIdentity && f.Header != "" {
			bad(at("header"), "features[%d].header: only sources header and identity read a header", i)
		}
		if f.Source != sourceStore && f.Entity != "" {
			bad(at("entity"), "features[%d].entity: only source store has an entity", i)
		}
		for k, x := range f.Map {
			if math.IsNaN(x) || math.IsInf(x, 0) {
				bad(at("map"), "features[%d].map[%q]: %v, want a finite number", i, k, x)
			}
		}
		def := 0.0
		if f.Default != nil {
			def = *f.Default
			if math.IsNaN(def) || math.IsInf(def, 0) {
				bad(at("default"), "features[%d].default: %v, want a finite number", i, def)
			}
		} else if !f.Required && f.Source != sourceHour && !(f.Source == sourceIdentity && f.Identity == identityKnown) {
			bad(at(""), "features[%d]: default missing (required for a feature that is not required: it is used when the value is absent)", i)
		}
		if !ok {
			continue
		}
		k, has := finIdx[f.Input]
		if !has {
			k = len(fins)
			finIdx[f.Input] = k
			c := make([]int, cols)
			for j := range c {
				c[j] = -1
			}
			fins = append(fins, featureInput{Name: meta.Name, Datatype: meta.Datatype, Shape: meta.Shape, Cols: c})
		}
		if prev := fins[k].Cols[f.Column]; prev >= 0 {
			bad(at("column"), "features[%d].column: %s column %d is already filled by %q", i, f.Input, f.Column, out[prev].Name)
			continue
		}
		fins[k].Cols[f.Column] = len(out)
		out = append(out, featureSpec{Name: f.Name, Input: f.Input, Source: f.Source, Column: f.Column,
			Header: strings.ToLower(f.Header), Identity: f.Identity, Map: f.Map, Default: def, Required: f.Required})
	}
	for _, fi := range fins {
		for c, j := range fi.Cols {
			if j < 0 {
				bad([]any{"features"}, "features: input %q column %d has no feature (an assembled input needs every column)", fi.Name, c)
			}
		}
	}
	return out, fins, entity
}

// featureStore is the host's connection to Redis plus a bounded local cache.
type featureStore struct {
	client   *redis.Client // nil: no store configured
	timeout  time.Duration
	ttl      time.Duration
	max      int
	defaults metric.Int64Counter
	trips    metric.Int64Counter // round trips to Redis (an HMGET or a pipeline)

	mu    sync.Mutex
	cache map[string]cacheEntry
}

type cacheEntry struct {
	vals []any // HMGET's answer: string or nil per field
	exp  time.Time
}

func newFeatureStore(cfg *Config, mp metric.MeterProvider) (*featureStore, error) {
	fs := &featureStore{timeout: cfg.FeatureTimeout, ttl: cfg.FeatureCacheTTL, max: cfg.FeatureCacheSize, cache: map[string]cacheEntry{}}
	if fs.timeout <= 0 {
		fs.timeout = DefaultFeatureTimeout
	}
	if fs.ttl == 0 {
		fs.ttl = DefaultFeatureCacheTTL
	}
	if fs.max == 0 {
		fs.max = DefaultFeatureCacheSize
	}
	var err error
	fs.defaults, err = mp.Meter("github.com/patchbay-io/patchbay/modelhost").Int64Counter("patchbay_modelhost_feature_defaults",
		metric.WithDescription("Features that took their declared default, by model, version, feature and reason (missing, invalid, no_entity, timeout, store_error, no_store)."))
	if err != nil {
		return nil, err
	}
	fs.trips, err = mp.Meter("github.com/patchbay-io/patchbay/modelhost").Int64Counter("patchbay_modelhost_feature_store_round_trips",
		metric.WithDescription("Round trips to the feature store (one HMGET, or one pipeline of HMGETs for a dynamic batch's lookups), by model and version."))
	if err != nil {
		return nil, err
	}
	if cfg.FeatureStore != "" {
		opt := &redis.Options{Addr: cfg.FeatureStore, Protocol: 2, DisableIdentity: true, ContextTimeoutEnabled: true,
			MaxRetries: -1, DialTimeout: fs.timeout, ReadTimeout: fs.timeout, WriteTimeout: fs.timeout, PoolTimeout: fs.timeout}
		if strings.Contains(cfg.FeatureStore, "://") {
			if opt, err = redis.ParseURL(cfg.FeatureStore); err != nil {
				return nil, fmt.Errorf("feature store: %w", err)
			}
			opt.Protocol, opt.DisableIdentity, opt.ContextTimeoutEnabled, opt.MaxRetries = 2, true, true, -1
			opt.DialTimeout, opt.ReadTimeout, opt.WriteTimeout, opt.PoolTimeout = fs.timeout, fs.timeout, fs.timeout, fs.timeout
		}
		fs.client = redis.NewClient(opt)
	}
	return fs, nil
}

func (fs *featureStore) close() {
	if fs != nil && fs.client != nil {
		_ = fs.client.Close()
	}
}

// cached answers a cache key's values while they are fresh.
func (fs *featureStore) cached(ck string, now time.Time) ([]any, bool) {
	if fs.ttl <= 0 {
		return nil, false
	}
	fs.mu.Lock()
	e, ok := fs.cache[ck]
	fs.mu.Unlock()
	if ok && now.Before(e.exp) {
		return e.vals, true
	}
	return nil, false
}

// remember caches an answer of the store (never an error).
func (fs *featureStore) remember(ck string, vals []any, now time.Time) {
	if fs.ttl <= 0 {
		return
	}
	fs.mu.Lock()
	if _, ok := fs.cache[ck]; !ok && len(fs.cache) >= fs.max {
		for k := range fs.cache { // evict one arbitrary entry (map order is random)
			delete(fs.cache, k)
			break
		}
	}
	fs.cache[ck] = cacheEntry{vals: vals, exp: now.Add(fs.ttl)}
	fs.mu.Unlock()
}

// errReason names a failed store call: timeout or store_error.
func errReason(err error) int {
	var ne net.Error
	if errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()) {
		return reasonTimeout
	}
	return reasonStoreError
}

// fetch answers an entity's store features from the cache, else with one HMGET (no
// batching) or through the version's coalescer (dynamic batching); reason is -1 on success.
func (p *featurePlan) fetch(ctx context.Context, ent string) ([]any, int) {
	fs := p.store
	if fs.client == nil {
		return nil, reasonNoStore
	}
	key := FeatureKeyPrefix + ent
	now := time.Now()
	if vals, ok := fs.cached(p.prefix+key, now); ok {
		return vals, -1
	}
	if p.co != nil {
		return p.co.fetch(ctx, key)
	}
	ctx, cancel := context.WithTimeout(ctx, fs.timeout)
	vals, err := fs.client.HMGet(ctx, key, p.fields...).Result()
	cancel()
	fs.trips.Add(ctx, 1, p.tripOpt)
	if err != nil {
		return nil, errReason(err)
	}
	fs.remember(p.prefix+key, vals, now)
	return vals, -1
}

// coalescer joins the cache misses of a version with dynamic batching into pipelines,
// keeping about one round trip outstanding (Nagle off): a miss that finds no pipeline of
// the version in flight goes out at once, from its own goroutine, as a pipeline of one;
// misses that arrive while one is in flight gather, and the gathering goes out as one
// go-redis pipeline (an HMGET per distinct entity) as soon as a pipeline returns, when
// max lookups joined, or at the batch window as a bound. Low load pays no window; high
// load shares round trips. Each waiter waits at most the store timeout from its own
// arrival. No goroutine lives between gatherings (a pipeline's goroutine, or a timer).
type coalescer struct {
	p      *featurePlan
	window time.Duration
	max    int
	after  func(time.Duration, func()) *time.Timer // time.AfterFunc; tests watch the window's timers

	mu       sync.Mutex
	cur      *gathering // open, waiting for a pipeline to return
	inflight int        // pipelines sent and not yet returned
}

// gathering is one pipeline's lookups and, once done is closed, their answers.
type gathering struct {
	keys    []string
	idx     map[string]int
	waiters int
	timer   *time.Timer
	done    chan struct{}
	vals    [][]any
	reasons []int
}

func newCoalescer(p *featurePlan, window time.Duration, max int) *coalescer {
	// The window leaves each waiter at least half its timeout for the round trip.
	return &coalescer{p: p, window: min(window, p.store.timeout/2), max: max, after: time.AfterFunc}
}

func (c *coalescer) fetch(ctx context.Context, key string) ([]any, int) {
	c.mu.Lock()
	if c.cur == nil && (c.inflight == 0 || c.window <= 0) {
		// Nothing in flight: this lookup goes out now, alone; its request's context
		// bounds it (no one else waits on it).
		c.inflight++
		c.mu.Unlock()
		g := &gathering{keys: []string{key}, waiters: 1, done: make(chan struct{})}
		ctx, cancel := context.WithTimeout(ctx, c.p.store.timeout)
		defer cancel()
		c.send(ctx, g)
		if g.reasons[0] >= 0 && ctx.Err() != nil {
			return nil, reasonTimeout
		}
		return g.vals[0], g.reasons[0]
	}
	wait := time.NewTimer(c.p.store.timeout)
	defer wait.Stop()
	g := c.cur
	if g == nil {
		g = &gathering{idx: map[string]int{}, done: make(chan struct{})}
		c.cur = g
		g.timer = c.after(c.window, func() { c.flush(g) })
	}
	i, ok := g.idx[key]
	if !ok {
		i = len(g.keys)
		g.idx[key] = i
		g.keys = append(g.keys, key)
	}
	g.waiters++
	full := g.waiters >= c.max
	if full {
		c.take(g)
	}
	c.mu.Unlock()
	if full {
		go c.sendDetached(g)
	}
	select {
	case <-g.done:
		return g.vals[i], g.reasons[i]
	case <-wait.C:
		return nil, reasonTimeout
	case <-ctx.Done():
		return nil, reasonTimeout
	}
}

// take closes the open gathering g for sending (c.mu held): a timer that fires
// meanwhile finds it gone.
func (c *coalescer) take(g *gathering) {
	c.cur = nil
	c.inflight++
	if g.timer != nil {
		g.timer.Stop()
	}
}

// flush sends g when its window ends, unless it went out already.
func (c *coalescer) flush(g *gathering) {
	c.mu.Lock()
	mine := c.cur == g
	if mine {
		c.take(g)
	}
	c.mu.Unlock()
	if mine {
		c.sendDetached(g)
	}
}

// sendDetached sends a gathering that no single request owns, bounded by the store
// timeout alone.
func (c *coalescer) sendDetached(g *gathering) {
	ctx, cancel := context.WithTimeout(context.Background(), c.p.store.timeout)
	defer cancel()
	c.send(ctx, g)
}

// send fetches every key of g in one round trip, within ctx (which the caller bounds by
// the store timeout), and wakes its waiters; once Redis answered, the gathering that
// opened meanwhile goes out.
func (c *coalescer) send(ctx context.Context, g *gathering) {
	fs, p := c.p.store, c.p
	g.vals, g.reasons = make([][]any, len(g.keys)), make([]int, len(g.keys))
	cmds := make([]*redis.SliceCmd, len(g.keys))
	if len(g.keys) == 1 {
		cmds[0] = fs.client.HMGet(ctx, g.keys[0], p.fields...)
	} else {
		pipe := fs.client.Pipeline()
		for i, k := range g.keys {
			cmds[i] = pipe.HMGet(ctx, k, p.fields...)
		}
		_, _ = pipe.Exec(ctx) // each command carries its own error
	}
	c.mu.Lock()
	c.inflight--
	next := c.cur
	if next != nil {
		c.take(next)
	}
	c.mu.Unlock()
	if next != nil {
		go c.sendDetached(next)
	}
	fs.trips.Add(ctx, 1, p.tripOpt)
	now := time.Now()
	for i, cmd := range cmds {
		vals, err := cmd.Result()
		if err != nil {
			g.reasons[i] = errReason(err)
			continue
		}
		g.vals[i], g.reasons[i] = vals, -1
		fs.remember(p.prefix+g.keys[i], vals, now)
	}
	close(g.done)
}

// featurePlan is a version's features, built at load.
type featurePlan struct {
	feats  []featureSpec
	inputs []featureInput
	entity string   // header naming the entity of store features
	fields []string // store feature names, in order
	field  []int    // by feature: index into fields, -1 when not a store feature
	in     []int    // by feature: index into inputs of the input it fills
	prefix string   // cache key prefix: model/version
	store  *featureStore
	co     *coalescer // dynamic batching: store lookups share pipelines; nil: one HMGET each
	// tripOpt: the round-trip counter's attributes (model, version).
	tripOpt metric.AddOption
	// opts[i][r]: the counter attributes of feature i, reason r.
	opts [][numReasons]metric.AddOption
}

func newFeaturePlan(spec *versionSpec, fs *featureStore) *featurePlan {
	if len(spec.Features) == 0 {
		return nil
	}
	p := &featurePlan{feats: spec.Features, inputs: spec.FeatureInputs, entity: spec.FeatureEntity,
		prefix: spec.Model + "/" + spec.Version + "\x00", store: fs}
	for _, f := range spec.Features {
		idx := -1
		if f.Source == sourceStore {
			idx = len(p.fields)
			p.fields = append(p.fields, f.Name)
		}
		p.field = append(p.field, idx)
		var o [numReasons]metric.AddOption
		for r := range o {
			o[r] = metric.WithAttributeSet(attribute.NewSet(attribute.String("model", spec.Model), attribute.String("version", spec.Version),
				attribute.String("feature", f.Name), attribute.String("reason", reasonNames[r])))
		}
		p.opts = append(p.opts, o)
	}
	p.in = make([]int, len(p.feats))
	for k, fi := range p.inputs {
		for _, j := range fi.Cols {
			if j >= 0 { // checkFeatures refuses a gap; kept safe for any spec
				p.in[j] = k
			}
		}
	}
	p.tripOpt = metric.WithAttributeSet(attribute.NewSet(attribute.String("model", spec.Model), attribute.String("version", spec.Version)))
	if spec.MaxBatch > 0 && len(p.fields) > 0 {
		p.co = newCoalescer(p, spec.MaxDelay, spec.MaxBatch)
	}
	return p
}

// assemble appends to in every feature-filled input the client left out. get reads a
// request header (lower-case name).
func (p *featurePlan) assemble(ctx context.Context, get func(string) string, in []*tensor.Tensor) ([]*tensor.Tensor, *apiError) {
	var missing []int
	for k := range p.inputs {
		sent := false
		for _, t := range in {
			if t.Name == p.inputs[k].Name {
				sent = true
			}
		}
		if !sent {
			missing = append(missing, k)
		}
	}
	if len(missing) == 0 {
		return in, nil
	}
	rows := int64(1)
	if len(in) > 0 && len(in[0].Shape) > 0 {
		rows = in[0].Shape[0]
	}
	// Only the features of the missing inputs are computed.
	need := func(i int) bool { return slices.Contains(missing, p.in[i]) }
	var stored []any
	storeReason := -1
	if len(p.fields) > 0 {
		needStore := false
		for i, f := range p.feats {
			if f.Source == sourceStore && need(i) {
				needStore = true
			}
		}
		if needStore {
			ent := get(p.entity)
			if ent == "" {
				storeReason = reasonNoEntity
			} else {
				stored, storeReason = p.fetch(ctx, ent)
			}
		}
	}
	vals := make([]float64, len(p.feats))
	for i, f := range p.feats {
		if !need(i) {
			continue
		}
		reason := -1
		var x float64
		switch f.Source {
		case sourceHour:
			x = float64(time.Now().UTC().Hour())
		case sourceHeader:
			x, reason = parseFeature(get(f.Header), f.Map)
		case sourceIdentity:
			if f.Identity == identityKnown {
				if get(f.Header) != "" {
					x = 1
				}
			} else {
				x, reason = parseBucket(get(f.Header))
			}
		case sourceStore:
			if reason = storeReason; reason < 0 {
				s, _ := stored[p.field[i]].(string)
				if stored[p.field[i]] == nil {
					reason = reasonMissing
				} else {
					x, reason = parseFeature(s, nil)
				}
			}
		}
		if reason >= 0 {
			if f.Required {
				return nil, requiredError(f, p.entity, reason)
			}
			x = f.Default
			p.store.defaults.Add(ctx, 1, p.opts[i][reason])
		}
		vals[i] = x
	}
	for _, k := range missing {
		fi := &p.inputs[k]
		n := int64(len(fi.Cols))
		t := &tensor.Tensor{Name: fi.Name, Datatype: fi.Datatype}
		r := rows
		if len(fi.Shape) == 1 {
			r = 1
			t.Shape = []int64{n}
		} else {
			t.Shape = []int64{rows, n}
		}
		if fi.Datatype == tensor.FP32 {
			t.F32 = make([]float32, r*n)
			for row := range r {
				for c, j := range fi.Cols {
					t.F32[row*n+int64(c)] = float32(vals[j])
				}
			}
		} else {
			t.F64 = make([]float64, r*n)
			for row := range r {
				for c, j := range fi.Cols {
					t.F64[row*n+int64(c)] = vals[j]
				}
			}
		}
		in = append(in, t)
	}
	return in, nil
}

// parseFeature turns a header or stored value into a number: through m when given,
// else parsed as a float.
func parseFeature(s string, m map[string]float64) (float64, int) {
	if s == "" {
		return 0, reasonMissing
	}
	if m != nil {
		if x, ok := m[s]; ok {
			return x, -1
		}
		return 0, reasonInvalid
	}
	x, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
	if err != nil || math.IsNaN(x) || math.IsInf(x, 0) {
		return 0, reasonInvalid
	}
	return x, -1
}

// parseBucket maps the router's sticky bucket, a decimal uint64, to [0, 1): its top 53
// bits over 2^53, so the largest bucket stays below 1 in float64.
func parseBucket(s string) (float64, int) {
	if s == "" {
		return 0, reasonMissing
	}
	u, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, reasonInvalid
	}
	return float64(u>>11) / (1 << 53), -1
}

func requiredError(f featureSpec, entity string, reason int) *apiError {
	switch reason {
	case reasonTimeout, reasonStoreError, reasonNoStore:
		return errUnavailable("required feature %q: the feature store could not answer (%s)", f.Name, reasonNames[reason])
	case reasonNoEntity:
		return errInvalid("required feature %q: header %s (the entity) is missing", f.Name, entity)
	case reasonInvalid:
		return errInvalid("required feature %q: value is not usable (want a number%s)", f.Name, map[bool]string{true: " or one of the mapped values", false: ""}[f.Map != nil])
	}
	if f.Source == sourceHeader || f.Source == sourceIdentity {
		return errInvalid("required feature %q: header %s is missing", f.Name, f.Header)
	}
	return errInvalid("required feature %q has no value for this entity", f.Name)
}
