package xdsscale

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// translated is the edge config of n of the benchmark's models as an Envoy client would
// hold it, straight from translate.Envoy.
func translated(t *testing.T, n int) (Snapshot, *rollout.Set) {
	t.Helper()
	dir := t.TempDir()
	WriteModels(t, dir, n)
	set, err := rollout.LoadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	in := &translate.Input{Set: set, Slots: translate.SlotMaps(set, nil)}
	res, err := translate.Envoy(in, translate.Options{EdgeAddress: "127.0.0.1:10000", SidecarAddress: "127.0.0.1:15001"}, translate.Edge)
	if err != nil {
		t.Fatal(err)
	}
	s := Snapshot{Res: map[string]map[string]*Held{}, Got: map[string]bool{}}
	for typ, rs := range res {
		s.Res[typ], s.Got[typ] = map[string]*Held{}, true
		for _, r := range rs {
			a, err := anypb.New(r.(proto.Message))
			if err != nil {
				t.Fatal(err)
			}
			h, err := decode(typ, a)
			if err != nil {
				t.Fatal(err)
			}
			s.Res[typ][name(h.Msg)] = h
		}
	}
	return s, set
}

// TestWalkMatchesLikeEnvoy: on the real translated edge config, each request lands on the
// route Envoy's rules give it (scope, then first match), and what a request for a model
// passes through does not depend on the model's position once the routes are scoped (it
// grew with it in the flat table).
func TestWalkMatchesLikeEnvoy(t *testing.T) {
	s, _ := translated(t, 3)
	if !s.Complete() {
		t.Fatal("the translated config is not complete by the client's rule (a route config or endpoints named but missing)")
	}
	cases := []struct {
		req  Request
		want []string // the matched route's name contains these
	}{
		{Request{Method: "POST", Path: "/v2/models/model-00002/infer"}, []string{"model-00002", "infer", "split"}},
		{Request{Method: "POST", Path: "/v2/models/model-00000/infer", Headers: map[string]string{"x-patchbay-version": "v3"}}, []string{"model-00000", "infer", "v3"}},
		{Request{Method: "GET", Path: "/v2/models/model-00001/ready"}, []string{"model-00001", "ready", "split"}},
	}
	for _, c := range cases {
		_, name, err := s.Matchers(c.req)
		if err != nil {
			t.Fatal(err)
		}
		for _, w := range c.want {
			if !strings.Contains(name, w) {
				t.Errorf("%s %s %v matched %q, want a route naming %v", c.req.Method, c.req.Path, c.req.Headers, name, c.want)
				break
			}
		}
	}
	first, _, _ := s.Matchers(inferReq(0))
	last, _, _ := s.Matchers(inferReq(2))
	_, lookups, _ := s.RouteFor(inferReq(2))
	if lookups > 0 && first != last {
		t.Errorf("scoped routes: matchers for the first model %d, the last %d: want the same", first, last)
	}
	if lookups == 0 && (last-first)%2 != 0 {
		t.Errorf("flat table: matchers first %d, last %d: want the same number of routes per model before each", first, last)
	}
}

// TestEnvoyClientFollowsTheShippedControlPlane: the Envoy-like clients (delta and SotW),
// over real gRPC to the shipped binary, reach a complete config, route every model's
// request, and hold an edit of one model's split.
func TestEnvoyClientFollowsTheShippedControlPlane(t *testing.T) {
	dir := t.TempDir()
	WriteModels(t, dir, 5)
	p := Start(t, Binary(t), dir, time.Minute, HealthOff)
	ctx := WaitCtx(t, time.Minute)
	var clients []*Envoy
	for _, delta := range []bool{true, false} {
		e, err := DialEnvoy(ctx, p.ADS, "envoy-client-test", delta)
		if err != nil {
			t.Fatal(err)
		}
		defer e.Close()
		s, err := e.Wait(ctx, Snapshot.Complete)
		if err != nil {
			t.Fatalf("delta=%v: %v", delta, err)
		}
		if ok, err := lastEditsHeld(s, map[int]int{0: 0, 4: 0}); !ok {
			t.Fatalf("delta=%v: %v", delta, err)
		}
		clients = append(clients, e)
	}
	EditModel(t, dir, 3, 7, false)
	for _, e := range clients {
		s, err := e.Wait(ctx, func(s Snapshot) bool { ok, _ := lastEditsHeld(s, map[int]int{3: 7}); return ok && s.Complete() })
		if err != nil {
			t.Fatalf("delta=%v: the edit did not arrive: %v", e.Delta, err)
		}
		if len(s.Stats.Removed) > 0 || len(s.Stats.SotWShort) > 0 {
			t.Errorf("delta=%v: removals %v, short SotW responses %v", e.Delta, s.Stats.Removed, s.Stats.SotWShort)
		}
	}
}
