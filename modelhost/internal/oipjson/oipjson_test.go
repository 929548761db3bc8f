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
		{`{"inputs":[{"name":"x","datatype":"FP16","shape":[1],"data":[1]}]}`, "FP16 is not supported"},
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
