package oipjson

import (
	"math"
	"strconv"
	"unicode/utf8"

	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

// AppendString appends s as a JSON string.
func AppendString(dst []byte, s string) []byte {
	const hex = "0123456789abcdef"
	dst = append(dst, '"')
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' && c < utf8.RuneSelf {
			dst = append(dst, c)
			i++
			continue
		}
		if c < utf8.RuneSelf {
			switch c {
			case '"', '\\':
				dst = append(dst, '\\', c)
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			dst = append(dst, `\ufffd`...)
		} else {
			dst = append(dst, s[i:i+size]...)
		}
		i += size
	}
	return append(dst, '"')
}

// Response is what AppendResponse writes.
type Response struct {
	Model, Version, ID string
	Outputs            []*tensor.Tensor
}

// AppendResponse appends the OIP JSON inference response.
func AppendResponse(dst []byte, r *Response) []byte {
	dst = append(dst, `{"model_name":`...)
	dst = AppendString(dst, r.Model)
	dst = append(dst, `,"model_version":`...)
	dst = AppendString(dst, r.Version)
	if r.ID != "" {
		dst = append(dst, `,"id":`...)
		dst = AppendString(dst, r.ID)
	}
	dst = append(dst, `,"outputs":[`...)
	for i, t := range r.Outputs {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = AppendTensor(dst, t)
	}
	return append(dst, "]}"...)
}

// AppendTensor appends one tensor object with flat data.
func AppendTensor(dst []byte, t *tensor.Tensor) []byte {
	dst = append(dst, `{"name":`...)
	dst = AppendString(dst, t.Name)
	dst = append(dst, `,"datatype":"`...)
	dst = append(dst, t.Datatype.String()...)
	dst = append(dst, `","shape":[`...)
	for i, d := range t.Shape {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = strconv.AppendInt(dst, d, 10)
	}
	dst = append(dst, `],"data":[`...)
	switch t.Datatype {
	case tensor.FP32:
		for i, v := range t.F32 {
			if i > 0 {
				dst = append(dst, ',')
			}
			dst = appendFloat(dst, float64(v), 32)
		}
	case tensor.FP64:
		for i, v := range t.F64 {
			if i > 0 {
				dst = append(dst, ',')
			}
			dst = appendFloat(dst, v, 64)
		}
	case tensor.FP16:
		for i, v := range t.F16 {
			if i > 0 {
				dst = append(dst, ',')
			}
			// The shortest float32 text reads back as this very half (widening is exact).
			dst = appendFloat(dst, float64(tensor.F16ToFloat32(v)), 32)
		}
	case tensor.UINT64:
		for i, v := range t.U64 {
			if i > 0 {
				dst = append(dst, ',')
			}
			dst = strconv.AppendUint(dst, v, 10)
		}
	case tensor.BOOL:
		for i, v := range t.Bool {
			if i > 0 {
				dst = append(dst, ',')
			}
			dst = strconv.AppendBool(dst, v)
		}
	case tensor.BYTES:
		for i, v := range t.Bytes {
			if i > 0 {
				dst = append(dst, ',')
			}
			dst = AppendString(dst, string(v))
		}
	default:
		for i, v := range t.I64 {
			if i > 0 {
				dst = append(dst, ',')
			}
			dst = strconv.AppendInt(dst, v, 10)
		}
	}
	return append(dst, "]}"...)
}

// appendFloat writes a float as JSON; NaN and infinities (not JSON) become null.
func appendFloat(dst []byte, v float64, bits int) []byte {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return append(dst, "null"...)
	}
	return strconv.AppendFloat(dst, v, 'g', -1, bits)
}

// AppendError appends {"error": msg}.
func AppendError(dst []byte, msg string) []byte {
	dst = append(dst, `{"error":`...)
	dst = AppendString(dst, msg)
	return append(dst, '}')
}
