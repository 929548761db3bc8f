package main

import (
	"os"
	"strings"
)

// The sources of `patchbay xds --source`.
const (
	sourceFiles      = "files"
	sourceKubernetes = "kubernetes"
)

// serviceAccountNamespace is where a pod finds its own namespace.
const serviceAccountNamespace = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

// defaultNamespace is --namespace when not given: the pod's own namespace, else "default".
func defaultNamespace() string {
	if b, err := os.ReadFile(serviceAccountNamespace); err == nil {
		if ns := strings.TrimSpace(string(b)); ns != "" {
			return ns
		}
	}
	return "default"
}
