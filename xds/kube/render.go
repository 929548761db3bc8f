package kube

import (
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	v1 "github.com/patchbay-io/patchbay/api/k8s/v1"
	"github.com/patchbay-io/patchbay/xds/rollout"
)

// Path is the rollout.File path of a Rollout object: "<namespace>/<name>".
func Path(obj *unstructured.Unstructured) string { return obj.GetNamespace() + "/" + obj.GetName() }

// Render writes a Rollout object as the rollout file document it stands for: apiVersion,
// kind, model (spec.model, else metadata.name), then spec's other fields at the top level
// as the API server holds them. rollout.LoadData then applies every rule of the file format
// to it, the same code path as a file.
func Render(obj *unstructured.Unstructured) ([]byte, error) {
	spec, ok := obj.Object["spec"].(map[string]any)
	if !ok {
		if _, present := obj.Object["spec"]; present {
			return nil, errors.New("spec is not an object")
		}
		spec = nil
	}
	doc := &yaml.Node{Kind: yaml.MappingNode}
	add := func(key string, value any) error {
		var v yaml.Node
		if err := v.Encode(value); err != nil {
			return fmt.Errorf("spec.%s: %w", key, err)
		}
		doc.Content = append(doc.Content, &yaml.Node{Kind: yaml.ScalarNode, Value: key}, &v)
		return nil
	}
	apiVersion := obj.GetAPIVersion()
	if apiVersion == "" {
		apiVersion = rollout.APIVersion
	}
	kind := obj.GetKind()
	if kind == "" {
		kind = v1.Kind
	}
	if err := add("apiVersion", apiVersion); err != nil {
		return nil, err
	}
	if err := add("kind", kind); err != nil {
		return nil, err
	}
	if err := add("model", Model(obj)); err != nil {
		return nil, err
	}
	keys := make([]string, 0, len(spec))
	for k := range spec {
		if k != "model" {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		if err := add(k, spec[k]); err != nil {
			return nil, err
		}
	}
	return yaml.Marshal(doc)
}

// problems flattens a loader error into its located problems (anything else becomes one
// problem without a field). A problem the loader placed by line only (a value of the wrong
// type, e.g. a gate's max written as an object) gets the field path of the value at that
// line of data, the rendered document, since its line means nothing to the author.
func problems(path string, data []byte, err error) []*rollout.Error {
	var out []*rollout.Error
	var fields map[int]string
	var walk func(error)
	walk = func(e error) {
		if j, ok := e.(interface{ Unwrap() []error }); ok {
			for _, c := range j.Unwrap() {
				walk(c)
			}
			return
		}
		var re *rollout.Error
		if errors.As(e, &re) {
			if re.Field == "" && re.Line > 0 {
				if fields == nil {
					fields = lineFields(data)
				}
				if f, ok := fields[re.Line]; ok {
					c := *re
					c.Field = f
					re = &c
				}
			}
			out = append(out, re)
			return
		}
		out = append(out, &rollout.Error{File: path, Msg: e.Error()})
	}
	if err != nil {
		walk(err)
	}
	return out
}

// lineFields maps each line of a rendered document to the field path of the outermost
// value that starts on it ("analysis.gates[1].max"); nothing for an unreadable document.
func lineFields(data []byte) map[int]string {
	out := map[int]string{}
	var doc yaml.Node
	if yaml.Unmarshal(data, &doc) != nil || len(doc.Content) == 0 {
		return out
	}
	var walk func(n *yaml.Node, path string)
	visit := func(v *yaml.Node, p string) {
		if _, taken := out[v.Line]; !taken {
			out[v.Line] = p
		}
		walk(v, p)
	}
	walk = func(n *yaml.Node, path string) {
		switch n.Kind {
		case yaml.MappingNode:
			for i := 0; i+1 < len(n.Content); i += 2 {
				p := n.Content[i].Value
				if path != "" {
					p = path + "." + p
				}
				visit(n.Content[i+1], p)
			}
		case yaml.SequenceNode:
			for i, c := range n.Content {
				visit(c, path+"["+strconv.Itoa(i)+"]")
			}
		}
	}
	walk(doc.Content[0], "")
	return out
}

// FieldPath is where a problem is in a Rollout object: the file format's field path under
// spec ("spec.traffic.v7"); apiVersion and kind are the object's own.
func FieldPath(field string) string {
	switch {
	case field == "":
		return "spec"
	case field == "apiVersion" || field == "kind":
		return field
	}
	return "spec." + field
}

// maxMessage bounds a condition message (the API allows 32768 bytes).
const maxMessage = 4096

// Message is a condition message for problems: each one's field path and what is wrong,
// no line numbers (those are of the rendered document, not of anything the author wrote).
func Message(ps []*rollout.Error) string {
	var b strings.Builder
	for i, p := range ps {
		if i > 0 {
			b.WriteString("; ")
		}
		if p.Field != "" || p.File != "" {
			// Located in the document; a problem of no document (AllDocuments) is its message.
			b.WriteString(FieldPath(p.Field))
			b.WriteString(": ")
		}
		b.WriteString(p.Msg)
	}
	s := b.String()
	if len(s) > maxMessage {
		s = s[:maxMessage-3] + "..."
	}
	return s
}
