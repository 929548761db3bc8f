package main

import (
	"context"
	"encoding/json"
	"errors"
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
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
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

// RollbackRequestAnnotation is the contract between `patchbay rollout rollback
// --kubeconfig` and the control plane: its value is a JSON rollbackRequest. The control
// plane executes a request whose value differs from the Rollout's
// status.lastRollbackRequest, then writes that value there (whatever the outcome; a
// failure also lands in the Ready condition). It never edits the annotation, so its Role
// needs no write access to Rollouts themselves.
const RollbackRequestAnnotation = "patchbay.io/rollback-request"

// rollbackRequest is the annotation's value.
type rollbackRequest struct {
	// Version: send 100% to it (empty: the last known-good split, as the admin API).
	Version string `json:"version,omitempty"`
	// Release: end the rollback in force instead (as DELETE on the admin API).
	Release bool `json:"release,omitempty"`
	// At is when the operator asked (RFC 3339, UTC); it makes every request distinct.
	At string `json:"at"`
	// By is who asked, as the API server authenticated them.
	By string `json:"by"`
}

// rolloutsGVR is the Rollout resource (api/k8s/v1; named here so the CLI reads any
// Rollout as JSON without depending on the control plane's packages).
var rolloutsGVR = schema.GroupVersionResource{Group: "patchbay.io", Version: "v1", Resource: "rollouts"}

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
	req := rollbackRequest{Version: version, Release: release, At: time.Now().UTC().Format(time.RFC3339Nano), By: k.whoAmI(ctx)}
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
	for {
		cur, err := rc.Get(ctx, o.GetName(), metav1.GetOptions{})
		if err == nil {
			if handled, _, _ := unstructured.NestedString(cur.Object, "status", "lastRollbackRequest"); handled == string(value) {
				writeRolloutStatus(stdout, cur)
				if !release && !rolledBack(cur) {
					return errors.New("rollback: the control plane handled the request but the Rollout is not rolled back (see its condition)")
				}
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("rollback: the request is recorded on Rollout %s/%s, but no control plane acknowledged it within %v (status.lastRollbackRequest); is one running with --source kubernetes in %s?",
				k.namespace, o.GetName(), wait, k.namespace)
		case <-tick.C:
		}
	}
}

func rolledBack(o *unstructured.Unstructured) bool {
	_, ok, _ := unstructured.NestedMap(o.Object, "status", "rollback")
	return ok
}
