// Package oipjson decodes OIP v2 REST inference requests and encodes responses
// without reflection: a small scanner over the request bytes that reuses the slices of
// a pooled Request, so the REST hot path allocates little and the allocation count does
// not grow with the number of elements.
package oipjson

import (
	"errors"
	"math"
	"strconv"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

// maxDepth bounds nesting of data arrays and skipped values.
const maxDepth = 32

// Request is a decoded inference request. Its slices are reused across Decode calls.
type Request struct {
	ID      string
	Inputs  []tensor.Tensor
	Outputs []string // requested output names; empty means all

	idBuf []byte
	str   []byte // scratch for unescaping
}

// Error is a decoding error: what was wrong and where.
type Error struct {
	Offset int
	Msg    string
}

func (e *Error) Error() string {
	return "invalid inference request at byte " + strconv.Itoa(e.Offset) + ": " + e.Msg
}

type scanner struct {
	b     []byte
	i     int
	str   []byte
	limit int // max elements per tensor
}

func (s *scanner) fail(msg string) error { return &Error{Offset: s.i, Msg: msg} }

func (s *scanner) ws() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

func (s *scanner) peek() byte {
	s.ws()
	if s.i < len(s.b) {
		return s.b[s.i]
	}
	return 0
}

func (s *scanner) expect(c byte) error {
	if s.peek() != c {
		if s.i >= len(s.b) {
			return s.fail("unexpected end of input, want '" + string(c) + "'")
		}
		return s.fail("want '" + string(c) + "', got '" + printable(s.b[s.i]) + "'")
	}
	s.i++
	return nil
}

func printable(c byte) string {
	if c >= 0x20 && c < 0x7f {
		return string(c)
	}
	return "\\x" + strconv.FormatUint(uint64(c), 16)
}

// str reads a JSON string and returns its decoded bytes, valid until the next call.
func (s *scanner) string() ([]byte, error) {
	if s.peek() != '"' {
		return nil, s.fail("want a string")
	}
	s.i++
	start := s.i
	// Fast path: no escapes.
	for s.i < len(s.b) {
		c := s.b[s.i]
		if c == '"' {
			out := s.b[start:s.i]
			s.i++
			if !utf8.Valid(out) {
				return nil, s.fail("string is not valid UTF-8")
			}
			return out, nil
		}
		if c == '\\' {
			break
		}
		if c < 0x20 {
			return nil, s.fail("control character in string")
		}
		s.i++
	}
	s.str = append(s.str[:0], s.b[start:s.i]...)
	for s.i < len(s.b) {
		c := s.b[s.i]
		switch {
		case c == '"':
			s.i++
			if !utf8.Valid(s.str) {
				return nil, s.fail("string is not valid UTF-8")
			}
			return s.str, nil
		case c < 0x20:
			return nil, s.fail("control character in string")
		case c != '\\':
			s.str = append(s.str, c)
			s.i++
			continue
		}
		s.i++
		if s.i >= len(s.b) {
			break
		}
		e := s.b[s.i]
		s.i++
		switch e {
		case '"', '\\', '/':
			s.str = append(s.str, e)
		case 'b':
			s.str = append(s.str, '\b')
		case 'f':
			s.str = append(s.str, '\f')
		case 'n':
			s.str = append(s.str, '\n')
		case 'r':
			s.str = append(s.str, '\r')
		case 't':
			s.str = append(s.str, '\t')
		case 'u':
			r, ok := s.hex4()
			if !ok {
				return nil, s.fail("bad \\u escape")
			}
			if utf16.IsSurrogate(r) {
				r2 := rune(-1)
				if s.i+1 < len(s.b) && s.b[s.i] == '\\' && s.b[s.i+1] == 'u' {
					s.i += 2
					if r2, ok = s.hex4(); !ok {
						return nil, s.fail("bad \\u escape")
					}
				}
				r = utf16.DecodeRune(r, r2)
			}
			s.str = utf8.AppendRune(s.str, r)
		default:
			return nil, s.fail("bad escape \\" + printable(e))
		}
	}
	return nil, s.fail("unterminated string")
}

func (s *scanner) hex4() (rune, bool) {
	if s.i+4 > len(s.b) {
		return 0, false
	}
	var r rune
	for _, c := range s.b[s.i : s.i+4] {
		r <<= 4
		switch {
		case c >= '0' && c <= '9':
			r |= rune(c - '0')
		case c >= 'a' && c <= 'f':
			r |= rune(c - 'a' + 10)
		case c >= 'A' && c <= 'F':
			r |= rune(c - 'A' + 10)
		default:
			return 0, false
		}
	}
	s.i += 4
	return r, true
}

// number returns the bytes of a JSON number token, checked against JSON's grammar.
func (s *scanner) number() ([]byte, error) {
	s.ws()
	start := s.i
	b := s.b
	i := s.i
	if i < len(b) && b[i] == '-' {
		i++
	}
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case i < len(b) && b[i] >= '1' && b[i] <= '9':
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
		}
	default:
		return nil, s.fail("want a number")
	}
	if i < len(b) && b[i] == '.' {
		i++
		d := i
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
		}
		if i == d {
			s.i = i
			return nil, s.fail("want digits after '.'")
		}
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		d := i
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
		}
		if i == d {
			s.i = i
			return nil, s.fail("want digits in exponent")
		}
	}
	s.i = i
	return b[start:i], nil
}

func (s *scanner) literal(word string) bool {
	if len(s.b)-s.i >= len(word) && string(s.b[s.i:s.i+len(word)]) == word {
		s.i += len(word)
		return true
	}
	return false
}

// skip consumes any JSON value.
func (s *scanner) skip(depth int) error {
	if depth > maxDepth {
		return s.fail("nesting deeper than " + strconv.Itoa(maxDepth))
	}
	switch c := s.peek(); {
	case c == '"':
		_, err := s.string()
		return err
	case c == '{':
		s.i++
		if s.peek() == '}' {
			s.i++
			return nil
		}
		for {
			if _, err := s.string(); err != nil {
				return err
			}
			if err := s.expect(':'); err != nil {
				return err
			}
			if err := s.skip(depth + 1); err != nil {
				return err
			}
			if s.peek() == ',' {
				s.i++
				continue
			}
			return s.expect('}')
		}
	case c == '[':
		s.i++
		if s.peek() == ']' {
			s.i++
			return nil
		}
		for {
			if err := s.skip(depth + 1); err != nil {
				return err
			}
			if s.peek() == ',' {
				s.i++
				continue
			}
			return s.expect(']')
		}
	case c == 't':
		if s.literal("true") {
			return nil
		}
	case c == 'f':
		if s.literal("false") {
			return nil
		}
	case c == 'n':
		if s.literal("null") {
			return nil
		}
	case c == '-' || (c >= '0' && c <= '9'):
		_, err := s.number()
		return err
	case c == 0 && s.i >= len(s.b):
		return s.fail("unexpected end of input")
	}
	return s.fail("unexpected '" + printable(s.b[s.i]) + "'")
}

// object calls field for each key of a JSON object; field must consume the value.
func (s *scanner) object(field func(key []byte) error) error {
	if err := s.expect('{'); err != nil {
		return err
	}
	if s.peek() == '}' {
		s.i++
		return nil
	}
	for {
		key, err := s.string()
		if err != nil {
			return err
		}
		if err := s.expect(':'); err != nil {
			return err
		}
		if err := field(key); err != nil {
			return err
		}
		if s.peek() == ',' {
			s.i++
			continue
		}
		return s.expect('}')
	}
}

// array calls elem for each element of a JSON array.
func (s *scanner) array(elem func(i int) error) error {
	if err := s.expect('['); err != nil {
		return err
	}
	if s.peek() == ']' {
		s.i++
		return nil
	}
	for n := 0; ; n++ {
		if err := elem(n); err != nil {
			return err
		}
		if s.peek() == ',' {
			s.i++
			continue
		}
		return s.expect(']')
	}
}

// Decode parses body into r, reusing r's storage. limit bounds the elements of any one
// tensor (data and shape product).
func Decode(body []byte, r *Request, limit int) error {
	r.ID = ""
	r.idBuf = r.idBuf[:0]
	r.Inputs = r.Inputs[:0]
	r.Outputs = r.Outputs[:0]
	s := scanner{b: body, str: r.str[:0], limit: limit}
	defer func() { r.str = s.str }()
	var sawInputs, sawID, sawOutputs, sawParams bool
	once := func(seen *bool, key []byte) error {
		if *seen {
			return s.fail("field \"" + string(key) + "\" given twice")
		}
		*seen = true
		return nil
	}
	err := s.object(func(key []byte) error {
		switch string(key) {
		case "id":
			if err := once(&sawID, key); err != nil {
				return err
			}
			v, err := s.string()
			if err != nil {
				return err
			}
			r.idBuf = append(r.idBuf[:0], v...)
			r.ID = string(r.idBuf)
			return nil
		case "parameters":
			if err := once(&sawParams, key); err != nil {
				return err
			}
			if s.peek() != '{' {
				return s.fail("parameters: want an object")
			}
			return s.skip(0)
		case "inputs":
			if err := once(&sawInputs, key); err != nil {
				return err
			}
			return s.array(func(i int) error { return s.input(r) })
		case "outputs":
			if err := once(&sawOutputs, key); err != nil {
				return err
			}
			return s.array(func(i int) error { return s.output(r) })
		}
		return s.fail("unknown field \"" + string(key) + "\"")
	})
	if err != nil {
		return err
	}
	if s.peek() != 0 || s.i < len(s.b) {
		return s.fail("trailing data after the request object")
	}
	if !sawInputs { // an empty list is allowed: the host may assemble inputs from features
		return &Error{Offset: s.i, Msg: "no inputs"}
	}
	return nil
}

func (s *scanner) output(r *Request) error {
	var name []byte
	err := s.object(func(key []byte) error {
		switch string(key) {
		case "name":
			if name != nil {
				return s.fail("outputs: field \"name\" given twice")
			}
			v, err := s.string()
			name = v
			if err == nil {
				r.Outputs = append(r.Outputs, string(v))
			}
			return err
		case "parameters":
			return s.skip(0)
		}
		return s.fail("outputs: unknown field \"" + string(key) + "\"")
	})
	if err == nil && name == nil {
		return s.fail("outputs: an entry has no name")
	}
	return err
}

func (s *scanner) input(r *Request) error {
	idx := len(r.Inputs)
	if idx < cap(r.Inputs) {
		r.Inputs = r.Inputs[:idx+1]
		r.Inputs[idx].Reset()
	} else {
		r.Inputs = append(r.Inputs, tensor.Tensor{})
	}
	t := &r.Inputs[idx]
	var hasName, hasShape, hasParams bool
	dataStart, dataEnd := -1, -1
	err := s.object(func(key []byte) error {
		dup := false
		switch string(key) {
		case "name":
			dup = hasName
		case "datatype":
			dup = t.Datatype != tensor.Invalid
		case "shape":
			dup = hasShape
		case "data":
			dup = dataStart >= 0
		case "parameters":
			dup = hasParams
			hasParams = true
		}
		if dup {
			return s.fail("inputs: field \"" + string(key) + "\" given twice")
		}
		switch string(key) {
		case "name":
			v, err := s.string()
			if err != nil {
				return err
			}
			t.Name = string(v)
			hasName = true
			return nil
		case "datatype":
			v, err := s.string()
			if err != nil {
				return err
			}
			dt, ok := tensor.ParseDatatypeBytes(v)
			if !ok {
				return s.fail("unknown datatype \"" + string(v) + "\"")
			}
			t.Datatype = dt
			return nil
		case "shape":
			hasShape = true
			return s.array(func(i int) error {
				if i >= 16 {
					return s.fail("shape has more than 16 dimensions")
				}
				tok, err := s.number()
				if err != nil {
					return err
				}
				d, perr := strconv.ParseInt(string(tok), 10, 64)
				if perr != nil || d < 0 {
					return s.fail("shape: dimension " + strconv.Quote(string(tok)) + " is not a non-negative integer")
				}
				t.Shape = append(t.Shape, d)
				return nil
			})
		case "parameters":
			return s.skip(0)
		case "data":
			s.ws()
			dataStart = s.i
			if err := s.skip(0); err != nil {
				return err
			}
			dataEnd = s.i
			return nil
		}
		return s.fail("inputs: unknown field \"" + string(key) + "\"")
	})
	if err != nil {
		return err
	}
	switch {
	case !hasName:
		return s.fail("an input has no name")
	case t.Datatype == tensor.Invalid:
		return s.fail("input \"" + t.Name + "\": no datatype")
	case !hasShape:
		return s.fail("input \"" + t.Name + "\": no shape")
	case dataStart < 0:
		return s.fail("input \"" + t.Name + "\": no data")
	}
	if _, err := tensor.Elements(t.Shape, s.limit); err != nil {
		return s.fail("input \"" + t.Name + "\": " + err.Error())
	}
	end := s.i
	s.i = dataStart
	if err := s.data(t, 0); err != nil {
		return err
	}
	if s.i != dataEnd {
		return s.fail("input \"" + t.Name + "\": malformed data")
	}
	s.i = end
	return nil
}

// data flattens a (possibly nested) JSON array of t's datatype into t.
func (s *scanner) data(t *tensor.Tensor, depth int) error {
	if depth > maxDepth {
		return s.fail("data nested deeper than " + strconv.Itoa(maxDepth))
	}
	return s.array(func(int) error {
		c := s.peek()
		if c == '[' {
			return s.data(t, depth+1)
		}
		if t.Len() >= s.limit {
			return s.fail("input \"" + t.Name + "\": more than " + strconv.Itoa(s.limit) + " elements")
		}
		return s.element(t, c)
	})
}

func (s *scanner) element(t *tensor.Tensor, c byte) error {
	switch t.Datatype {
	case tensor.FP32, tensor.FP64:
		if c == 'n' && s.literal("null") { // null is a missing value: NaN
			if t.Datatype == tensor.FP32 {
				t.F32 = append(t.F32, float32(math.NaN()))
			} else {
				t.F64 = append(t.F64, math.NaN())
			}
			return nil
		}
		tok, err := s.number()
		if err != nil {
			return s.typeErr(t)
		}
		if t.Datatype == tensor.FP32 {
			f, err := strconv.ParseFloat(string(tok), 32)
			if err != nil {
				return s.fail("input \"" + t.Name + "\": " + strconv.Quote(string(tok)) + " is out of FP32 range")
			}
			t.F32 = append(t.F32, float32(f))
		} else {
			f, err := strconv.ParseFloat(string(tok), 64)
			if err != nil {
				return s.fail("input \"" + t.Name + "\": " + strconv.Quote(string(tok)) + " is out of FP64 range")
			}
			t.F64 = append(t.F64, f)
		}
		return nil
	case tensor.FP16:
		// A JSON number parsed as float64, then rounded once to binary16 (nearest,
		// ties to even); beyond FP16's range is ±Inf, as IEEE rounding gives; null is NaN.
		if c == 'n' && s.literal("null") {
			t.F16 = append(t.F16, 0x7e00)
			return nil
		}
		tok, err := s.number()
		if err != nil {
			return s.typeErr(t)
		}
		f, err := strconv.ParseFloat(string(tok), 64)
		if err != nil && !errors.Is(err, strconv.ErrRange) { // ErrRange: ±Inf or ±0, kept
			return s.fail("input \"" + t.Name + "\": " + strconv.Quote(string(tok)) + " is not an FP16")
		}
		t.F16 = append(t.F16, tensor.F16FromFloat64(f))
		return nil
	case tensor.BOOL:
		switch {
		case s.literal("true"):
			t.Bool = append(t.Bool, true)
		case s.literal("false"):
			t.Bool = append(t.Bool, false)
		default:
			return s.typeErr(t)
		}
		return nil
	case tensor.BYTES:
		if c != '"' {
			return s.typeErr(t)
		}
		v, err := s.string()
		if err != nil {
			return err
		}
		t.Bytes = append(t.Bytes, append([]byte(nil), v...))
		return nil
	case tensor.UINT64:
		tok, err := s.number()
		if err != nil {
			return s.typeErr(t)
		}
		u, err := strconv.ParseUint(string(tok), 10, 64)
		if err != nil {
			return s.fail("input \"" + t.Name + "\": " + strconv.Quote(string(tok)) + " is not a UINT64")
		}
		t.U64 = append(t.U64, u)
		return nil
	}
	tok, err := s.number()
	if err != nil {
		return s.typeErr(t)
	}
	v, err := strconv.ParseInt(string(tok), 10, 64)
	lo, hi := t.Datatype.IntRange()
	if err != nil || v < lo || v > hi {
		return s.fail("input \"" + t.Name + "\": " + strconv.Quote(string(tok)) + " is not a " + t.Datatype.String())
	}
	t.I64 = append(t.I64, v)
	return nil
}

func (s *scanner) typeErr(t *tensor.Tensor) error {
	return s.fail("input \"" + t.Name + "\": element is not a " + t.Datatype.String())
}
