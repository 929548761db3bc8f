package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	v1 "github.com/patchbay-io/patchbay/api/k8s/v1"
	"github.com/patchbay-io/patchbay/xds"
	"github.com/patchbay-io/patchbay/xds/kube"
	"github.com/patchbay-io/patchbay/xds/store"
)

// The sources of `patchbay xds --source`.
const (
	sourceFiles      = "files"
	sourceKubernetes = "kubernetes"
)

// serviceAccountNamespace is where a pod finds its own namespace.
const serviceAccountNamespace = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

// defaultNamespace is `xds --namespace` when not given: the pod's own namespace, else "default".
func defaultNamespace() string {
	if b, err := os.ReadFile(serviceAccountNamespace); err == nil {
		if ns := strings.TrimSpace(string(b)); ns != "" {
			return ns
		}
	}
	return "default"
}

// The rollback request contract (api/k8s/v1): `patchbay rollout rollback --kubeconfig`
// sets the annotation v1.RollbackRequestAnnotation (patchbay.io/rollback-request) to a JSON
// v1.RollbackRequest. A control plane executes a value that differs from the Rollout's
// status.lastRollbackRequest, then writes that value there with the outcome in the
// RollbackRequest condition. It never edits the annotation, so its Role needs no write
// access to Rollouts themselves.
const RollbackRequestAnnotation = v1.RollbackRequestAnnotation

// rolloutsGVR is the Rollout resource, read as JSON through the dynamic client.
var rolloutsGVR = v1.GroupVersionResource

// kubeTarget is the cluster a CLI command talks to.
type kubeTarget struct {
	dyn       dynamic.Interface
	kube      kubernetes.Interface
	namespace string
	user      string // the kubeconfig's user name, if any
}

// connectKube loads a client config as kubectl does (--kubeconfig, else $KUBECONFIG,
// else ~/.kube/config, else the in-cluster ServiceAccount); the namespace is --namespace,
// else the kubeconfig context's, else "default".
func connectKube(kubeconfig, namespace string) (*kubeTarget, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = kubeconfig
	cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{})
	cfg, err := cc.ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("kubernetes client config: %w", err)
	}
	if namespace == "" {
		if namespace, _, err = cc.Namespace(); err != nil || namespace == "" {
			namespace = "default"
		}
	}
	cfg = rest.CopyConfig(cfg)
	cfg.ContentType, cfg.AcceptContentTypes = "application/json", "application/json" // custom resources speak JSON
	cfg.UserAgent = "patchbay-cli"
	t := &kubeTarget{namespace: namespace}
	if t.dyn, err = dynamic.NewForConfig(cfg); err != nil {
		return nil, err
	}
	if t.kube, err = kubernetes.NewForConfig(cfg); err != nil {
		return nil, err
	}
	if raw, err := cc.RawConfig(); err == nil {
		if ctx := raw.Contexts[raw.CurrentContext]; ctx != nil {
			t.user = ctx.AuthInfo
		}
	}
	return t, nil
}

// whoAmI is the user name the API server gives us (SelfSubjectReview), else the
// kubeconfig's user, else the local user.
func (k *kubeTarget) whoAmI(ctx context.Context) string {
	r, err := k.kube.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err == nil && r.Status.UserInfo.Username != "" {
		return r.Status.UserInfo.Username
	}
	if k.user != "" {
		return k.user
	}
	return os.Getenv("USER")
}

// rollouts returns the namespace's Rollouts, or the one serving model (its name, or
// status.model / spec.model).
func (k *kubeTarget) rollouts(ctx context.Context, model string) ([]unstructured.Unstructured, error) {
	rc := k.dyn.Resource(rolloutsGVR).Namespace(k.namespace)
	if model != "" {
		obj, err := rc.Get(ctx, model, metav1.GetOptions{})
		if err == nil {
			return []unstructured.Unstructured{*obj}, nil
		}
		if !apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("get Rollout %s/%s: %w", k.namespace, model, err)
		}
	}
	list, err := rc.List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list Rollouts in %s: %w", k.namespace, err)
	}
	if model == "" {
		sort.Slice(list.Items, func(i, j int) bool { return modelOf(&list.Items[i]) < modelOf(&list.Items[j]) })
		return list.Items, nil
	}
	for _, o := range list.Items {
		if modelOf(&o) == model {
			return []unstructured.Unstructured{o}, nil
		}
	}
	return nil, fmt.Errorf("no Rollout for model %q in namespace %s", model, k.namespace)
}

// modelOf is the model a Rollout serves: status.model, spec.model, else its name.
func modelOf(o *unstructured.Unstructured) string {
	for _, path := range [][]string{{"status", "model"}, {"spec", "model"}} {
		if m, _, _ := unstructured.NestedString(o.Object, path...); m != "" {
			return m
		}
	}
	return o.GetName()
}

// writeRolloutStatus prints what the control plane reports in a Rollout's status.
func writeRolloutStatus(w io.Writer, o *unstructured.Unstructured) {
	str := func(path ...string) string {
		s, _, _ := unstructured.NestedString(o.Object, path...)
		if s == "" {
			return "-"
		}
		return s
	}
	fmt.Fprintf(w, "model %s (Rollout %s/%s, generation %d, observed %s)\n", modelOf(o), o.GetNamespace(), o.GetName(),
		o.GetGeneration(), fmt.Sprint(nestedInt(o, "status", "observedGeneration")))
	fmt.Fprintf(w, "  split:     %s\n", str("status", "split"))
	fmt.Fprintf(w, "  state:     %s\n", str("status", "state"))
	if rb, ok, _ := unstructured.NestedMap(o.Object, "status", "rollback"); ok {
		traffic, _ := rb["traffic"].(map[string]any)
		fmt.Fprintf(w, "  rollback:  %s (%v, at %v)\n", splitString(traffic), rb["reason"], rb["at"])
	} else {
		fmt.Fprintf(w, "  rollback:  none\n")
	}
	if req := o.GetAnnotations()[RollbackRequestAnnotation]; req != "" {
		handled, _, _ := unstructured.NestedString(o.Object, "status", "lastRollbackRequest")
		state := "pending"
		if handled == req {
			state = "handled"
		}
		fmt.Fprintf(w, "  request:   %s (%s)\n", req, state)
	}
	conds, _, _ := unstructured.NestedSlice(o.Object, "status", "conditions")
	if len(conds) == 0 {
		fmt.Fprintf(w, "  condition: none (the control plane has not reported on it)\n")
	}
	for _, c := range conds {
		m, _ := c.(map[string]any)
		fmt.Fprintf(w, "  condition: %v=%v %v: %v\n", m["type"], m["status"], m["reason"], m["message"])
	}
}

func nestedInt(o *unstructured.Unstructured, path ...string) int64 {
	v, _, _ := unstructured.NestedFieldNoCopy(o.Object, path...)
	switch n := v.(type) {
	case int64:
		return n
	case float64:
		return int64(n)
	}
	return 0
}

// splitString prints a split "v7=90,v8=10", versions sorted.
func splitString(traffic map[string]any) string {
	var parts []string
	for v, p := range traffic {
		parts = append(parts, fmt.Sprintf("%s=%v", v, p))
	}
	sort.Strings(parts)
	return strings.Join(parts, ",")
}

// kubeRollback asks the control plane for a rollback through the Rollout's annotation and
// waits (up to wait; 0: not at all) until the control plane acknowledges it.
func kubeRollback(ctx context.Context, k *kubeTarget, model, version string, release bool, wait time.Duration, stdout io.Writer) error {
	ros, err := k.rollouts(ctx, model)
	if err != nil {
		return fmt.Errorf("rollback: %w", err)
	}
	o := ros[0]
	req := v1.RollbackRequest{Version: version, Release: release, At: time.Now().UTC().Format(time.RFC3339Nano), By: k.whoAmI(ctx)}
	value, err := json.Marshal(req)
	if err != nil {
		return err
	}
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{RollbackRequestAnnotation: string(value)}}})
	if err != nil {
		return err
	}
	rc := k.dyn.Resource(rolloutsGVR).Namespace(k.namespace)
	if _, err := rc.Patch(ctx, o.GetName(), types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("rollback: annotate Rollout %s/%s: %w", k.namespace, o.GetName(), err)
	}
	fmt.Fprintf(stdout, "rollback requested on Rollout %s/%s: %s\n", k.namespace, o.GetName(), value)
	if wait <= 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	acked := false
	for {
		cur, err := rc.Get(ctx, o.GetName(), metav1.GetOptions{})
		if err == nil {
			if handled, _, _ := unstructured.NestedString(cur.Object, "status", "lastRollbackRequest"); handled == string(value) {
				acked = true
				if c := condition(cur, v1.ConditionRollbackRequest); c != nil && c["status"] == "False" {
					writeRolloutStatus(stdout, cur)
					return fmt.Errorf("rollback: the control plane refused the request: %v", c["message"])
				}
				// Executed: wait for the served state to show in status (written after each reload).
				if state, _, _ := unstructured.NestedString(cur.Object, "status", "state"); (state == v1.StateRolledBack) != release {
					writeRolloutStatus(stdout, cur)
					return nil
				}
			}
		}
		select {
		case <-ctx.Done():
			if acked {
				if cur, err := rc.Get(context.Background(), o.GetName(), metav1.GetOptions{}); err == nil {
					writeRolloutStatus(stdout, cur)
				}
				return fmt.Errorf("rollback: the control plane executed the request, but the Rollout's status did not show it within %v", wait)
			}
			return fmt.Errorf("rollback: the request is recorded on Rollout %s/%s, but no control plane acknowledged it within %v (status.lastRollbackRequest); is one running with --source kubernetes in %s?",
				k.namespace, o.GetName(), wait, k.namespace)
		case <-tick.C:
		}
	}
}

// condition is the status condition of that type (nil: none).
func condition(o *unstructured.Unstructured, typ string) map[string]any {
	conds, _, _ := unstructured.NestedSlice(o.Object, "status", "conditions")
	for _, c := range conds {
		if m, ok := c.(map[string]any); ok && m["type"] == typ {
			return m
		}
	}
	return nil
}

// Executing a cluster rollback request (the annotation above) exactly once.
//
// Every replica sees a request before one of them acknowledges it, and a rollback to the
// last known-good split taken twice goes back twice. So each execution carries the
// request's tag (a hash of the annotation's value) in its context; requestStore's Update,
// which runs inside the Store's compare-and-swap, leaves the state alone when the
// rollback in force already carries that tag, and tags the rollback it writes (the tag
// ends its reason: "last known-good split (request 1a2b3c4d5e6f)"). The replica that
// loses the race re-runs the update on the winner's state and changes nothing.

type requestTagKey struct{}

// requestTag is the short tag of a rollback request's annotation value.
func requestTag(id string) string {
	sum := sha256.Sum256([]byte(id))
	return "request " + hex.EncodeToString(sum[:6])
}

func executedBy(st store.ModelState, tag string) bool {
	return st.Rollback != nil && strings.HasSuffix(st.Rollback.Reason, "("+tag+")")
}

// requestStore is a Store whose updates made for a rollback request are idempotent.
type requestStore struct{ store.Store }

func (s requestStore) Update(ctx context.Context, model string, fn func(store.ModelState) (store.ModelState, error)) (store.ModelState, error) {
	tag, ok := ctx.Value(requestTagKey{}).(string)
	if !ok {
		return s.Store.Update(ctx, model, fn)
	}
	return s.Store.Update(ctx, model, func(cur store.ModelState) (store.ModelState, error) {
		if executedBy(cur, tag) {
			return cur, nil // another replica executed this request
		}
		next, err := fn(cur)
		if err == nil && next.Rollback != nil {
			rb := *next.Rollback
			rb.Reason += " (" + tag + ")"
			next.Rollback = &rb
		}
		return next, err
	})
}

// rollbackRequests executes a request with the server's own rollback and release (the
// rules of the admin API), once per request whatever the number of replicas.
func rollbackRequests(srv *xds.Server, st store.Store) kube.RollbackFunc {
	return func(ctx context.Context, model, id string, req v1.RollbackRequest) error {
		tag := requestTag(id)
		ctx = context.WithValue(ctx, requestTagKey{}, tag)
		var err error
		if req.Release {
			_, _, err = srv.Release(ctx, model)
			if err != nil && strings.Contains(err.Error(), "no rollback in force") {
				return nil // released already (by another replica, or never in force): the state asked for holds
			}
			return err
		}
		if _, _, err = srv.Rollback(ctx, model, req.Version); err == nil {
			return nil
		}
		// Refused by a replica that served another's execution of this very request
		// before its own (its rule ran on the rolled-back state): it was executed.
		if all, lerr := st.Load(ctx); lerr == nil && executedBy(all[model], tag) {
			return nil
		}
		return err
	}
}
