// Package batch merges concurrent small inference calls into one model call, as
// Triton's dynamic batcher does: a collector goroutine takes queued calls until the
// batch holds max rows or the oldest call has waited max delay, concatenates their
// inputs along the first (batch) dimension, runs the model once on a free instance and
// splits the outputs back to the callers.
package batch

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

// Func runs the model on a batch.
type Func func(ctx context.Context, inputs []*tensor.Tensor) ([]*tensor.Tensor, error)

// Config sets a batcher's limits.
type Config struct {
	MaxRows   int           // rows per model call (>= 1)
	MaxDelay  time.Duration // longest the first call of a batch waits for company
	Instances int           // model calls running at once (>= 1)
	// QueueSize bounds the calls waiting for a batch (default 1024); a call that finds the
	// queue full is refused at once with ErrQueueFull.
	QueueSize int
	// Observe, if set, is called once per model call with the rows it held.
	Observe func(rows int)
}

// Result tells a caller how its call was served.
type Result struct {
	Outputs   []*tensor.Tensor
	Queued    time.Duration // time from Do to the start of the model call
	BatchRows int           // rows in the model call that served it
}

type call struct {
	ctx    context.Context
	inputs []*tensor.Tensor
	rows   int
	enq    time.Time
	res    Result
	err    error
	done   chan struct{}
}

// Batcher is one model version's dynamic batcher.
type Batcher struct {
	cfg   Config
	run   Func
	queue chan *call
	stop  chan struct{}
	done  chan struct{}  // closed when the collector has drained the queue and batches finished
	wg    sync.WaitGroup // running batches
	sem   chan struct{}
	once  sync.Once
}

// ErrStopped is returned by Do after Stop.
var ErrStopped = errors.New("batcher stopped")

// ErrQueueFull is returned by Do when the queue holds QueueSize calls already.
var ErrQueueFull = errors.New("batch queue full")

// DefaultQueueSize is the queue bound when Config.QueueSize is not set.
const DefaultQueueSize = 1024

// New starts a batcher.
func New(cfg Config, run Func) *Batcher {
	cfg.MaxRows = max(cfg.MaxRows, 1)
	cfg.Instances = max(cfg.Instances, 1)
	if cfg.QueueSize <= 0 {
		cfg.QueueSize = DefaultQueueSize
	}
	b := &Batcher{cfg: cfg, run: run, queue: make(chan *call, cfg.QueueSize), stop: make(chan struct{}), done: make(chan struct{}),
		sem: make(chan struct{}, cfg.Instances)}
	go b.collect()
	return b
}

// Do queues inputs (first dimension = rows) and waits for the outputs. A full queue
// refuses the call at once (ErrQueueFull): the queue never grows past QueueSize. If ctx
// ends first Do returns its error; a call whose ctx has ended by the time its batch is
// formed is dropped from the batch (the model never sees its rows), one already in a
// running batch runs and its outputs are discarded.
func (b *Batcher) Do(ctx context.Context, inputs []*tensor.Tensor) (Result, error) {
	rows := 0
	if len(inputs) > 0 && len(inputs[0].Shape) > 0 {
		rows = int(inputs[0].Shape[0])
	}
	c := &call{ctx: ctx, inputs: inputs, rows: rows, enq: time.Now(), done: make(chan struct{})}
	// Checked first: with room in the queue, a select would pick the enqueue half the time
	// after Stop, and nobody would ever run the call.
	select {
	case <-b.stop:
		return Result{}, ErrStopped
	default:
	}
	if err := ctx.Err(); err != nil {
		return Result{}, err
	}
	select {
	case b.queue <- c:
	default:
		return Result{}, ErrQueueFull
	}
	select {
	case <-c.done:
		return c.res, c.err
	case <-b.done:
		// Queued just as Stop ran: the collector either drained it or is gone.
		select {
		case <-c.done:
			return c.res, c.err
		default:
			return Result{}, ErrStopped
		}
	case <-ctx.Done():
		return Result{}, ctx.Err()
	}
}

// Stop ends the batcher after the calls already queued have run. A Do racing Stop
// either runs or returns ErrStopped; the host drains in-flight requests before Stop.
func (b *Batcher) Stop() {
	b.once.Do(func() { close(b.stop) })
	<-b.done
}

func (b *Batcher) collect() {
	defer func() {
		b.wg.Wait()
		close(b.done)
	}()
	var carry *call // a call that did not fit in the previous batch
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		var first *call
		if carry != nil {
			first, carry = carry, nil
		} else {
			select {
			case first = <-b.queue:
			case <-b.stop:
				b.drain()
				return
			}
		}
		if expired(first) {
			continue
		}
		batch := []*call{first}
		rows := first.rows
		if rows < b.cfg.MaxRows && b.cfg.MaxDelay > 0 {
			timer.Reset(b.cfg.MaxDelay - time.Since(first.enq))
		fill:
			for rows < b.cfg.MaxRows {
				select {
				case c := <-b.queue:
					if expired(c) {
						continue
					}
					if rows+c.rows > b.cfg.MaxRows {
						carry = c
						break fill
					}
					batch = append(batch, c)
					rows += c.rows
				case <-timer.C:
					break fill
				}
			}
			timer.Stop()
		} else if b.cfg.MaxDelay <= 0 {
			// No delay: take what is already queued, never wait.
		grab:
			for rows < b.cfg.MaxRows {
				select {
				case c := <-b.queue:
					if expired(c) {
						continue
					}
					if rows+c.rows > b.cfg.MaxRows {
						carry = c
						break grab
					}
					batch = append(batch, c)
					rows += c.rows
				default:
					break grab
				}
			}
		}
		b.sem <- struct{}{} // wait for a free instance; the queue keeps filling meanwhile
		// Calls whose caller gave up (deadline, cancel) while waiting leave the batch.
		batch, rows = live(batch)
		if len(batch) == 0 {
			<-b.sem
			continue
		}
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			defer func() { <-b.sem }()
			b.execute(batch, rows)
		}()
	}
}

// drain runs whatever is still queued at Stop.
func (b *Batcher) drain() {
	for {
		select {
		case c := <-b.queue:
			if expired(c) {
				continue
			}
			b.sem <- struct{}{}
			b.execute([]*call{c}, c.rows)
			<-b.sem
		default:
			return
		}
	}
}

// expired finishes a call whose caller has gone (its Do already returned ctx's error) and
// reports true, so the call is dropped instead of run.
func expired(c *call) bool {
	err := c.ctx.Err()
	if err == nil {
		return false
	}
	c.err = err
	close(c.done)
	return true
}

// live drops the calls that expired from batch, in place, and recounts its rows.
func live(batch []*call) ([]*call, int) {
	kept, rows := batch[:0], 0
	for _, c := range batch {
		if !expired(c) {
			kept = append(kept, c)
			rows += c.rows
		}
	}
	return kept, rows
}

func (b *Batcher) execute(batch []*call, rows int) {
	start := time.Now()
	if b.cfg.Observe != nil {
		b.cfg.Observe(rows)
	}
	finish := func(c *call, outs []*tensor.Tensor, err error) {
		c.res = Result{Outputs: outs, Queued: start.Sub(c.enq), BatchRows: rows}
		c.err = err
		close(c.done)
	}
	if len(batch) == 1 {
		c := batch[0]
		outs, err := b.run(c.ctx, c.inputs)
		finish(c, outs, err)
		return
	}
	// The merged call runs detached from any one caller's cancellation.
	ctx := context.WithoutCancel(batch[0].ctx)
	parts := make([][]*tensor.Tensor, len(batch))
	for i, c := range batch {
		parts[i] = c.inputs
	}
	in, err := Concat(parts)
	var outs []*tensor.Tensor
	if err == nil {
		outs, err = b.run(ctx, in)
	}
	var split [][]*tensor.Tensor
	if err == nil {
		counts := make([]int, len(batch))
		for i, c := range batch {
			counts[i] = c.rows
		}
		split, err = Split(outs, counts)
	}
	for i, c := range batch {
		if err != nil {
			finish(c, nil, err)
		} else {
			finish(c, split[i], nil)
		}
	}
}

// Concat joins each input position of parts along the first dimension.
func Concat(parts [][]*tensor.Tensor) ([]*tensor.Tensor, error) {
	n := len(parts[0])
	out := make([]*tensor.Tensor, n)
	for j := range n {
		first := parts[0][j]
		t := &tensor.Tensor{Name: first.Name, Datatype: first.Datatype, Shape: append([]int64(nil), first.Shape...)}
		t.Shape[0] = 0
		for _, p := range parts {
			if len(p) != n {
				return nil, fmt.Errorf("batch: calls have %d and %d inputs", n, len(p))
			}
			x := p[j]
			if x.Datatype != t.Datatype || len(x.Shape) != len(t.Shape) {
				return nil, fmt.Errorf("batch: input %d: mismatched datatype or rank", j)
			}
			for d := 1; d < len(x.Shape); d++ {
				if x.Shape[d] != t.Shape[d] {
					return nil, fmt.Errorf("batch: input %d: shapes %s and %s differ beyond the batch dimension", j, tensor.FormatShape(first.Shape), tensor.FormatShape(x.Shape))
				}
			}
			t.Shape[0] += x.Shape[0]
			t.F32 = append(t.F32, x.F32...)
			t.F64 = append(t.F64, x.F64...)
			t.I64 = append(t.I64, x.I64...)
			t.U64 = append(t.U64, x.U64...)
			t.Bool = append(t.Bool, x.Bool...)
			t.Bytes = append(t.Bytes, x.Bytes...)
			t.F16 = append(t.F16, x.F16...)
		}
		out[j] = t
	}
	return out, nil
}

// Split cuts each output along the first dimension into len(rows) pieces.
func Split(outs []*tensor.Tensor, rows []int) ([][]*tensor.Tensor, error) {
	total := 0
	for _, r := range rows {
		total += r
	}
	res := make([][]*tensor.Tensor, len(rows))
	for i := range res {
		res[i] = make([]*tensor.Tensor, len(outs))
	}
	for j, o := range outs {
		if len(o.Shape) == 0 || o.Shape[0] != int64(total) {
			return nil, fmt.Errorf("batch: output %d has shape %s for %d rows", j, tensor.FormatShape(o.Shape), total)
		}
		per := 1
		for _, d := range o.Shape[1:] {
			per *= int(d)
		}
		if o.Len() != total*per {
			return nil, fmt.Errorf("batch: output %d holds %d values, want %d", j, o.Len(), total*per)
		}
		at := 0
		for i, r := range rows {
			lo, hi := at*per, (at+r)*per
			p := &tensor.Tensor{Name: o.Name, Datatype: o.Datatype, Shape: append([]int64{int64(r)}, o.Shape[1:]...)}
			switch o.Datatype {
			case tensor.FP32:
				p.F32 = o.F32[lo:hi:hi]
			case tensor.FP64:
				p.F64 = o.F64[lo:hi:hi]
			case tensor.FP16:
				p.F16 = o.F16[lo:hi:hi]
			case tensor.UINT64:
				p.U64 = o.U64[lo:hi:hi]
			case tensor.BOOL:
				p.Bool = o.Bool[lo:hi:hi]
			case tensor.BYTES:
				p.Bytes = o.Bytes[lo:hi:hi]
			default:
				p.I64 = o.I64[lo:hi:hi]
			}
			res[i][j] = p
			at += r
		}
	}
	return res, nil
}
