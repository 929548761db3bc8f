package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"sort"
	"sync"
	"sync/atomic"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/retry"

	v1 "github.com/patchbay-io/patchbay/api/k8s/v1"
	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/store"
)

// Source reads the Rollouts of one namespace as rollout documents (xds.Source) and writes
// what became of each into its status (xds.ProblemReporter).
//
// Each Rollout is rendered into a file-format document (Render) and checked alone
// (rollout.LoadData). A good one is what Read returns for it, and becomes its last good
// document; one that breaks a rule keeps contributing its last good document, so nothing
// served changes, and gets Ready=False reason Invalid naming each problem's field path. The
// last good document is also kept in status.lastApplied, so a restarted replica serves it
// too.
type Source struct {
	cfg Config

	informer atomic.Pointer[cache.SharedIndexInformer] // set once Watch has synced

	mu       sync.Mutex
	docs     map[string]*docState        // by Path, from the last Read
	server   map[string][]*rollout.Error // the last Report's problems
	reported map[string][]*rollout.Error // own problems last written to status
	kick     chan struct{}               // own problems changed: write statuses

	rollbackFn RollbackFunc
	rbMu       sync.Mutex
	rbPending  map[string]bool // Rollout names with a rollback request not acknowledged
	rbKick     chan struct{}
}

// RollbackFunc executes a rollback request (annotation v1.RollbackRequestAnnotation) on a
// model. id is the annotation's value, distinct per request: every replica may see a
// request before one of them acknowledges it, so executing an id already executed must
// change nothing (e.g. record id in the rollback's reason and compare inside the Store's
// Update fn).
type RollbackFunc func(ctx context.Context, model, id string, req v1.RollbackRequest) error

// OnRollbackRequest makes Watch execute rollback requests with fn and acknowledge each in
// status.lastRollbackRequest (outcome in the RollbackRequest condition). Call before Watch.
func (s *Source) OnRollbackRequest(fn RollbackFunc) { s.rollbackFn = fn }

// docState is what the last Read found of one Rollout.
type docState struct {
	generation int64
	model      string
	// problems are the object's own (its spec alone breaks a rule).
	problems []*rollout.Error
	// good is the document served for it (its spec, or its last good one); nil: none.
	good []byte
	// current reports whether good is the object's current spec.
	current bool
	// traffic and order are good's split and version order (for status.split); analysis
	// is good's analysis section (status.split then shows its step's split).
	traffic  map[string]int
	order    []string
	analysis *rollout.Analysis
}

// NewSource returns a Source over cfg.Namespace's Rollouts.
func NewSource(cfg Config) *Source {
	return &Source{cfg: cfg, docs: map[string]*docState{}, kick: make(chan struct{}, 1),
		rbPending: map[string]bool{}, rbKick: make(chan struct{}, 1)}
}

// Describe names the source.
func (s *Source) Describe() string { return "kubernetes namespace " + s.cfg.Namespace }

// Watch lists the Rollouts (an error if it cannot: the CRD is missing, RBAC forbids it),
// starts an informer, calls ready once it has synced, then changed whenever a Rollout is
// added, deleted or its spec changes (status writes are not changes), until ctx ends.
func (s *Source) Watch(ctx context.Context, ready func(), changed func()) error {
	if _, err := s.cfg.rollouts().List(ctx, metav1.ListOptions{Limit: 1}); err != nil {
		return fmt.Errorf("list %s in namespace %q (is the CRD from charts/patchbay/crds installed, and may this service account list them?): %w",
			v1.CRDName, s.cfg.Namespace, err)
	}
	factory := dynamicinformer.NewFilteredDynamicSharedInformerFactory(s.cfg.Client, 0, s.cfg.Namespace, nil)
	inf := factory.ForResource(v1.GroupVersionResource).Informer()
	var started atomic.Bool
	notify := func() {
		if started.Load() {
			changed()
		}
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) {
			s.noteRollbackRequest(obj)
			notify()
		},
		UpdateFunc: func(oldObj, newObj any) {
			s.noteRollbackRequest(newObj)
			o, ok1 := oldObj.(*unstructured.Unstructured)
			n, ok2 := newObj.(*unstructured.Unstructured)
			if !ok1 || !ok2 || o.GetGeneration() != n.GetGeneration() {
				notify()
				return
			}
			// A rollback written or released (by any replica) changes what the status
			// should say (state, split, reason): the last Report may have compared with a
			// cached copy that did not have it yet.
			// Likewise an analysis step taken (status.split shows the step's split).
			changed := false
			for _, k := range []string{"rollback", "analysis", "specFingerprint"} {
				vo, _, _ := unstructured.NestedFieldNoCopy(o.Object, "status", k)
				vn, _, _ := unstructured.NestedFieldNoCopy(n.Object, "status", k)
				changed = changed || !reflect.DeepEqual(vo, vn)
			}
			if changed {
				select {
				case s.kick <- struct{}{}:
				default:
				}
			}
		},
		DeleteFunc: func(any) { notify() },
	}); err != nil {
		return fmt.Errorf("watch rollouts: %w", err)
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		return nil // ctx ended
	}
	s.informer.Store(&inf)
	started.Store(true)
	ready()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.kick:
			s.writeStatuses(ctx)
		case <-s.rbKick:
			s.executeRollbacks(ctx)
		}
	}
}

// list returns the Rollouts, from the informer once Watch has synced, else from the API.
func (s *Source) list(ctx context.Context) ([]*unstructured.Unstructured, error) {
	var out []*unstructured.Unstructured
	if inf := s.informer.Load(); inf != nil {
		for _, o := range (*inf).GetStore().List() {
			if u, ok := o.(*unstructured.Unstructured); ok {
				out = append(out, u)
			}
		}
	} else {
		l, err := s.cfg.rollouts().List(ctx, metav1.ListOptions{})
		if err != nil {
			return nil, fmt.Errorf("list rollouts in namespace %q: %w", s.cfg.Namespace, err)
		}
		for i := range l.Items {
			out = append(out, &l.Items[i])
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].GetName() < out[j].GetName() })
	return out, nil
}

// Read returns one document per Rollout that has a good one (see Source), in name order.
func (s *Source) Read(ctx context.Context) ([]rollout.File, bool, error) {
	objs, err := s.list(ctx)
	if err != nil {
		return nil, false, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	docs := make(map[string]*docState, len(objs))
	var files []rollout.File
	kick := false
	for _, obj := range objs {
		p := Path(obj)
		d := &docState{generation: obj.GetGeneration(), model: Model(obj)}
		data, err := Render(obj)
		if err == nil {
			_, err = rollout.LoadData([]rollout.File{{Path: p, Data: data, Size: int64(len(data))}})
		}
		if err == nil {
			d.good, d.current = data, true
		} else {
			d.problems = problems(p, data, err)
			if prev := s.docs[p]; prev != nil && prev.good != nil {
				d.good = prev.good
			} else if last, _, _ := unstructured.NestedString(obj.Object, "status", "lastApplied"); last != "" {
				// A replica that never saw this spec good: the one the control plane
				// applied last, if it still loads.
				if _, lerr := rollout.LoadData([]rollout.File{{Path: p, Data: []byte(last)}}); lerr == nil {
					d.good = []byte(last)
				}
			}
		}
		if d.good != nil {
			if rs, err := rollout.Parse(p, d.good); err == nil && len(rs) == 1 {
				d.traffic, d.analysis = rs[0].Traffic, rs[0].Analysis
				for _, v := range rs[0].Versions {
					d.order = append(d.order, v.Name)
				}
			}
			files = append(files, rollout.File{Path: p, Data: d.good, Size: int64(len(d.good))})
		}
		if !sameProblems(d.problems, s.reported[p]) {
			kick = true
		}
		docs[p] = d
	}
	s.docs = docs
	if kick {
		// The server may not reload (nothing it serves changed): write the conditions now.
		select {
		case s.kick <- struct{}{}:
		default:
		}
	}
	return files, true, nil
}

// AllDocuments is the problems key of a reload failure tied to no one document (the
// translation or a Store write failed): Report puts it on every Rollout, so none claims to
// be Applied while the spec is not served.
const AllDocuments = ""

// Report writes each Rollout's status after a reload: problems are the server's (by
// Path, or AllDocuments; none: applied), on top of each object's own found by Read. The config version is
// not written here (it would rewrite every status on every reload): the Store keeps it.
func (s *Source) Report(ctx context.Context, problems map[string][]*rollout.Error, _ string) {
	s.mu.Lock()
	s.server = make(map[string][]*rollout.Error, len(problems))
	for p, ps := range problems {
		s.server[p] = ps
	}
	s.mu.Unlock()
	s.writeStatuses(ctx)
}

// statusUpdate is what one Rollout's status should say.
type statusUpdate struct {
	name       string
	generation int64
	model      string
	problems   []*rollout.Error
	own        []*rollout.Error
	lastGood   []byte // the object's current spec when it is applied
	traffic    map[string]int
	order      []string
	analysis   *rollout.Analysis
}

// writeStatuses brings every Rollout's status in line with the last Read and Report.
func (s *Source) writeStatuses(ctx context.Context) {
	s.mu.Lock()
	var ups []statusUpdate
	for p, d := range s.docs {
		u := statusUpdate{name: p[len(s.cfg.Namespace)+1:], generation: d.generation, model: d.model,
			own: d.problems, traffic: d.traffic, order: d.order, analysis: d.analysis}
		u.problems = append(append(append([]*rollout.Error(nil), d.problems...), s.server[p]...), s.server[AllDocuments]...)
		if len(u.problems) == 0 && d.current {
			u.lastGood = d.good
		}
		ups = append(ups, u)
	}
	s.mu.Unlock()
	sort.Slice(ups, func(i, j int) bool { return ups[i].name < ups[j].name })
	for _, u := range ups {
		if err := s.writeStatus(ctx, u); err != nil {
			if ctx.Err() == nil {
				s.cfg.Logger.Warn().Err(err).Str("rollout", u.name).Msg("write rollout status")
			}
			continue
		}
		s.mu.Lock()
		if s.reported == nil {
			s.reported = map[string][]*rollout.Error{}
		}
		s.reported[s.cfg.Namespace+"/"+u.name] = u.own
		s.mu.Unlock()
	}
}

func (s *Source) writeStatus(ctx context.Context, u statusUpdate) error {
	rc := s.cfg.rollouts()
	first := true
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		// First from the informer's cache: after most reloads every status already says
		// what it should, and replicas need not each GET every Rollout. A stale cached
		// copy costs one conflict; the retries read the API.
		var obj *unstructured.Unstructured
		if inf := s.informer.Load(); first && inf != nil {
			if o, ok, _ := (*inf).GetStore().GetByKey(s.cfg.Namespace + "/" + u.name); ok {
				if uo, ok := o.(*unstructured.Unstructured); ok {
					obj = uo.DeepCopy()
				}
			}
		}
		first = false
		if obj == nil {
			var err error
			if obj, err = rc.Get(ctx, u.name, metav1.GetOptions{}); err != nil {
				return err
			}
		}
		old, _, _ := unstructured.NestedMap(obj.Object, "status")
		st := make(map[string]any, len(old)+6)
		for k, v := range old {
			st[k] = v
		}
		var conds []metav1.Condition
		if c, ok := st["conditions"]; ok {
			if err := convert(c, &conds); err != nil {
				conds = nil // unreadable: replace
			}
		}
		cond := metav1.Condition{Type: v1.ConditionReady, ObservedGeneration: u.generation}
		split := Split(stepTraffic(u.traffic, u.analysis, st), u.order)
		var rb struct {
			Traffic map[string]int `json:"traffic"`
		}
		rolledBack := false
		if r, ok := st["rollback"]; ok && r != nil && convert(r, &rb) == nil && len(rb.Traffic) > 0 {
			rolledBack = true
		}
		switch {
		case len(u.problems) > 0:
			cond.Status, cond.Reason, cond.Message = metav1.ConditionFalse, v1.ReasonInvalid, Message(u.problems)
			st["state"] = v1.StateInvalid
		case rolledBack:
			cond.Status, cond.Reason = metav1.ConditionTrue, v1.ReasonRolledBack
			cond.Message = "a rollback is in force; applying a changed spec releases it"
			st["state"] = v1.StateRolledBack
			split = Split(rb.Traffic, u.order)
		default:
			cond.Status, cond.Reason, cond.Message = metav1.ConditionTrue, v1.ReasonApplied, "the spec is served"
			st["state"] = v1.StateServing
		}
		meta.SetStatusCondition(&conds, cond)
		var cj any
		if err := convert(conds, &cj); err != nil {
			return err
		}
		st["conditions"] = cj
		st["observedGeneration"] = u.generation
		st["model"] = u.model
		if split != "" {
			st["split"] = split
		}
		if u.lastGood != nil {
			st["lastApplied"] = string(u.lastGood)
		}
		if sameJSON(old, st) {
			return nil
		}
		obj.Object["status"] = st
		_, err := rc.UpdateStatus(ctx, obj, metav1.UpdateOptions{})
		return err
	})
}

// convert copies a JSON-shaped value into out through JSON (numbers as Kubernetes' JSON
// decoder gives them: int64 when integral).
// stepTraffic is the split served for traffic while the analysis state in status runs on
// the spec the status's state is for (the server's rule, xds/analysis_loop.go analysisSpec:
// rollout.StepSplit at the state's step; not for a failed analysis, whose rollback shows
// instead); traffic itself otherwise.
func stepTraffic(traffic map[string]int, a *rollout.Analysis, status map[string]any) map[string]int {
	if a == nil || len(a.Steps) == 0 {
		return traffic
	}
	var st struct {
		SpecFingerprint string `json:"specFingerprint"`
		Analysis        *struct {
			SpecFingerprint string `json:"specFingerprint"`
			Step            int    `json:"step"`
			Phase           string `json:"phase"`
		} `json:"analysis"`
	}
	if convert(status, &st) != nil || st.Analysis == nil || st.Analysis.SpecFingerprint == "" ||
		st.Analysis.SpecFingerprint != st.SpecFingerprint || st.Analysis.Phase == store.PhaseFailed {
		return traffic
	}
	return rollout.StepSplit(traffic, a.Baseline, a.Canary, a.Steps[min(max(st.Analysis.Step, 0), len(a.Steps)-1)])
}

func convert(in, out any) error {
	b, err := json.Marshal(in)
	if err != nil {
		return err
	}
	return utiljson.Unmarshal(b, out)
}

func sameJSON(a, b any) bool {
	x, err1 := json.Marshal(a)
	y, err2 := json.Marshal(b)
	return err1 == nil && err2 == nil && string(x) == string(y)
}

func sameProblems(a, b []*rollout.Error) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Field != b[i].Field || a[i].Msg != b[i].Msg {
			return false
		}
	}
	return true
}

// pendingRollback is the Rollout's rollback request not acknowledged yet ("": none).
func pendingRollback(obj *unstructured.Unstructured) string {
	req := obj.GetAnnotations()[v1.RollbackRequestAnnotation]
	if req == "" {
		return ""
	}
	if done, _, _ := unstructured.NestedString(obj.Object, "status", "lastRollbackRequest"); done == req {
		return ""
	}
	return req
}

func (s *Source) noteRollbackRequest(o any) {
	obj, ok := o.(*unstructured.Unstructured)
	if !ok || s.rollbackFn == nil || pendingRollback(obj) == "" {
		return
	}
	s.rbMu.Lock()
	s.rbPending[obj.GetName()] = true
	s.rbMu.Unlock()
	select {
	case s.rbKick <- struct{}{}:
	default:
	}
}

// executeRollbacks executes each pending request and acknowledges it.
func (s *Source) executeRollbacks(ctx context.Context) {
	s.rbMu.Lock()
	names := make([]string, 0, len(s.rbPending))
	for n := range s.rbPending {
		names = append(names, n)
	}
	s.rbPending = map[string]bool{}
	s.rbMu.Unlock()
	sort.Strings(names)
	rc := s.cfg.rollouts()
	for _, name := range names {
		obj, err := rc.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			s.cfg.Logger.Warn().Err(err).Str("rollout", name).Msg("read rollback request")
			continue
		}
		id := pendingRollback(obj)
		if id == "" {
			continue // acknowledged meanwhile (another replica)
		}
		model := Model(obj)
		var req v1.RollbackRequest
		err = json.Unmarshal([]byte(id), &req)
		if err != nil {
			err = fmt.Errorf("annotation %s is not a rollback request: %w", v1.RollbackRequestAnnotation, err)
		} else {
			err = s.rollbackFn(ctx, model, id, req)
		}
		cond := metav1.Condition{Type: v1.ConditionRollbackRequest, Status: metav1.ConditionTrue, Reason: v1.ReasonExecuted,
			ObservedGeneration: obj.GetGeneration(), Message: describeRequest(req)}
		if err != nil {
			cond.Status, cond.Reason, cond.Message = metav1.ConditionFalse, v1.ReasonFailed, err.Error()
			s.cfg.Logger.Warn().Err(err).Str("model", model).Str("request", id).Msg("rollback request failed")
		} else {
			s.cfg.Logger.Info().Str("model", model).Str("request", id).Msg("rollback request executed")
		}
		if err := s.acknowledge(ctx, name, id, cond); err != nil && ctx.Err() == nil {
			s.cfg.Logger.Warn().Err(err).Str("rollout", name).Msg("acknowledge rollback request")
		}
	}
}

func describeRequest(r v1.RollbackRequest) string {
	what := "rolled back to the last known-good split"
	switch {
	case r.Release:
		what = "rollback released"
	case r.Version != "":
		what = "all traffic to " + r.Version
	}
	return fmt.Sprintf("%s (asked by %s at %s)", what, r.By, r.At)
}

// acknowledge writes status.lastRollbackRequest = id and the outcome condition, unless
// another replica has acknowledged it already.
func (s *Source) acknowledge(ctx context.Context, name, id string, cond metav1.Condition) error {
	rc := s.cfg.rollouts()
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		obj, err := rc.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if done, _, _ := unstructured.NestedString(obj.Object, "status", "lastRollbackRequest"); done == id {
			return nil
		}
		st, _, _ := unstructured.NestedMap(obj.Object, "status")
		if st == nil {
			st = map[string]any{}
		}
		var conds []metav1.Condition
		if c, ok := st["conditions"]; ok && convert(c, &conds) != nil {
			conds = nil
		}
		meta.SetStatusCondition(&conds, cond)
		var cj any
		if err := convert(conds, &cj); err != nil {
			return err
		}
		st["conditions"] = cj
		st["lastRollbackRequest"] = id
		obj.Object["status"] = st
		_, err = rc.UpdateStatus(ctx, obj, metav1.UpdateOptions{})
		return err
	})
}
