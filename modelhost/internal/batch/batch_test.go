package batch

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

// double is a model: each output row is the input row times two, plus a per-row sum
// output, so a mix-up between callers' rows shows.
func double(calls *atomic.Int64, maxSeen *atomic.Int64) Func {
	return func(_ context.Context, in []*tensor.Tensor) ([]*tensor.Tensor, error) {
		calls.Add(1)
		rows := in[0].Shape[0]
		for {
			m := maxSeen.Load()
			if rows <= m || maxSeen.CompareAndSwap(m, rows) {
				break
			}
		}
		time.Sleep(2 * time.Millisecond) // a model call costs something
		out := &tensor.Tensor{Datatype: tensor.FP32, Shape: append([]int64(nil), in[0].Shape...), F32: make([]float32, len(in[0].F32))}
		sum := &tensor.Tensor{Datatype: tensor.FP32, Shape: []int64{rows}, F32: make([]float32, rows)}
		w := int(in[0].Shape[1])
		for i, v := range in[0].F32 {
			out.F32[i] = 2 * v
			sum.F32[i/w] += v
		}
		return []*tensor.Tensor{out, sum}, nil
	}
}

func rowsOf(id, rows int) *tensor.Tensor {
	t := &tensor.Tensor{Name: "x", Datatype: tensor.FP32, Shape: []int64{int64(rows), 2}}
	for r := range rows {
		t.F32 = append(t.F32, float32(id), float32(r))
	}
	return t
}

func TestMergesConcurrentCallsAndSplitsBack(t *testing.T) {
	var calls, maxRows atomic.Int64
	b := New(Config{MaxRows: 64, MaxDelay: 20 * time.Millisecond, Instances: 1}, double(&calls, &maxRows))
	defer b.Stop()
	const clients = 40
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	var merged atomic.Int64
	for id := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rows := 1 + id%3
			res, err := b.Do(context.Background(), []*tensor.Tensor{rowsOf(id, rows)})
			if err != nil {
				errs <- err
				return
			}
			if res.BatchRows > rows {
				merged.Add(1)
			}
			out, sum := res.Outputs[0], res.Outputs[1]
			if out.Shape[0] != int64(rows) || sum.Shape[0] != int64(rows) {
				errs <- errors.New("wrong row count back")
				return
			}
			for r := range rows {
				if out.F32[2*r] != float32(2*id) || out.F32[2*r+1] != float32(2*r) || sum.F32[r] != float32(id+r) {
					errs <- errors.New("a caller got someone else's rows")
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if calls.Load() >= clients || merged.Load() == 0 {
		t.Fatalf("%d model calls for %d clients, %d merged: batching did not merge", calls.Load(), clients, merged.Load())
	}
	if maxRows.Load() > 64 {
		t.Fatalf("a model call held %d rows, max 64", maxRows.Load())
	}
	t.Logf("%d clients served by %d model calls (largest %d rows)", clients, calls.Load(), maxRows.Load())
}

func TestMaxRowsHonoured(t *testing.T) {
	var calls, maxRows atomic.Int64
	b := New(Config{MaxRows: 5, MaxDelay: 5 * time.Millisecond, Instances: 2}, double(&calls, &maxRows))
	defer b.Stop()
	var wg sync.WaitGroup
	for id := range 30 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := b.Do(context.Background(), []*tensor.Tensor{rowsOf(id, 2)}); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if maxRows.Load() > 5 {
		t.Fatalf("a model call held %d rows, max 5", maxRows.Load())
	}
}

func TestErrorReachesEveryCallerOfTheBatch(t *testing.T) {
	boom := errors.New("boom")
	b := New(Config{MaxRows: 8, MaxDelay: 20 * time.Millisecond}, func(context.Context, []*tensor.Tensor) ([]*tensor.Tensor, error) {
		return nil, boom
	})
	defer b.Stop()
	var wg sync.WaitGroup
	for id := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := b.Do(context.Background(), []*tensor.Tensor{rowsOf(id, 1)}); !errors.Is(err, boom) {
				t.Errorf("got %v, want boom", err)
			}
		}()
	}
	wg.Wait()
}

func TestStopRunsQueuedCallsThenRefuses(t *testing.T) {
	var calls, maxRows atomic.Int64
	b := New(Config{MaxRows: 4, MaxDelay: time.Millisecond}, double(&calls, &maxRows))
	res, err := b.Do(context.Background(), []*tensor.Tensor{rowsOf(1, 1)})
	if err != nil || res.Outputs[0].F32[0] != 2 {
		t.Fatalf("Do: %v %v", res, err)
	}
	b.Stop()
	b.Stop() // idempotent
	if _, err := b.Do(context.Background(), []*tensor.Tensor{rowsOf(1, 1)}); !errors.Is(err, ErrStopped) {
		t.Fatalf("after Stop: %v, want ErrStopped", err)
	}
}

func TestCanceledCallerReturns(t *testing.T) {
	release := make(chan struct{})
	b := New(Config{MaxRows: 1, Instances: 1}, func(ctx context.Context, in []*tensor.Tensor) ([]*tensor.Tensor, error) {
		<-release
		return in, nil
	})
	defer b.Stop()
	defer close(release)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := b.Do(ctx, []*tensor.Tensor{rowsOf(1, 1)}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want deadline exceeded", err)
	}
}

func TestConcatSplitRejectMismatch(t *testing.T) {
	a := rowsOf(1, 2)
	c := &tensor.Tensor{Name: "x", Datatype: tensor.FP32, Shape: []int64{1, 3}, F32: []float32{1, 2, 3}}
	if _, err := Concat([][]*tensor.Tensor{{a}, {c}}); err == nil {
		t.Error("Concat of [2,2] and [1,3]: want an error")
	}
	if _, err := Split([]*tensor.Tensor{a}, []int{1, 2}); err == nil {
		t.Error("Split of 2 rows into 1+2: want an error")
	}
	in, err := Concat([][]*tensor.Tensor{{a}, {rowsOf(2, 1)}})
	if err != nil || tensor.FormatShape(in[0].Shape) != "[3, 2]" {
		t.Fatalf("Concat: %v %v", in, err)
	}
	parts, err := Split(in, []int{2, 1})
	if err != nil || parts[1][0].F32[0] != 2 || len(parts[0][0].F32) != 4 {
		t.Fatalf("Split: %v %v", parts, err)
	}
}

// TestDoRacingStopNeverHangs: calls racing Stop either run or get ErrStopped.
func TestDoRacingStopNeverHangs(t *testing.T) {
	for range 50 {
		var calls, maxRows atomic.Int64
		b := New(Config{MaxRows: 4, MaxDelay: 100 * time.Microsecond}, double(&calls, &maxRows))
		var wg sync.WaitGroup
		for id := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, err := b.Do(context.Background(), []*tensor.Tensor{rowsOf(id, 1)})
				if err != nil && !errors.Is(err, ErrStopped) {
					t.Error(err)
				}
			}()
		}
		b.Stop()
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("a Do racing Stop never returned")
		}
	}
}

// blocker is a model whose calls wait until released; it records the rows it saw (by the
// caller id in column 0), so a test can tell which callers reached the model.
type blocker struct {
	started chan struct{}
	release chan struct{}
	mu      sync.Mutex
	seen    map[float32]bool
}

func newBlocker() *blocker {
	return &blocker{started: make(chan struct{}, 64), release: make(chan struct{}), seen: map[float32]bool{}}
}

// open lets every call through; safe to call more than once.
func (k *blocker) open() {
	k.mu.Lock()
	defer k.mu.Unlock()
	select {
	case <-k.release:
	default:
		close(k.release)
	}
}

func (k *blocker) run(_ context.Context, in []*tensor.Tensor) ([]*tensor.Tensor, error) {
	k.mu.Lock()
	for i := 0; i < len(in[0].F32); i += 2 {
		k.seen[in[0].F32[i]] = true
	}
	k.mu.Unlock()
	k.started <- struct{}{}
	<-k.release
	return []*tensor.Tensor{{Datatype: tensor.FP32, Shape: []int64{in[0].Shape[0]}, F32: make([]float32, in[0].Shape[0])}}, nil
}

// TestFullQueueRefusesAtOnce: with the one instance busy and the queue full, the next call
// gets ErrQueueFull without waiting (its context has no deadline: before the bound it
// blocked until the queue drained), and the queued calls still run.
func TestFullQueueRefusesAtOnce(t *testing.T) {
	k := newBlocker()
	b := New(Config{MaxRows: 1, Instances: 1, QueueSize: 2}, k.run)
	defer b.Stop()
	defer k.open() // before Stop, also when the test fails early
	results := make(chan error, 4)
	do := func(id int) { _, err := b.Do(context.Background(), []*tensor.Tensor{rowsOf(id, 1)}); results <- err }
	go do(1)
	<-k.started // call 1 runs; the collector then holds call 2 waiting for the instance
	go do(2)
	go do(3)
	go do(4)
	// Calls 2..4: the collector holds one, the queue (2) holds the others; eventually the
	// queue is full and the next call is refused.
	deadline := time.Now().Add(5 * time.Second)
	for len(b.queue) < cap(b.queue) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	done := make(chan error, 1)
	go func() { _, err := b.Do(context.Background(), []*tensor.Tensor{rowsOf(9, 1)}); done <- err }()
	select {
	case err := <-done:
		if !errors.Is(err, ErrQueueFull) {
			t.Fatalf("call on a full queue: %v, want ErrQueueFull", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a call on a full queue waited instead of being refused")
	}
	k.open()
	for range 4 {
		if err := <-results; err != nil {
			t.Errorf("queued call: %v", err)
		}
	}
	if k.seen[9] {
		t.Error("the refused call reached the model")
	}
}

// TestExpiredCallDroppedFromBatch: a call whose deadline passes while it waits in the
// queue is answered with DeadlineExceeded and never reaches the model.
func TestExpiredCallDroppedFromBatch(t *testing.T) {
	k := newBlocker()
	b := New(Config{MaxRows: 8, Instances: 1}, k.run)
	defer b.Stop()
	defer k.open()
	first := make(chan error, 1)
	go func() { _, err := b.Do(context.Background(), []*tensor.Tensor{rowsOf(1, 1)}); first <- err }()
	<-k.started
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	if _, err := b.Do(ctx, []*tensor.Tensor{rowsOf(2, 1)}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("queued call past its deadline: %v, want DeadlineExceeded", err)
	}
	later := make(chan error, 1)
	go func() { _, err := b.Do(context.Background(), []*tensor.Tensor{rowsOf(3, 1)}); later <- err }()
	k.open()
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	if err := <-later; err != nil {
		t.Fatal(err)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.seen[2] {
		t.Error("the model ran the rows of a call whose deadline had passed in the queue")
	}
	if !k.seen[3] {
		t.Error("a live call queued with the expired one did not run")
	}
}
