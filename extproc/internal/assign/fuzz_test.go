package assign

import (
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"

	"github.com/patchbay-io/patchbay/api/headers"
)

func FuzzParsePath(f *testing.F) {
	for _, s := range []string{"/v2/models/ranker/infer", "/v2/models/ranker/versions/v8/infer?x", "/v2/models//versions/", "/v2/models/a/versions", "/"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, path string) {
		m, v, ok := ParsePath(path)
		if !ok && (m != "" || v != "") {
			t.Fatalf("not a model path but model %q version %q", m, v)
		}
		if ok && (m == "" || strings.ContainsAny(m, "/?#") || strings.ContainsAny(v, "/?#")) {
			t.Fatalf("ParsePath(%q) = %q, %q", path, m, v)
		}
	})
}

// FuzzDecide feeds arbitrary header lists (as "key\x00value\n" lines) to Decide: it must
// never panic, and a routed decision must be for a known model.
func FuzzDecide(f *testing.F) {
	f.Add(":path\x00/v2/models/ranker/infer\nx-user-id\x00u1\nx-country\x00US\n")
	f.Add(":path\x00/v2/models/ranker/versions/v8\nx-patchbay-version\x00v9\n")
	f.Add(":path\x00/inference.GRPCInferenceService/ModelInfer\nx-patchbay-model\x00thumbs\ncontent-type\x00application/grpc\n")
	f.Add(":path\x00/v2/models/ranker/infer\nx-patchbay-model\x00thumbs\n")
	f.Add(":path\x00/x\nx-patchbay-model\x00ranker\nx-patchbay-model\x00ranker\n")
	tbl := compile(f, testPolicy())
	f.Fuzz(func(t *testing.T, raw string) {
		var hs []*corev3.HeaderValue
		for _, line := range strings.Split(raw, "\n") {
			k, v, _ := strings.Cut(line, "\x00")
			hs = append(hs, &corev3.HeaderValue{Key: k, RawValue: []byte(v)})
		}
		hs = append(hs, nil) // a nil header must not crash either
		var d Decision
		Decide(tbl, hs, &d)
		if d.Outcome == Routed && tbl.Model(d.Model.Name) != d.Model {
			t.Fatalf("routed to unknown model %v", d.Model)
		}
		models := 0
		for _, h := range hs {
			if h.GetKey() == headers.Model {
				models++
			}
		}
		if (d.Outcome == Routed || d.Outcome == NeedBody) && models > 1 {
			t.Fatalf("decided a request with %d x-patchbay-model headers", models)
		}
		if pm, _, ok := ParsePath(lastPath(hs)); ok && models == 1 && d.Outcome != ModelConflict && d.HeaderModel != pm {
			t.Fatalf("path model %q and header %q not refused", pm, d.HeaderModel)
		}
		if d.NExposed > len(d.Model.GetLayers()) {
			t.Fatalf("%d exposures for %d layers", d.NExposed, len(d.Model.GetLayers()))
		}
	})
}

func lastPath(hs []*corev3.HeaderValue) (path string) {
	for _, h := range hs {
		if h.GetKey() == ":path" {
			path = Value(h) // Decide reads the last one
		}
	}
	return path
}
