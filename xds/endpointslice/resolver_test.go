package endpointslice

import (
	"context"
	"errors"
	"strings"
	"testing"
)

// TestServiceOf: which names are Service names the resolver answers; everything else
// goes to the next resolver. (The informer path is tested against a real API server in
// test/k8s/endpointslice_test.go.)
func TestServiceOf(t *testing.T) {
	t.Parallel()
	r := New(nil, Options{Namespace: "ml"})
	any := New(nil, Options{ClusterDomain: "k8s.example."})
	for _, tc := range []struct {
		r       *Resolver
		host    string
		ns, svc string
	}{
		{r, "ranker.ml.svc", "ml", "ranker"},
		{r, "ranker.ml.svc.cluster.local", "ml", "ranker"},
		{r, "Ranker.ML.svc.cluster.local.", "ml", "ranker"},
		{r, "ranker.other.svc", "", ""},          // not the watched namespace: DNS
		{r, "pod-0.ranker.ml.svc", "", ""},       // a pod of a headless Service: DNS
		{r, "ranker.ml.svc.k8s.example", "", ""}, // another cluster domain
		{r, "ranker.ml", "", ""},
		{r, "ranker.svc", "", ""},
		{r, "10.0.0.1", "", ""},
		{r, "example.com", "", ""},
		{r, "-x.ml.svc", "", ""},
		{r, "a_b.ml.svc", "", ""},
		{any, "ranker.other.svc.k8s.example", "other", "ranker"},
		{any, "ranker.other.svc.cluster.local", "", ""},
	} {
		ns, svc, ok := tc.r.ServiceOf(tc.host)
		if ok != (tc.svc != "") || ns != tc.ns || svc != tc.svc {
			t.Errorf("ServiceOf(%q) = %q, %q, %v; want %q, %q", tc.host, ns, svc, ok, tc.ns, tc.svc)
		}
	}
}

// TestOtherNamesGoToNext: a name that is not a watched Service's never touches the
// informer (there is none here: the client is nil) and gets the next resolver's answer.
func TestOtherNamesGoToNext(t *testing.T) {
	t.Parallel()
	next := errors.New("next")
	r := New(nil, Options{Namespace: "ml", Next: func(_ context.Context, host string) ([]string, error) {
		return nil, errors.Join(next, errors.New(host))
	}})
	for _, host := range []string{"example.com", "ranker.other.svc"} {
		if _, err := r.LookupHost(context.Background(), host); !errors.Is(err, next) || !strings.Contains(err.Error(), host) {
			t.Errorf("LookupHost(%q): %v, want the next resolver's answer", host, err)
		}
	}
	if z := r.Zones("example.com"); z != nil {
		t.Errorf("Zones(example.com) = %v, want nil", z)
	}
}

// FuzzServiceOf: any host name: no panic, and an answer is a pair of DNS labels.
func FuzzServiceOf(f *testing.F) {
	for _, s := range []string{"ranker.ml.svc", "a.b.svc.cluster.local.", "x", ".svc", "..svc.cluster.local", "ä.ml.svc"} {
		f.Add(s)
	}
	r := New(nil, Options{})
	f.Fuzz(func(t *testing.T, host string) {
		ns, svc, ok := r.ServiceOf(host)
		if ok && (!dnsLabel(ns) || !dnsLabel(svc)) {
			t.Fatalf("ServiceOf(%q) = %q, %q", host, ns, svc)
		}
	})
}
