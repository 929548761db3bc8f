package modelhost

import (
	"context"
	"net"
	"os/exec"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
)

// coalescerFor starts a real redis-server holding u1..u3 and returns a coalescer over it
// whose window never closes by itself: its timers are counted (armed) and never fire, so
// a lookup that is answered was not waiting for the window.
func coalescerFor(t *testing.T, timeout time.Duration, hooks ...redis.Hook) (*coalescer, *atomic.Int32) {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Skip("redis-server not found (make test-deps installs Debian's redis-server)")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	_, port, _ := net.SplitHostPort(addr)
	cmd := exec.Command(bin, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	admin := redis.NewClient(&redis.Options{Addr: addr, Protocol: 2, DisableIdentity: true})
	defer admin.Close()
	for i := 0; ; i++ {
		err := admin.HSet(context.Background(), FeatureKeyPrefix+"u1", "ctr", "0.1").Err()
		if err == nil {
			break
		} else if i == 100 {
			t.Fatalf("redis-server on %s: %v", addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	admin.HSet(context.Background(), FeatureKeyPrefix+"u2", "ctr", "0.2")
	admin.HSet(context.Background(), FeatureKeyPrefix+"u3", "ctr", "0.3")
	fs, err := newFeatureStore(&Config{FeatureStore: addr, FeatureTimeout: timeout, FeatureCacheTTL: -1}, metricnoop.NewMeterProvider())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fs.close)
	for _, h := range hooks {
		fs.client.AddHook(h)
	}
	p := &featurePlan{fields: []string{"ctr"}, prefix: "scorer/b\x00", store: fs, tripOpt: metric.WithAttributes()}
	c := newCoalescer(p, 200*time.Millisecond, 64)
	armed := new(atomic.Int32)
	var mu sync.Mutex
	var timers []*time.Timer
	c.after = func(_ time.Duration, f func()) *time.Timer {
		armed.Add(1)
		tm := time.AfterFunc(time.Hour, f)
		mu.Lock()
		timers = append(timers, tm)
		mu.Unlock()
		return tm
	}
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, tm := range timers {
			tm.Stop()
		}
	})
	return c, armed
}

// TestCoalescerSendsAtOnceWhenIdle: on a version with dynamic batching (max_delay 200ms),
// a lookup that finds no pipeline in flight goes out at once as a pipeline of one — no
// gathering window is armed for it, and it is answered although the window never closes.
func TestCoalescerSendsAtOnceWhenIdle(t *testing.T) {
	c, armed := coalescerFor(t, 2*time.Second)
	for i := range 3 { // and again once the previous one returned
		vals, reason := c.fetch(context.Background(), FeatureKeyPrefix+"u1")
		if reason != -1 || len(vals) != 1 || vals[0] != "0.1" {
			t.Fatalf("lookup %d: %v, reason %d (%s); want [0.1] from Redis", i, vals, reason, reasonName(reason))
		}
	}
	if n := armed.Load(); n != 0 {
		t.Errorf("%d gathering windows armed for lone lookups, want 0 (sent at once)", n)
	}
}

// blockFirst is a go-redis hook that records every HMGET round trip (its keys) and holds
// the first one until release is closed.
type blockFirst struct {
	entered, release chan struct{}
	mu               sync.Mutex
	trips            [][]string
}

func (b *blockFirst) DialHook(next redis.DialHook) redis.DialHook { return next }

func (b *blockFirst) record(cmds []redis.Cmder) {
	var keys []string
	for _, c := range cmds {
		if c.Name() == "hmget" {
			keys = append(keys, c.Args()[1].(string))
		}
	}
	if len(keys) == 0 {
		return
	}
	b.mu.Lock()
	b.trips = append(b.trips, keys)
	first := len(b.trips) == 1
	b.mu.Unlock()
	if first {
		close(b.entered)
		<-b.release
	}
}

func (b *blockFirst) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		b.record([]redis.Cmder{cmd})
		return next(ctx, cmd)
	}
}

func (b *blockFirst) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		b.record(cmds)
		return next(ctx, cmds)
	}
}

// TestCoalescerGathersWhileInFlight: lookups that arrive while a pipeline is in flight
// gather, and the gathering goes out as one pipeline (each entity once) as soon as the
// in-flight one returns — not at the window, which here never closes. Afterwards no
// gathering is open and nothing is in flight.
func TestCoalescerGathersWhileInFlight(t *testing.T) {
	hook := &blockFirst{entered: make(chan struct{}), release: make(chan struct{})}
	c, _ := coalescerFor(t, 5*time.Second, hook)
	type answer struct {
		key    string
		vals   []any
		reason int
	}
	answers := make(chan answer, 4)
	fetch := func(key string) {
		go func() {
			vals, reason := c.fetch(context.Background(), FeatureKeyPrefix+key)
			answers <- answer{key, vals, reason}
		}()
	}
	fetch("u1")
	select {
	case <-hook.entered:
	case <-time.After(4 * time.Second): // a bound, not a measurement: the window never closes
		close(hook.release)
		t.Fatal("the lone lookup never reached Redis")
	}
	fetch("u2")
	fetch("u3")
	fetch("u2")
	joined := func() int {
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.cur == nil {
			return 0
		}
		return c.cur.waiters
	}
	for i := 0; i < 400 && joined() < 3; i++ {
		time.Sleep(5 * time.Millisecond)
	}
	if n := joined(); n != 3 {
		close(hook.release)
		t.Fatalf("%d lookups gathered behind the in-flight pipeline, want 3", n)
	}
	close(hook.release)
	want := map[string]string{"u1": "0.1", "u2": "0.2", "u3": "0.3"}
	for range 4 {
		a := <-answers
		if a.reason != -1 || len(a.vals) != 1 || a.vals[0] != want[a.key] {
			t.Errorf("%s: %v, reason %d (%s); want [%s]", a.key, a.vals, a.reason, reasonName(a.reason), want[a.key])
		}
	}
	hook.mu.Lock()
	trips := hook.trips
	hook.mu.Unlock()
	if len(trips) != 2 || len(trips[0]) != 1 || len(trips[1]) != 2 || trips[1][0] == trips[1][1] {
		t.Errorf("round trips %v, want [[u1] [u2 u3]]: the lone lookup, then the gathering (each entity once)", trips)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cur != nil || c.inflight != 0 {
		t.Errorf("after the answers: gathering %v, %d in flight; want none", c.cur, c.inflight)
	}
}

func reasonName(r int) string {
	if r < 0 {
		return "ok"
	}
	return reasonNames[r]
}
