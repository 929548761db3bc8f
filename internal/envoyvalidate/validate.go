// Package envoyvalidate checks Envoy configuration the way Envoy itself would before
// it reaches a proxy: it runs the protoc-gen-validate rules (ValidateAll) on a message
// and then, recursively, on the contents of every google.protobuf.Any inside it,
// which the generated validators never open. A typed_config whose inner message is
// wrong, or whose type is not linked into the binary, is an error here rather than
// a NACK from Envoy.
//
// The Any types are resolved from protoregistry.GlobalTypes: callers import the Go
// packages of the Envoy extensions they use so that those types are registered.
package envoyvalidate

import (
	"errors"
	"fmt"
	"sync"

	udpatypev1 "github.com/cncf/xds/go/udpa/type/v1"
	xdstypev3 "github.com/cncf/xds/go/xds/type/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"
)

// maxAnyDepth bounds how many Any layers are opened inside one another. Real Envoy
// configuration nests a handful (listener -> HCM -> filter -> matcher -> action).
const maxAnyDepth = 32

// validator is what protoc-gen-validate generates on every Envoy message.
type validator interface{ ValidateAll() error }

// Validate checks m and every message packed in an Any inside it, at any depth.
// It reports, all at once and each with its field path:
//   - the protoc-gen-validate rule violations of m and of each unpacked Any;
//   - Any values whose type is not registered or whose bytes do not decode;
//   - fields set that the proto marks deprecated (Envoy warns on them, and turns
//     them into errors release by release).
//
// TypedStruct (xds.type.v3 and udpa.type.v1) is converted to its typed message
// through JSON, as Envoy does, and checked the same way.
func Validate(m proto.Message) error {
	if m == nil {
		return errors.New("validate: nil message")
	}
	var w walker
	w.check(m.ProtoReflect(), &path{seg: string(m.ProtoReflect().Descriptor().Name()), index: -1}, 0)
	return errors.Join(w.errs...)
}

type walker struct {
	errs []error
}

// path is a field path built only when an error needs it: walking a large
// configuration must not pay for strings it never prints.
type path struct {
	parent *path
	seg    string // ".field", "<type>", or a root name
	index  int    // list index when >= 0
	key    string // map key when isKey
	isKey  bool
}

func (p *path) field(name string) *path { return &path{parent: p, seg: "." + name, index: -1} }
func (p *path) elem(i int) *path        { return &path{parent: p, index: i} }
func (p *path) mapKey(k string) *path   { return &path{parent: p, key: k, isKey: true, index: -1} }
func (p *path) typ(name protoreflect.FullName) *path {
	return &path{parent: p, seg: "<" + string(name) + ">", index: -1}
}

func (p *path) String() string {
	if p == nil {
		return ""
	}
	s := p.parent.String() + p.seg
	switch {
	case p.isKey:
		s += fmt.Sprintf("[%q]", p.key)
	case p.index >= 0:
		s += fmt.Sprintf("[%d]", p.index)
	}
	return s
}

func (w *walker) fail(p *path, err error) {
	w.errs = append(w.errs, fmt.Errorf("%s: %w", p, err))
}

// check validates the root message m (one ValidateAll covers every nested message
// that is not inside an Any) and then walks it for Any values and deprecated fields.
func (w *walker) check(m protoreflect.Message, p *path, depth int) {
	if v, ok := m.Interface().(validator); ok {
		if err := v.ValidateAll(); err != nil {
			w.fail(p, err)
		}
	}
	w.walk(m, p, depth)
}

// walk visits the fields of m that can hold an Any or are deprecated (interesting),
// opening Any values. Walking a large configuration by reflection is most of what
// validating it costs: fields of types that can hold neither are never visited.
func (w *walker) walk(m protoreflect.Message, at *path, depth int) {
	if m.Descriptor().FullName() == anyName {
		w.openAny(m, at, depth)
		return
	}
	for _, fd := range interesting(m.Descriptor()) {
		if !m.Has(fd) {
			continue
		}
		if isDeprecated(fd) {
			w.fail(at.field(fd.TextName()), errors.New("field is deprecated"))
		}
		if !holdsMessages(fd) {
			continue
		}
		v := m.Get(fd)
		p := at.field(fd.TextName())
		switch {
		case fd.IsList():
			l := v.List()
			for i := range l.Len() {
				w.walk(l.Get(i).Message(), p.elem(i), depth)
			}
		case fd.IsMap():
			v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
				w.walk(mv.Message(), p.mapKey(k.String()), depth)
				return true
			})
		default:
			w.walk(v.Message(), p, depth)
		}
	}
}

// holdsMessages reports whether fd's values are messages (singular, list or map values).
func holdsMessages(fd protoreflect.FieldDescriptor) bool {
	if fd.IsMap() {
		return fd.MapValue().Kind() == protoreflect.MessageKind || fd.MapValue().Kind() == protoreflect.GroupKind
	}
	return fd.Kind() == protoreflect.MessageKind || fd.Kind() == protoreflect.GroupKind
}

// interestingFields memoises interesting by message descriptor (keyed by the descriptor
// itself, a generated singleton: hashing a pointer, not the type's full name).
var interestingFields sync.Map // protoreflect.MessageDescriptor -> []protoreflect.FieldDescriptor

// interesting lists the fields of md that walk must look at: deprecated ones, and those
// whose messages may hold an Any or a deprecated field (mayHold).
func interesting(md protoreflect.MessageDescriptor) []protoreflect.FieldDescriptor {
	if v, ok := interestingFields.Load(md); ok {
		return v.([]protoreflect.FieldDescriptor)
	}
	var out []protoreflect.FieldDescriptor
	fields := md.Fields()
	for i := range fields.Len() {
		fd := fields.Get(i)
		var sub protoreflect.MessageDescriptor
		switch {
		case fd.IsMap():
			sub = fd.MapValue().Message()
		case fd.Kind() == protoreflect.MessageKind || fd.Kind() == protoreflect.GroupKind:
			sub = fd.Message()
		}
		if isDeprecated(fd) || (sub != nil && mayHold(sub)) {
			out = append(out, fd)
		}
	}
	interestingFields.Store(md, out)
	return out
}

const anyName protoreflect.FullName = "google.protobuf.Any"

// holds memoises mayHold by message type.
var holds sync.Map // protoreflect.FullName -> bool

// mayHold reports whether a message of type md can hold, at any depth, an Any or a field
// marked deprecated: the only things walk looks for.
func mayHold(md protoreflect.MessageDescriptor) bool {
	if v, ok := holds.Load(md.FullName()); ok {
		return v.(bool)
	}
	h := computeHolds(md, map[protoreflect.FullName]bool{})
	holds.Store(md.FullName(), h)
	return h
}

// computeHolds is mayHold without the memo. A type met again while it is being computed
// (a recursive message) counts as holding: an over-approximation only walks more.
func computeHolds(md protoreflect.MessageDescriptor, visiting map[protoreflect.FullName]bool) bool {
	if md.FullName() == anyName {
		return true
	}
	if v, ok := holds.Load(md.FullName()); ok {
		return v.(bool)
	}
	if visiting[md.FullName()] {
		return true
	}
	visiting[md.FullName()] = true
	defer delete(visiting, md.FullName())
	fields := md.Fields()
	for i := range fields.Len() {
		fd := fields.Get(i)
		if isDeprecated(fd) {
			return true
		}
		var sub protoreflect.MessageDescriptor
		switch {
		case fd.IsMap():
			sub = fd.MapValue().Message()
		case fd.Kind() == protoreflect.MessageKind || fd.Kind() == protoreflect.GroupKind:
			sub = fd.Message()
		}
		if sub != nil && computeHolds(sub, visiting) {
			return true
		}
	}
	return false
}

// openAny unpacks an Any from the global registry and checks what is inside.
func (w *walker) openAny(m protoreflect.Message, p *path, depth int) {
	if depth >= maxAnyDepth {
		w.fail(p, fmt.Errorf("more than %d nested Any values", maxAnyDepth))
		return
	}
	a, ok := m.Interface().(*anypb.Any)
	if !ok {
		// A dynamic Any (not the generated type): copy it into one.
		a = new(anypb.Any)
		b, err := proto.Marshal(m.Interface())
		if err == nil {
			err = proto.Unmarshal(b, a)
		}
		if err != nil {
			w.fail(p, fmt.Errorf("read Any: %w", err))
			return
		}
	}
	if a.GetTypeUrl() == "" {
		w.fail(p, errors.New("Any has no type_url"))
		return
	}
	inner, err := anypb.UnmarshalNew(a, proto.UnmarshalOptions{})
	if err != nil {
		if errors.Is(err, protoregistry.NotFound) {
			w.fail(p, fmt.Errorf("Any type %q is not registered (import the Go package of that extension)", a.GetTypeUrl()))
		} else {
			w.fail(p, fmt.Errorf("unpack Any %q: %w", a.GetTypeUrl(), err))
		}
		return
	}
	inPath := p.typ(inner.ProtoReflect().Descriptor().FullName())
	if typeURL, value, ok := typedStruct(inner); ok {
		// Check the TypedStruct's own rules, then the message it stands for.
		w.check(inner.ProtoReflect(), inPath, depth+1)
		typed, err := fromTypedStruct(typeURL, value)
		if err != nil {
			w.fail(inPath, err)
			return
		}
		w.check(typed.ProtoReflect(), inPath.typ(typed.ProtoReflect().Descriptor().FullName()), depth+1)
		return
	}
	w.check(inner.ProtoReflect(), inPath, depth+1)
}

// typedStruct reports whether m is one of the two TypedStruct types.
func typedStruct(m proto.Message) (typeURL string, value *structpb.Struct, ok bool) {
	switch t := m.(type) {
	case *xdstypev3.TypedStruct:
		return t.GetTypeUrl(), t.GetValue(), true
	case *udpatypev1.TypedStruct:
		return t.GetTypeUrl(), t.GetValue(), true
	}
	return "", nil, false
}

// fromTypedStruct builds the typed message a TypedStruct describes; unknown fields
// are errors, as in Envoy.
func fromTypedStruct(typeURL string, value *structpb.Struct) (proto.Message, error) {
	mt, err := protoregistry.GlobalTypes.FindMessageByURL(typeURL)
	if err != nil {
		return nil, fmt.Errorf("TypedStruct type %q is not registered (import the Go package of that extension): %w", typeURL, err)
	}
	js, err := protojson.Marshal(value)
	if err != nil {
		return nil, fmt.Errorf("TypedStruct %q: encode value: %w", typeURL, err)
	}
	msg := mt.New().Interface()
	if err := protojson.Unmarshal(js, msg); err != nil {
		return nil, fmt.Errorf("TypedStruct %q: %w", typeURL, err)
	}
	return msg, nil
}

func isDeprecated(fd protoreflect.FieldDescriptor) bool {
	opts, ok := fd.Options().(*descriptorpb.FieldOptions)
	return ok && opts.GetDeprecated()
}
