// Package kube is the control plane's Kubernetes side: Source reads Rollout custom
// resources (patchbay.io/v1, api/k8s/v1) of one namespace as rollout documents, and Store
// keeps each model's durable state (xds/store.ModelState) in its Rollout's status, written
// with optimistic concurrency so any number of control-plane replicas share it.
//
// Both watch the API with client-go informers. Custom resources are read and written as
// JSON through the dynamic client.
package kube

import (
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/rs/zerolog"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	v1 "github.com/patchbay-io/patchbay/api/k8s/v1"
)

// Clients are the API clients the control plane uses in Kubernetes mode.
type Clients struct {
	// Config is the REST config they were made from (JSON content type).
	Config *rest.Config
	// Dynamic reads and writes Rollouts (custom resources: JSON only).
	Dynamic dynamic.Interface
	// Kube is the typed clientset for built-in resources (EndpointSlices, Leases).
	Kube kubernetes.Interface
}

// NewClients connects with the kubeconfig file named, or with the pod's service account
// (in-cluster config) when kubeconfig is empty.
func NewClients(kubeconfig string) (*Clients, error) {
	var (
		cfg *rest.Config
		err error
	)
	if kubeconfig == "" {
		cfg, err = rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("kubernetes in-cluster config (no --kubeconfig given): %w", err)
		}
	} else {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("kubeconfig %q: %w", kubeconfig, err)
		}
	}
	return NewClientsForConfig(cfg)
}

// NewClientsForConfig makes the clients from a REST config (copied; its content type is
// set to JSON, which custom resources need).
func NewClientsForConfig(cfg *rest.Config) (*Clients, error) {
	cfg = rest.CopyConfig(cfg)
	cfg.ContentType = "application/json"
	cfg.AcceptContentTypes = "application/json"
	if cfg.UserAgent == "" {
		cfg.UserAgent = "patchbay"
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes dynamic client: %w", err)
	}
	kc, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return &Clients{Config: cfg, Dynamic: dyn, Kube: kc}, nil
}

// Config configures a Source or a Store.
type Config struct {
	// Client reads and writes Rollouts (Clients.Dynamic).
	Client dynamic.Interface
	// Namespace holds the Rollouts.
	Namespace string
	Logger    zerolog.Logger
}

func (c Config) rollouts() dynamic.ResourceInterface {
	return c.Client.Resource(v1.GroupVersionResource).Namespace(c.Namespace)
}

// Model is the model a Rollout object serves: spec.model, else its metadata.name.
func Model(obj *unstructured.Unstructured) string {
	if m, _, _ := unstructured.NestedString(obj.Object, "spec", "model"); m != "" {
		return m
	}
	return obj.GetName()
}

// Split renders a split as status.split shows it: versions in the order given (then any
// others by name), those with a share only: "v7=90,v8=10".
func Split(traffic map[string]int, order []string) string {
	var names []string
	for _, v := range order {
		if traffic[v] > 0 && !slices.Contains(names, v) {
			names = append(names, v)
		}
	}
	var rest []string
	for v, p := range traffic {
		if p > 0 && !slices.Contains(names, v) {
			rest = append(rest, v)
		}
	}
	sort.Strings(rest)
	var b strings.Builder
	for i, v := range append(names, rest...) {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(v)
		b.WriteByte('=')
		b.WriteString(strconv.Itoa(traffic[v]))
	}
	return b.String()
}
