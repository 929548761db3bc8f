// Package tensor is the model host's in-memory tensor: a name, an OIP datatype, a
// shape and one typed slice holding the flattened row-major data. It also checks a
// tensor against a declared signature entry.
package tensor

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Datatype is an OIP tensor datatype.
type Datatype uint8

// The OIP datatypes.
const (
	Invalid Datatype = iota
	BOOL
	UINT8
	UINT16
	UINT32
	UINT64
	INT8
	INT16
	INT32
	INT64
	FP16
	FP32
	FP64
	BYTES
)

var names = [...]string{"INVALID", "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"}

// String returns the OIP spelling ("FP32").
func (d Datatype) String() string {
	if int(d) < len(names) {
		return names[d]
	}
	return "INVALID"
}

// ParseDatatype maps an OIP spelling to a Datatype; ok is false for unknown names.
func ParseDatatype(s string) (Datatype, bool) {
	for i := 1; i < len(names); i++ {
		if names[i] == s {
			return Datatype(i), true
		}
	}
	return Invalid, false
}

// ParseDatatypeBytes is ParseDatatype for a byte slice without allocating.
func ParseDatatypeBytes(b []byte) (Datatype, bool) {
	for i := 1; i < len(names); i++ {
		if names[i] == string(b) {
			return Datatype(i), true
		}
	}
	return Invalid, false
}

// Size is the width in bytes of one element in raw (binary) form; 0 for BYTES.
func (d Datatype) Size() int {
	switch d {
	case BOOL, UINT8, INT8:
		return 1
	case UINT16, INT16, FP16:
		return 2
	case UINT32, INT32, FP32:
		return 4
	case UINT64, INT64, FP64:
		return 8
	}
	return 0
}

// IntRange is the inclusive value range of an integer datatype held in I64.
func (d Datatype) IntRange() (lo, hi int64) {
	switch d {
	case INT8:
		return math.MinInt8, math.MaxInt8
	case INT16:
		return math.MinInt16, math.MaxInt16
	case INT32:
		return math.MinInt32, math.MaxInt32
	case INT64:
		return math.MinInt64, math.MaxInt64
	case UINT8:
		return 0, math.MaxUint8
	case UINT16:
		return 0, math.MaxUint16
	case UINT32:
		return 0, math.MaxUint32
	}
	return 0, 0
}

// Tensor holds one tensor. Exactly one data slice is used, chosen by Datatype:
// F32 (FP32), F64 (FP64), F16 (FP16, IEEE 754 binary16 bit patterns: see half.go),
// I64 (INT8..INT64, UINT8..UINT32), U64 (UINT64), Bool (BOOL), Bytes (BYTES).
type Tensor struct {
	Name     string
	Datatype Datatype
	Shape    []int64
	F32      []float32
	F64      []float64
	I64      []int64
	U64      []uint64
	Bool     []bool
	Bytes    [][]byte
	F16      []uint16
}

// Len is the number of elements held in the tensor's data slice.
func (t *Tensor) Len() int {
	switch t.Datatype {
	case FP32:
		return len(t.F32)
	case FP64:
		return len(t.F64)
	case FP16:
		return len(t.F16)
	case UINT64:
		return len(t.U64)
	case BOOL:
		return len(t.Bool)
	case BYTES:
		return len(t.Bytes)
	case INT8, INT16, INT32, INT64, UINT8, UINT16, UINT32:
		return len(t.I64)
	}
	return 0
}

// Reset empties the tensor, keeping slice capacity for reuse.
func (t *Tensor) Reset() {
	t.Name = ""
	t.Datatype = Invalid
	t.Shape = t.Shape[:0]
	t.F32 = t.F32[:0]
	t.F64 = t.F64[:0]
	t.I64 = t.I64[:0]
	t.U64 = t.U64[:0]
	t.Bool = t.Bool[:0]
	t.Bytes = t.Bytes[:0]
	t.F16 = t.F16[:0]
}

// Elements is the product of shape's dimensions; an error for negative dimensions or
// a product above limit.
func Elements(shape []int64, limit int) (int, error) {
	n := int64(1)
	for i, d := range shape {
		if d < 0 {
			return 0, fmt.Errorf("shape %s: dimension %d is %d, want >= 0", FormatShape(shape), i, d)
		}
		if d != 0 && n > int64(limit)/d {
			return 0, fmt.Errorf("shape %s: more than %d elements", FormatShape(shape), limit)
		}
		n *= d
	}
	if n > int64(limit) {
		return 0, fmt.Errorf("shape %s: more than %d elements", FormatShape(shape), limit)
	}
	return int(n), nil
}

// FormatShape renders a shape as "[-1, 8]".
func FormatShape(shape []int64) string {
	var b strings.Builder
	b.WriteByte('[')
	for i, d := range shape {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(strconv.FormatInt(d, 10))
	}
	b.WriteByte(']')
	return b.String()
}

// Meta is a signature entry: a tensor's name, datatype and shape, -1 marking a
// variable dimension.
type Meta struct {
	Name     string
	Datatype Datatype
	Shape    []int64
}

// Check reports whether t fits m: same datatype, same rank, fixed dimensions equal,
// element count at most limit and equal to what the shape implies.
func (m *Meta) Check(t *Tensor, limit int) error {
	if t.Datatype != m.Datatype {
		return fmt.Errorf("input %q: datatype %s, model expects %s", m.Name, t.Datatype, m.Datatype)
	}
	if len(t.Shape) != len(m.Shape) {
		return fmt.Errorf("input %q: shape %s has rank %d, model expects %s", m.Name, FormatShape(t.Shape), len(t.Shape), FormatShape(m.Shape))
	}
	for i, d := range m.Shape {
		if d >= 0 && t.Shape[i] != d {
			return fmt.Errorf("input %q: shape %s, model expects %s", m.Name, FormatShape(t.Shape), FormatShape(m.Shape))
		}
	}
	n, err := Elements(t.Shape, limit)
	if err != nil {
		return fmt.Errorf("input %q: %w", m.Name, err)
	}
	if got := t.Len(); got != n {
		return fmt.Errorf("input %q: shape %s needs %d elements, got %d", m.Name, FormatShape(t.Shape), n, got)
	}
	return nil
}
