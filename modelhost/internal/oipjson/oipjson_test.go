package oipjson

import (
	"encoding/json"
	"math"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

func TestDecode(t *testing.T) {
	nan := float32(math.NaN())
	for _, tc := range []struct {
		name string
		body string
		want Request
	}{
		{"flat fp32", `{"id":"r1","inputs":[{"name":"x","datatype":"FP32","shape":[2,2],"data":[1,2.5,-3e2,0]}]}`,
			Request{ID: "r1", Inputs: []tensor.Tensor{{Name: "x", Datatype: tensor.FP32, Shape: []int64{2, 2}, F32: []float32{1, 2.5, -300, 0}}}}},
		{"nested data and keys in any order", `{"inputs":[{"data":[[1,2],[3,4]],"shape":[2,2],"datatype":"FP32","name":"x"}],"id":"z"}`,
			Request{ID: "z", Inputs: []tensor.Tensor{{Name: "x", Datatype: tensor.FP32, Shape: []int64{2, 2}, F32: []float32{1, 2, 3, 4}}}}},
		{"null is missing", `{"inputs":[{"name":"x","datatype":"FP32","shape":[2],"data":[null,1]}]}`,
			Request{Inputs: []tensor.Tensor{{Name: "x", Datatype: tensor.FP32, Shape: []int64{2}, F32: []float32{nan, 1}}}}},
		{"ints, bools, bytes, outputs, parameters", `{"parameters":{"a":{"b":[1,true]}},"inputs":[
			{"name":"i","datatype":"INT64","shape":[2],"data":[-9007199254740993,7]},
			{"name":"b","datatype":"BOOL","shape":[1],"data":[true],"parameters":{}},
			{"name":"s","datatype":"BYTES","shape":[1],"data":["h\u00e9\n"]}],
			"outputs":[{"name":"y"},{"name":"z","parameters":{"binary_data":false}}]}`,
			Request{Inputs: []tensor.Tensor{
				{Name: "i", Datatype: tensor.INT64, Shape: []int64{2}, I64: []int64{-9007199254740993, 7}},
				{Name: "b", Datatype: tensor.BOOL, Shape: []int64{1}, Bool: []bool{true}},
				{Name: "s", Datatype: tensor.BYTES, Shape: []int64{1}, Bytes: [][]byte{[]byte("hé\n")}},
			}, Outputs: []string{"y", "z"}}},
		{"fp16 rounds to nearest even, overflows to Inf", `{"inputs":[{"name":"h","datatype":"FP16","shape":[8],"data":[1,0.1,65504,65519.99,65520,-1e400,null,2.98023223876953125e-8]}]}`,
			Request{Inputs: []tensor.Tensor{{Name: "h", Datatype: tensor.FP16, Shape: []int64{8},
				F16: []uint16{0x3c00, 0x2e66, 0x7bff, 0x7bff, 0x7c00, 0xfc00, 0x7e00, 0}}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got Request
			if err := Decode([]byte(tc.body), &got, 1<<20); err != nil {
				t.Fatal(err)
			}
			opts := []cmp.Option{cmpopts.IgnoreUnexported(Request{}), cmpopts.EquateEmpty(), cmpopts.EquateNaNs()}
			if d := cmp.Diff(tc.want, got, opts...); d != "" {
				t.Errorf("decode (-want +got):\n%s", d)
			}
		})
	}
}

func TestDecodeErrors(t *testing.T) {
	for _, tc := range []struct{ body, want string }{
		{``, "want '{'"},
		{`[]`, "want '{'"},
		{`{}`, "no inputs"},
		{`{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}]} x`, "trailing data"},
		{`{"inputz":[]}`, `unknown field "inputz"`},
		{`{"inputs":[{"name":"x","datatype":"FP33","shape":[1],"data":[1]}]}`, `unknown datatype "FP33"`},
		{`{"inputs":[{"name":"x","datatype":"FP32","data":[1]}]}`, "no shape"},
		{`{"inputs":[{"name":"x","datatype":"FP32","shape":[1]}]}`, "no data"},
		{`{"inputs":[{"datatype":"FP32","shape":[1],"data":[1]}]}`, "has no name"},
		{`{"inputs":[{"name":"x","shape":[1],"data":[1]}]}`, "no datatype"},
		{`{"inputs":[{"name":"x","datatype":"FP32","shape":[-1],"data":[1]}]}`, "non-negative integer"},
		{`{"inputs":[{"name":"x","datatype":"FP32","shape":[1.5],"data":[1]}]}`, "non-negative integer"},
		{`{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":["a"]}]}`, "not a FP32"},
		{`{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1e39]}]}`, "out of FP32 range"},
		{`{"inputs":[{"name":"x","datatype":"INT8","shape":[1],"data":[300]}]}`, "is not a INT8"},
		{`{"inputs":[{"name":"x","datatype":"INT64","shape":[1],"data":[1.5]}]}`, "is not a INT64"},
		{`{"inputs":[{"name":"x","datatype":"UINT64","shape":[1],"data":[-1]}]}`, "is not a UINT64"},
		{`{"inputs":[{"name":"x","datatype":"BOOL","shape":[1],"data":[1]}]}`, "not a BOOL"},
		{`{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[01]}]}`, "want ']'"},
		{`{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1.]}]}`, "digits after '.'"},
		{`{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[NaN]}]}`, "unexpected 'N'"},
		{`{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1,2,3,4,5]}]}`, "more than 4 elements"},
		{`{"inputs":[{"name":"x","datatype":"FP32","shape":[100000,100000],"data":[1]}]}`, "more than 4 elements"},
		{`{"inputs":[{"name":"x\u00","datatype":"FP32","shape":[1],"data":[1]}]}`, `bad \u escape`},
		{`{"inputs":[{"name":"` + "\x01" + `","datatype":"FP32","shape":[1],"data":[1]}]}`, "control character"},
		{`{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":` + strings.Repeat("[", 40) + `1` + strings.Repeat("]", 40) + `}]}`, "deeper than"},
		{`{"inputs":[{"name":"x","datatype":"FP16","shape":[1],"data":["1"]}]}`, "element is not a FP16"},
		{`{"inputs":[{"name":"x","datatype":"FP16","shape":[1],"data":[true]}]}`, "element is not a FP16"},
		{`{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}],"outputs":[{"parameters":{}}]}`, "has no name"},
		{`{"id":"` + "\xff" + `","inputs":[]}`, "not valid UTF-8"},
		{`{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}`, "unexpected end of input"},
	} {
		var r Request
		err := Decode([]byte(tc.body), &r, 4)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Decode(%q) = %v, want an error containing %q", tc.body, err, tc.want)
		}
	}
}

func TestEncodeIsValidJSON(t *testing.T) {
	resp := &Response{Model: "m\"", Version: "v1", ID: "id\n\x01é\xff", Outputs: []*tensor.Tensor{
		{Name: "f", Datatype: tensor.FP32, Shape: []int64{3}, F32: []float32{1.5, float32(math.NaN()), float32(math.Inf(1))}},
		{Name: "d", Datatype: tensor.FP64, Shape: []int64{1}, F64: []float64{1e300}},
		{Name: "i", Datatype: tensor.INT32, Shape: []int64{2}, I64: []int64{-1, 2}},
		{Name: "u", Datatype: tensor.UINT64, Shape: []int64{1}, U64: []uint64{math.MaxUint64}},
		{Name: "b", Datatype: tensor.BOOL, Shape: []int64{1}, Bool: []bool{true}},
		{Name: "s", Datatype: tensor.BYTES, Shape: []int64{1}, Bytes: [][]byte{[]byte("a\"b")}},
	}}
	out := AppendResponse(nil, resp)
	var v struct {
		ModelName string `json:"model_name"`
		ID        string `json:"id"`
		Outputs   []struct {
			Name  string            `json:"name"`
			Shape []int64           `json:"shape"`
			Data  []json.RawMessage `json:"data"`
		} `json:"outputs"`
	}
	if err := json.Unmarshal(out, &v); err != nil {
		t.Fatalf("%s: %v", out, err)
	}
	if v.ModelName != `m"` || v.ID != "id\n\x01é\uFFFD" || len(v.Outputs) != 6 || string(v.Outputs[0].Data[1]) != "null" || string(v.Outputs[3].Data[0]) != "18446744073709551615" {
		t.Errorf("round trip: %s", out)
	}
}

// TestDecodeAllocsBounded shows the decoder's allocations do not grow with the data:
// a 16-float and a 4096-float request cost the same once the pooled Request is warm.
func TestDecodeAllocsBounded(t *testing.T) {
	body := func(n int) []byte {
		var b strings.Builder
		b.WriteString(`{"id":"abc","inputs":[{"name":"features","datatype":"FP32","shape":[1,` + itoa(n) + `],"data":[`)
		for i := range n {
			if i > 0 {
				b.WriteByte(',')
			}
			b.WriteString("0.123456")
		}
		b.WriteString(`]}]}`)
		return []byte(b.String())
	}
	var r Request
	small, large := body(16), body(4096)
	_ = Decode(large, &r, 1<<20)
	a16 := testing.AllocsPerRun(100, func() { _ = Decode(small, &r, 1<<20) })
	a4k := testing.AllocsPerRun(100, func() { _ = Decode(large, &r, 1<<20) })
	t.Logf("allocs per decode: 16 floats %.0f, 4096 floats %.0f", a16, a4k)
	if a16 > 4 || a4k != a16 {
		t.Errorf("allocs: %v for 16 floats, %v for 4096; want <= 4 and equal", a16, a4k)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

// FuzzDecode: the decoder never panics; what it accepts, encoding/json accepts too and
// reads the same ids and tensor names and shapes; data counts never exceed the limit.
func FuzzDecode(f *testing.F) {
	f.Add([]byte(`{"id":"r1","inputs":[{"name":"x","datatype":"FP32","shape":[2,2],"data":[[1,2],[3,null]]}],"outputs":[{"name":"y"}]}`))
	f.Add([]byte(`{"inputs":[{"name":"s","datatype":"BYTES","shape":[1],"data":["\ud83d\ude00"]}]}`))
	f.Add([]byte(`{"inputs":[{"name":"i","datatype":"INT8","shape":[3],"data":[-128,0,127]},{"name":"b","datatype":"BOOL","shape":[1],"data":[false]}]}`))
	f.Add([]byte(`{"inputs":[{"name":"h","datatype":"FP16","shape":[4],"data":[1e400,-0.0,null,6.1e-5]}]}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		var r Request
		if err := Decode(body, &r, 64); err != nil {
			return
		}
		var std struct {
			ID     string `json:"id"`
			Inputs []struct {
				Name  string  `json:"name"`
				Shape []int64 `json:"shape"`
			} `json:"inputs"`
		}
		if err := json.Unmarshal(body, &std); err != nil {
			t.Fatalf("accepted %q, encoding/json rejects it: %v", body, err)
		}
		if std.ID != r.ID || len(std.Inputs) != len(r.Inputs) {
			t.Fatalf("%q: id/inputs differ from encoding/json", body)
		}
		for i, in := range r.Inputs {
			if in.Len() > 64 {
				t.Fatalf("%q: input %d holds %d elements over the limit", body, i, in.Len())
			}
			if std.Inputs[i].Name != in.Name || !slicesEqual(std.Inputs[i].Shape, in.Shape) {
				t.Fatalf("%q: input %d differs from encoding/json", body, i)
			}
		}
	})
}

func slicesEqual(a, b []int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// Every finite FP16 value encodes as a JSON number that decodes back to the same bits;
// NaN and ±Inf encode as null (not JSON), which decodes as NaN.
func TestFP16EncodeDecodeAll(t *testing.T) {
	out := &tensor.Tensor{Name: "h", Datatype: tensor.FP16, Shape: []int64{1 << 16}, F16: make([]uint16, 1<<16)}
	for i := range out.F16 {
		out.F16[i] = uint16(i)
	}
	var enc strings.Builder
	enc.WriteString(`{"inputs":[`)
	enc.Write(AppendTensor(nil, out))
	enc.WriteString(`]}`)
	var r Request
	if err := Decode([]byte(enc.String()), &r, 1<<17); err != nil {
		t.Fatal(err)
	}
	got := r.Inputs[0].F16
	if len(got) != 1<<16 {
		t.Fatalf("%d elements", len(got))
	}
	for i, h := range got {
		want := uint16(i)
		if want&0x7c00 == 0x7c00 { // Inf, NaN: null, read as NaN
			want = 0x7e00
		}
		if h != want {
			t.Fatalf("%#04x came back as %#04x", i, h)
		}
	}
}

// FuzzDecodeFP16: a JSON number decoded as FP16 is the half nearest to its float64
// value (no other half is closer), ±Inf only beyond the largest half's rounding range,
// and it encodes to a number that decodes to the same bits.
func FuzzDecodeFP16(f *testing.F) {
	for _, s := range []string{"0", "-0", "1", "0.1", "65504", "65519.99", "65520", "1e400", "-1e-400", "5.960464477539063e-8", "2.9802322387695312e-8", "6.1035156e-5", "1.00048828125"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, num string) {
		body := `{"inputs":[{"name":"h","datatype":"FP16","shape":[1],"data":[` + num + `]}]}`
		var r Request
		if err := Decode([]byte(body), &r, 4); err != nil {
			return
		}
		tok := strings.Trim(num, " \t\r\n[]")
		if len(r.Inputs[0].F16) != 1 || tok == "null" {
			return // not one number
		}
		x, err := strconv.ParseFloat(tok, 64)
		if err != nil && !math.IsInf(x, 0) {
			t.Fatalf("%q accepted, ParseFloat: %v", num, err)
		}
		h := r.Inputs[0].F16[0]
		got := tensor.F16ToFloat64(h)
		if math.IsNaN(got) {
			t.Fatalf("%q decoded as NaN", num)
		}
		if math.IsInf(got, 0) {
			if math.Abs(x) < 65520 {
				t.Fatalf("%q (%v) overflowed to %v", num, x, got)
			}
		} else {
			d := math.Abs(got - x)
			for _, nb := range []uint16{h - 1, h + 1, h ^ 0x8000} {
				if nb&0x7c00 == 0x7c00 {
					continue
				}
				if n := tensor.F16ToFloat64(nb); math.Abs(n-x) < d {
					t.Fatalf("%q (%v): got %v (%#04x), %v (%#04x) is nearer", num, x, got, h, n, nb)
				}
			}
			enc := AppendTensor(nil, &r.Inputs[0])
			var r2 Request
			if err := Decode([]byte(`{"inputs":[`+string(enc)+`]}`), &r2, 4); err != nil || r2.Inputs[0].F16[0] != h {
				t.Fatalf("%q: %s does not decode back to %#04x: %v", num, enc, h, err)
			}
		}
	})
}
