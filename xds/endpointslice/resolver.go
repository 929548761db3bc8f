// Package endpointslice resolves Kubernetes Service names from the Service's
// EndpointSlices (discovery.k8s.io/v1) instead of DNS: a rollout version whose endpoints
// name a Service then gets the addresses of its ready pods, each with its zone, as soon as
// the API server knows them, and never a pod that is not ready.
//
// A Resolver answers names of the form NAME.NAMESPACE.svc or
// NAME.NAMESPACE.svc.<cluster domain> (a trailing dot allowed) for the namespaces it
// watches; every other name (and a Service of a namespace it does not watch) goes to the
// next resolver, DNS by default. Its LookupHost has the signature of xds.Config.LookupHost.
package endpointslice

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sort"
	"strings"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// Options configure a Resolver.
type Options struct {
	// Namespace is the one namespace watched ("": every namespace, which needs a
	// ClusterRole to list and watch EndpointSlices).
	Namespace string
	// ClusterDomain is the cluster's DNS domain (default "cluster.local").
	ClusterDomain string
	// Next resolves every other name (default net.DefaultResolver.LookupHost).
	Next func(ctx context.Context, host string) ([]string, error)
	// Resync is the informer's resync period (default 0: none; the watch keeps it current).
	Resync time.Duration
	// OnChange, when set, is called (from the informer's goroutine) after any
	// EndpointSlice was added, changed or deleted, once the cache has synced.
	OnChange func()
}

// Resolver answers Service names from an informer's cache of EndpointSlices.
type Resolver struct {
	opts     Options
	factory  informers.SharedInformerFactory
	informer cache.SharedIndexInformer
}

// byService indexes slices by "namespace/service" (label kubernetes.io/service-name).
const byService = "service"

// New returns a Resolver over client's EndpointSlices. Nothing is watched until Start.
func New(client kubernetes.Interface, opts Options) *Resolver {
	if opts.ClusterDomain == "" {
		opts.ClusterDomain = "cluster.local"
	}
	opts.ClusterDomain = strings.ToLower(strings.Trim(opts.ClusterDomain, "."))
	if opts.Next == nil {
		opts.Next = net.DefaultResolver.LookupHost
	}
	var fopts []informers.SharedInformerOption
	if opts.Namespace != "" {
		fopts = append(fopts, informers.WithNamespace(opts.Namespace))
	}
	factory := informers.NewSharedInformerFactoryWithOptions(client, opts.Resync, fopts...)
	inf := factory.Discovery().V1().EndpointSlices().Informer()
	// Indexers can only be added before the informer runs: it has not started yet.
	_ = inf.AddIndexers(cache.Indexers{byService: func(obj any) ([]string, error) {
		s, ok := obj.(*discoveryv1.EndpointSlice)
		if !ok {
			return nil, nil
		}
		svc := s.Labels[discoveryv1.LabelServiceName]
		if svc == "" {
			return nil, nil
		}
		return []string{s.Namespace + "/" + svc}, nil
	}})
	r := &Resolver{opts: opts, factory: factory, informer: inf}
	if opts.OnChange != nil {
		notify := func() {
			if inf.HasSynced() {
				opts.OnChange()
			}
		}
		_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    func(any) { notify() },
			UpdateFunc: func(any, any) { notify() },
			DeleteFunc: func(any) { notify() },
		})
	}
	return r
}

// Start starts watching EndpointSlices until ctx ends; it does not wait for the first
// list (LookupHost does, bounded by its context).
func (r *Resolver) Start(ctx context.Context) {
	r.factory.Start(ctx.Done())
	go func() {
		<-ctx.Done()
		r.factory.Shutdown()
	}()
}

// WaitForSync waits until the first list of EndpointSlices is in the cache, or ctx ends.
func (r *Resolver) WaitForSync(ctx context.Context) bool {
	return cache.WaitForCacheSync(ctx.Done(), r.informer.HasSynced)
}

// ErrNoEndpoints is wrapped by a lookup of a Service that has no ready endpoint.
var ErrNoEndpoints = errors.New("no ready endpoints")

// LookupHost returns the sorted, deduplicated IPv4 and IPv6 addresses of the ready
// endpoints (conditions.ready not false) of the Service that host names, or passes any
// other host to the next resolver.
func (r *Resolver) LookupHost(ctx context.Context, host string) ([]string, error) {
	ns, svc, ok := r.ServiceOf(host)
	if !ok {
		return r.opts.Next(ctx, host)
	}
	zones, err := r.endpoints(ctx, host, ns, svc)
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(zones))
	for a := range zones {
		out = append(out, a)
	}
	sort.Strings(out)
	return out, nil
}

// Zones maps each ready address of the Service that host names to its zone ("" when
// the endpoint has none). It is nil for a host that is not a watched Service name, or
// before the cache has synced.
func (r *Resolver) Zones(host string) map[string]string {
	ns, svc, ok := r.ServiceOf(host)
	if !ok || !r.informer.HasSynced() {
		return nil
	}
	zones, err := r.collect(ns, svc)
	if err != nil {
		return nil
	}
	return zones
}

func (r *Resolver) endpoints(ctx context.Context, host, ns, svc string) (map[string]string, error) {
	if !r.informer.HasSynced() && !r.WaitForSync(ctx) {
		return nil, fmt.Errorf("lookup %s: EndpointSlices not listed yet: %w", host, ctx.Err())
	}
	zones, err := r.collect(ns, svc)
	if err != nil {
		return nil, fmt.Errorf("lookup %s: %w", host, err)
	}
	if len(zones) == 0 {
		return nil, fmt.Errorf("lookup %s: service %s/%s: %w", host, ns, svc, ErrNoEndpoints)
	}
	return zones, nil
}

// collect gathers address -> zone over the Service's slices.
func (r *Resolver) collect(ns, svc string) (map[string]string, error) {
	objs, err := r.informer.GetIndexer().ByIndex(byService, ns+"/"+svc)
	if err != nil {
		return nil, err
	}
	zones := map[string]string{}
	for _, o := range objs {
		s, ok := o.(*discoveryv1.EndpointSlice)
		if !ok || (s.AddressType != discoveryv1.AddressTypeIPv4 && s.AddressType != discoveryv1.AddressTypeIPv6) {
			continue // FQDN slices name hosts, not addresses
		}
		for _, e := range s.Endpoints {
			// A nil ready condition means unknown, which consumers treat as ready
			// (k8s.io/api/discovery/v1 EndpointConditions.Ready).
			if e.Conditions.Ready != nil && !*e.Conditions.Ready {
				continue
			}
			zone := ""
			if e.Zone != nil {
				zone = *e.Zone
			}
			for _, a := range e.Addresses {
				ip := net.ParseIP(a)
				if ip == nil {
					continue
				}
				addr := ip.String() // canonical form: one spelling per address
				if _, seen := zones[addr]; !seen || zones[addr] == "" {
					zones[addr] = zone
				}
			}
		}
	}
	return zones, nil
}

// ServiceOf reports whether host is a Service name this resolver answers, and which:
// NAME.NAMESPACE.svc or NAME.NAMESPACE.svc.<cluster domain>, case-insensitive, an
// optional trailing dot, in the watched namespace (any, when Options.Namespace is "").
func (r *Resolver) ServiceOf(host string) (namespace, service string, ok bool) {
	h := strings.ToLower(strings.TrimSuffix(host, "."))
	if rest, found := strings.CutSuffix(h, ".svc."+r.opts.ClusterDomain); found {
		h = rest
	} else if rest, found := strings.CutSuffix(h, ".svc"); found {
		h = rest
	} else {
		return "", "", false
	}
	service, namespace, found := strings.Cut(h, ".")
	if !found || !dnsLabel(service) || !dnsLabel(namespace) {
		return "", "", false
	}
	if r.opts.Namespace != "" && namespace != r.opts.Namespace {
		return "", "", false
	}
	return namespace, service, true
}

// dnsLabel reports whether s is an RFC 1123 label (what Service and namespace names are).
func dnsLabel(s string) bool {
	if len(s) == 0 || len(s) > 63 || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	for _, c := range s {
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' {
			return false
		}
	}
	return true
}
