package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/retry"

	v1 "github.com/patchbay-io/patchbay/api/k8s/v1"
	"github.com/patchbay-io/patchbay/xds/store"
)

// stateKeys are the status fields that hold a store.ModelState (same JSON names; the
// api/k8s/v1 tests keep them equal).
var stateKeys = []string{"specFingerprint", "slots", "rollback", "history", "configVersion", "analysis"}

// UpdateBackoff bounds Update's retries on a conflict (another replica wrote the status
// between this one's read and write): up to 12 tries over about two seconds.
var UpdateBackoff = wait.Backoff{Steps: 12, Duration: 10 * time.Millisecond, Factor: 1.5, Jitter: 0.5, Cap: 500 * time.Millisecond}

// Store keeps each model's store.ModelState in its Rollout's status (store.Store). Every
// write is an UpdateStatus carrying the resourceVersion it read, so a concurrent write by
// another replica fails with a conflict; Update then reads again and re-runs fn
// (client-go's retry.RetryOnConflict).
type Store struct {
	cfg Config

	conflicts atomic.Int64
	mu        sync.Mutex
	written   map[string]bool // resourceVersions this Store wrote (Watch skips them)
}

// NewStore returns a Store over cfg.Namespace's Rollouts.
func NewStore(cfg Config) *Store { return &Store{cfg: cfg, written: map[string]bool{}} }

var _ store.Store = (*Store)(nil)

// Conflicts is how many times an Update was retried because another writer got there first.
func (s *Store) Conflicts() int64 { return s.conflicts.Load() }

// Load returns the state of every model with a Rollout (one with no state yet: zero).
func (s *Store) Load(ctx context.Context) (map[string]store.ModelState, error) {
	l, err := s.cfg.rollouts().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list rollouts in namespace %q: %w", s.cfg.Namespace, err)
	}
	out := make(map[string]store.ModelState, len(l.Items))
	for i := range l.Items {
		obj := &l.Items[i]
		st, err := modelState(obj)
		if err != nil {
			return nil, err
		}
		out[Model(obj)] = st
	}
	return out, nil
}

// Update changes the state of the model's Rollout (see store.Store.Update).
func (s *Store) Update(ctx context.Context, model string, fn func(cur store.ModelState) (store.ModelState, error)) (store.ModelState, error) {
	var (
		out   store.ModelState
		tries int
	)
	err := retry.RetryOnConflict(UpdateBackoff, func() error {
		if tries > 0 {
			s.conflicts.Add(1)
		}
		tries++
		obj, err := s.get(ctx, model)
		if err != nil {
			return err
		}
		cur, err := modelState(obj)
		if err != nil {
			return err
		}
		next, err := fn(cur)
		if err != nil {
			return err
		}
		if sameJSON(cur, next) {
			out = cur
			return nil
		}
		if err := setModelState(obj, next); err != nil {
			return err
		}
		res, err := s.cfg.rollouts().UpdateStatus(ctx, obj, metav1.UpdateOptions{})
		if err != nil {
			return err
		}
		s.mu.Lock()
		s.written[res.GetResourceVersion()] = true
		s.mu.Unlock()
		out = next
		return nil
	})
	if err != nil {
		if apierrors.IsConflict(err) {
			return store.ModelState{}, fmt.Errorf("update state of model %q: still conflicting after %d tries: %w", model, tries, err)
		}
		return store.ModelState{}, fmt.Errorf("update state of model %q: %w", model, err)
	}
	return out, nil
}

// get reads the model's Rollout from the API (not a cache: the resourceVersion it carries
// is what the write is conditional on). A Rollout is found by name first (the usual case:
// named after its model), else by spec.model.
func (s *Store) get(ctx context.Context, model string) (*unstructured.Unstructured, error) {
	rc := s.cfg.rollouts()
	obj, err := rc.Get(ctx, model, metav1.GetOptions{})
	if err == nil && Model(obj) == model {
		return obj, nil
	}
	if err != nil && !apierrors.IsNotFound(err) {
		return nil, err
	}
	l, err := rc.List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	var found *unstructured.Unstructured
	for i := range l.Items {
		if Model(&l.Items[i]) != model {
			continue
		}
		if found != nil {
			return nil, fmt.Errorf("rollouts %q and %q both serve model %q", found.GetName(), l.Items[i].GetName(), model)
		}
		found = &l.Items[i]
	}
	if found == nil {
		return nil, fmt.Errorf("no Rollout serves model %q in namespace %q", model, s.cfg.Namespace)
	}
	return found, nil
}

// Watch calls changed whenever another writer changes a model's state in a Rollout's
// status (writes by this Store, and status changes outside the state, are skipped), until
// ctx ends.
func (s *Store) Watch(ctx context.Context, changed func()) error {
	factory := dynamicinformer.NewFilteredDynamicSharedInformerFactory(s.cfg.Client, 0, s.cfg.Namespace, nil)
	inf := factory.ForResource(v1.GroupVersionResource).Informer()
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		UpdateFunc: func(oldObj, newObj any) {
			o, ok1 := oldObj.(*unstructured.Unstructured)
			n, ok2 := newObj.(*unstructured.Unstructured)
			if !ok1 || !ok2 {
				return
			}
			s.mu.Lock()
			ours := s.written[n.GetResourceVersion()]
			delete(s.written, n.GetResourceVersion())
			s.mu.Unlock()
			if ours {
				return
			}
			a, errA := modelState(o)
			b, errB := modelState(n)
			if errA != nil || errB != nil || !sameJSON(a, b) {
				changed()
			}
		},
	}); err != nil {
		return fmt.Errorf("watch rollout status: %w", err)
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	<-ctx.Done()
	return nil
}

// modelState reads the state fields of a Rollout's status.
func modelState(obj *unstructured.Unstructured) (store.ModelState, error) {
	var st store.ModelState
	status, ok := obj.Object["status"].(map[string]any)
	if !ok {
		return st, nil
	}
	part := map[string]any{}
	for _, k := range stateKeys {
		if v, ok := status[k]; ok {
			part[k] = v
		}
	}
	b, err := json.Marshal(part)
	if err == nil {
		err = json.Unmarshal(b, &st)
	}
	if err != nil {
		return store.ModelState{}, fmt.Errorf("rollout %s/%s: status: %w: %v", obj.GetNamespace(), obj.GetName(), store.ErrCorrupt, err)
	}
	return st, nil
}

// setModelState writes st into the state fields of obj's status, leaving the others.
func setModelState(obj *unstructured.Unstructured, st store.ModelState) error {
	var part map[string]any
	if err := convert(st, &part); err != nil {
		return err
	}
	status, _ := obj.Object["status"].(map[string]any)
	if status == nil {
		status = map[string]any{}
	}
	for _, k := range stateKeys {
		delete(status, k)
		if v, ok := part[k]; ok {
			status[k] = v
		}
	}
	obj.Object["status"] = status
	return nil
}
