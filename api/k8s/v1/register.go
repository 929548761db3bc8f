package v1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

const (
	// Group is the API group of patchbay's custom resources.
	Group = "patchbay.io"
	// Version is the API version (the file format's apiVersion is Group/Version).
	Version = "v1"
	// Kind and Resource name the Rollout type.
	Kind     = "Rollout"
	Resource = "rollouts"
	// CRDName is the CustomResourceDefinition's name.
	CRDName = Resource + "." + Group
)

var (
	// SchemeGroupVersion is the group and version of these types.
	SchemeGroupVersion = schema.GroupVersion{Group: Group, Version: Version}
	// GroupVersionResource names rollouts for dynamic clients and informers.
	GroupVersionResource = SchemeGroupVersion.WithResource(Resource)
	// SchemeBuilder registers the types with a runtime.Scheme.
	SchemeBuilder = runtime.NewSchemeBuilder(addKnownTypes)
	// AddToScheme adds Rollout and RolloutList to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)

func addKnownTypes(s *runtime.Scheme) error {
	s.AddKnownTypes(SchemeGroupVersion, &Rollout{}, &RolloutList{})
	metav1.AddToGroupVersion(s, SchemeGroupVersion)
	return nil
}
