package k8s

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/patchbay-io/patchbay/xds/endpointslice"
)

// esNamespace creates a namespace of its own for an EndpointSlice test.
func esNamespace(t *testing.T, kc kubernetes.Interface, name string) string {
	t.Helper()
	ns := fmt.Sprintf("es-%s-%d", name, time.Now().UnixNano()%1e9)
	if _, err := kc.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return ns
}

// slice builds an EndpointSlice of a Service; each endpoint is "addr[,zone][,notready]".
type ep struct {
	addr     string
	zone     string
	notReady bool
	unknown  bool // conditions.ready unset (unknown: consumers treat it as ready)
}

func slice(ns, name, service string, family discoveryv1.AddressType, eps ...ep) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{
			discoveryv1.LabelServiceName: service, discoveryv1.LabelManagedBy: "patchbay-test",
		}},
		AddressType: family,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8000))}},
	}
	for _, e := range eps {
		out := discoveryv1.Endpoint{Addresses: []string{e.addr}}
		if !e.unknown {
			out.Conditions.Ready = ptr(!e.notReady)
		}
		if e.zone != "" {
			out.Zone = ptr(e.zone)
		}
		s.Endpoints = append(s.Endpoints, out)
	}
	return s
}

func ptr[T any](v T) *T { return &v }

// TestEndpointSliceResolver runs the resolver against the real API server: a Service
// name answers the ready addresses of its EndpointSlices (IPv4 and IPv6, not-ready ones
// left out, unknown readiness counted ready, duplicates across slices once, sorted), with
// their zones; answers follow updates and deletions of slices; a Service whose endpoints
// are all not ready has no address (never DNS's answer); other names, and Services of
// other namespaces, go to the next resolver.
func TestEndpointSliceResolver(t *testing.T) {
	kc, err := kubernetes.NewForConfig(server.Config)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ns := esNamespace(t, kc, "resolver")
	other := esNamespace(t, kc, "other")
	slices_ := kc.DiscoveryV1().EndpointSlices(ns)
	create := func(s *discoveryv1.EndpointSlice) {
		t.Helper()
		if _, err := kc.DiscoveryV1().EndpointSlices(s.Namespace).Create(ctx, s, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	create(slice(ns, "ranker-a", "ranker", discoveryv1.AddressTypeIPv4,
		ep{addr: "10.0.0.2", zone: "zone-a"}, ep{addr: "10.0.0.1", zone: "zone-b", unknown: true}, ep{addr: "10.0.0.3", zone: "zone-a", notReady: true}))
	create(slice(ns, "ranker-b", "ranker", discoveryv1.AddressTypeIPv4, ep{addr: "10.0.0.2", zone: "zone-a"}, ep{addr: "10.0.0.4", zone: "zone-c"}))
	create(slice(ns, "ranker-v6", "ranker", discoveryv1.AddressTypeIPv6, ep{addr: "fd00::1", zone: "zone-b"}, ep{addr: "fd00::2", notReady: true}))
	create(slice(ns, "ranker-fqdn", "ranker", discoveryv1.AddressTypeFQDN, ep{addr: "host.example.com"}))
	create(slice(ns, "churn-a", "churn", discoveryv1.AddressTypeIPv4, ep{addr: "10.0.1.1"}))
	create(slice(ns, "down-a", "down", discoveryv1.AddressTypeIPv4, ep{addr: "10.0.2.1", notReady: true}))
	create(slice(other, "ranker-a", "ranker", discoveryv1.AddressTypeIPv4, ep{addr: "10.9.9.9"}))

	errNext := errors.New("answered by the next resolver")
	var nextAsked []string
	res := endpointslice.New(kc, endpointslice.Options{Namespace: ns, Next: func(_ context.Context, host string) ([]string, error) {
		nextAsked = append(nextAsked, host)
		return nil, errNext
	}})
	res.Start(ctx)
	lookup := func(host string) ([]string, error) {
		lctx, lcancel := context.WithTimeout(ctx, 10*time.Second)
		defer lcancel()
		return res.LookupHost(lctx, host)
	}
	// follows polls a lookup until it answers want (the informer's watch is asynchronous),
	// failing after 30 s with the last answer.
	follows := func(what, host string, want []string) {
		t.Helper()
		var got []string
		var err error
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if got, err = lookup(host); err == nil && slices.Equal(got, want) {
				return
			}
		}
		t.Fatalf("%s: LookupHost(%s) = %v, %v; want %v", what, host, got, err, want)
	}

	short, long := "ranker."+ns+".svc", "ranker."+ns+".svc.cluster.local."
	// The first lookup waits for the informer's first list: no polling needed.
	got, err := lookup(short)
	if want := []string{"10.0.0.1", "10.0.0.2", "10.0.0.4", "fd00::1"}; err != nil || !slices.Equal(got, want) {
		t.Fatalf("LookupHost(%s) = %v, %v; want %v", short, got, err, want)
	}
	if got2, err := lookup(long); err != nil || !slices.Equal(got, got2) {
		t.Errorf("LookupHost(%s) = %v, %v; want the short name's %v", long, got2, err, got)
	}
	wantZones := map[string]string{"10.0.0.1": "zone-b", "10.0.0.2": "zone-a", "10.0.0.4": "zone-c", "fd00::1": "zone-b"}
	if z := res.Zones(long); fmt.Sprint(z) != fmt.Sprint(wantZones) {
		t.Errorf("Zones = %v, want %v", z, wantZones)
	}
	if got, err := lookup("churn." + ns + ".svc"); err != nil || !slices.Equal(got, []string{"10.0.1.1"}) {
		t.Errorf("churn: %v, %v", got, err)
	}
	// No ready endpoint: no address, and not DNS's answer either.
	if got, err := lookup("down." + ns + ".svc"); !errors.Is(err, endpointslice.ErrNoEndpoints) {
		t.Errorf("down (no ready endpoint): %v, %v; want ErrNoEndpoints", got, err)
	}
	if got, err := lookup("missing." + ns + ".svc"); !errors.Is(err, endpointslice.ErrNoEndpoints) {
		t.Errorf("missing Service: %v, %v; want ErrNoEndpoints", got, err)
	}
	// Not a Service name of the watched namespace: the next resolver answers.
	for _, host := range []string{"ranker." + other + ".svc", "example.com", "pod-0.ranker." + ns + ".svc"} {
		if _, err := lookup(host); !errors.Is(err, errNext) {
			t.Errorf("LookupHost(%s): %v, want the next resolver's answer", host, err)
		}
	}
	if len(nextAsked) != 3 {
		t.Errorf("next resolver asked %v, want exactly the three other names", nextAsked)
	}

	// A pod becomes ready, another stops being ready: the answer follows.
	a, err := slices_.Get(ctx, "ranker-a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	a.Endpoints[1].Conditions.Ready = ptr(false) // 10.0.0.1
	a.Endpoints[2].Conditions.Ready = ptr(true)  // 10.0.0.3
	if _, err := slices_.Update(ctx, a, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	follows("after readiness changed", short, []string{"10.0.0.2", "10.0.0.3", "10.0.0.4", "fd00::1"})
	// A slice goes away (its pods scaled down): its addresses go; 10.0.0.2 stays (ranker-a has it too).
	if err := slices_.Delete(ctx, "ranker-b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	follows("after a slice was deleted", short, []string{"10.0.0.2", "10.0.0.3", "fd00::1"})
	// A new slice appears.
	create(slice(ns, "ranker-c", "ranker", discoveryv1.AddressTypeIPv4, ep{addr: "10.0.0.9", zone: "zone-c"}))
	follows("after a slice was added", short, []string{"10.0.0.2", "10.0.0.3", "10.0.0.9", "fd00::1"})
	if z := res.Zones(short); z["10.0.0.9"] != "zone-c" || z["10.0.0.3"] != "zone-a" {
		t.Errorf("Zones after the changes = %v", z)
	}
	// Every endpoint not ready: no address.
	for _, name := range []string{"ranker-a", "ranker-c", "ranker-v6"} {
		s, err := slices_.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for i := range s.Endpoints {
			s.Endpoints[i].Conditions.Ready = ptr(false)
		}
		if _, err := slices_.Update(ctx, s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		got, err := lookup(short)
		if errors.Is(err, endpointslice.ErrNoEndpoints) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("every endpoint not ready: LookupHost = %v, %v; want ErrNoEndpoints", got, err)
		}
	}
}
