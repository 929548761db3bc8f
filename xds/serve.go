package xds

import (
	"context"
	"fmt"
	"strings"
	"sync"

	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"

	"github.com/patchbay-io/patchbay/xds/translate"
)

// servedTypes are the resource types the Envoy and proxyless flavours are served, in the
// order an update adds or changes them: what is referred to before what refers to it
// (secrets and clusters before the listeners and routes that name them, route
// configurations before the scopes that select them), so a client never holds a reference
// to something it has not been sent. Removals go in the reverse order.
var servedTypes = []string{
	resource.SecretType,
	resource.ClusterType,
	resource.EndpointType,
	resource.RouteType,
	resource.ScopedRouteType,
	resource.ListenerType,
}

// resourceCache serves the Envoy and proxyless flavours from one go-control-plane
// LinearCache per flavour and resource type. A LinearCache keeps a version per resource
// (a hash of its bytes for delta clients) and marshals each resource version once, shared
// by every stream it is sent on; an update touches only the resources that changed, so a
// delta client is sent only those, and a SotW client only the types that changed. Until the
// first config is served, watches are held (gate): a client is never answered with an empty
// config by a control plane that has not loaded one yet.
//
// Scopes (SRDS) are the exception: Envoy takes a SotW SRDS response as the whole set and
// removes the scopes it does not carry (envoy source/common/router/scoped_rds.cc,
// ScopedRdsConfigSubscription::onConfigUpdate), while a LinearCache sends a SotW client only
// the changed resources of every type but listeners and clusters
// (ResourceRequiresFullStateInSotw). They are served from a SnapshotCache, keyed by
// flavour, which sends the whole set; they change only when models come and go.
type resourceCache struct {
	caches map[Flavour]map[string]*cachev3.LinearCache
	scopes cachev3.SnapshotCache
	served *translate.Output // nil before the first apply
	gate   *gate
}

// cacheFlavours are the flavours served from resourceCache, by translate flavour index.
var cacheFlavours = [...]Flavour{translate.FlavourEdge: FlavourEdge, translate.FlavourSidecar: FlavourSidecar, translate.FlavourGRPC: FlavourGRPC}

func newResourceCache() *resourceCache {
	c := &resourceCache{caches: map[Flavour]map[string]*cachev3.LinearCache{}, gate: &gate{},
		scopes: cachev3.NewSnapshotCache(false, nodeHash{}, nil)}
	for _, f := range cacheFlavours {
		c.caches[f] = map[string]*cachev3.LinearCache{}
		for _, t := range servedTypes {
			if t != resource.ScopedRouteType {
				c.caches[f][t] = cachev3.NewLinearCache(t, cachev3.WithVersionPrefix(versionPrefix))
			}
		}
	}
	return c
}

// versionPrefix starts every SotW version this control plane sends. A client's version
// without it (from another implementation) is answered with everything.
const versionPrefix = "pb-"

// labelVersion appends the config version being served to a linear cache's version
// ("pb-17" -> "pb-17/1f45e0011fb6c60c"), so a client's version_info (Envoy's config_dump)
// names the config it came with. The linear caches count versions per type: a type that
// did not change in an apply keeps the label of the config that last changed it. A client
// echoes the label in its next request; the caches only check its prefix.
func (s *Server) labelVersion(v string) string {
	cfg, _ := s.servingVersion.Load().(string)
	if cfg == "" || !strings.HasPrefix(v, versionPrefix) {
		return v
	}
	if i := strings.IndexByte(v, '/'); i >= 0 {
		v = v[:i]
	}
	return v + "/" + cfg
}

// ConfigVersionOf is the config version a version_info labelled by labelVersion names
// ("" when it names none).
func ConfigVersionOf(versionInfo string) string {
	if !strings.HasPrefix(versionInfo, versionPrefix) {
		return ""
	}
	if i := strings.IndexByte(versionInfo, '/'); i >= 0 {
		return versionInfo[i+1:]
	}
	return ""
}

// muxKey is the key of one flavour's cache of one type in the MuxCache.
func muxKey(f, typeURL string) string { return f + " " + typeURL }

// muxCaches lists every cache by mux key, for the MuxCache.
func (c *resourceCache) muxCaches() map[string]cachev3.Cache {
	out := map[string]cachev3.Cache{}
	for f, byType := range c.caches {
		for t, lc := range byType {
			out[muxKey(string(f), t)] = c.gate.wrap(lc)
		}
		out[muxKey(string(f), resource.ScopedRouteType)] = c.gate.wrap(c.scopes)
	}
	return out
}

// change is one flavour's update: what to set and what to delete, per type.
type change struct {
	set map[string]map[string]types.Resource
	del map[string][]string
}

func (ch *change) put(t, name string, r types.Resource) {
	if ch.set[t] == nil {
		ch.set[t] = map[string]types.Resource{}
	}
	ch.set[t][name] = r
}

// diffResources adds to ch what turns cur into next. Resources are compared by value
// identity: the builder hands back the previous value of a resource whose bytes did not
// change. When equal is set, differing values are compared with proto.Equal too (the
// shared resources, rebuilt on every build) and an equal one keeps its served value.
func diffResources(ch *change, cur, next translate.Resources, equal bool) translate.Resources {
	for _, t := range servedTypes {
		old := map[string]types.Resource{}
		for _, r := range cur[t] {
			old[cachev3.GetResourceName(r)] = r
		}
		for i, r := range next[t] {
			name := cachev3.GetResourceName(r)
			o, ok := old[name]
			delete(old, name)
			if ok && (o == r || (equal && proto.Equal(o, r))) {
				next[t][i] = o
				continue
			}
			ch.put(t, name, r)
		}
		for name := range old {
			ch.del[t] = append(ch.del[t], name)
		}
	}
	return next
}

// apply serves out to every flavour: additions and changes of every flavour first, type
// by type in servedTypes order, then removals in the reverse order (make before break: a
// cluster goes only once no route names it). A model whose output is the one served is
// skipped without looking at its resources. It opens the gate on the first call.
func (c *resourceCache) apply(out *translate.Output) error {
	prev := c.served
	if prev == nil {
		prev = &translate.Output{}
	}
	var changes [len(cacheFlavours)]change
	for f := range cacheFlavours {
		ch := change{set: map[string]map[string]types.Resource{}, del: map[string][]string{}}
		out.Shared[f] = diffResources(&ch, prev.Shared[f], out.Shared[f], true)
		for m, mo := range out.Models {
			old := prev.Models[m]
			if old == mo {
				continue
			}
			var cur translate.Resources
			if old != nil {
				cur = old.Res[f]
			}
			diffResources(&ch, cur, mo.Res[f], false)
		}
		for m, old := range prev.Models {
			if _, ok := out.Models[m]; !ok {
				diffResources(&ch, old.Res[f], nil, false)
			}
		}
		changes[f] = ch
	}
	for _, t := range servedTypes {
		for f, ch := range changes {
			if t == resource.ScopedRouteType {
				if len(ch.set[t]) > 0 || len(ch.del[t]) > 0 || c.served == nil {
					if err := c.setScopes(cacheFlavours[f], out, f); err != nil {
						return err
					}
				}
				continue
			}
			if len(ch.set[t]) == 0 {
				continue
			}
			if err := c.caches[cacheFlavours[f]][t].UpdateResources(ch.set[t], nil); err != nil {
				return fmt.Errorf("%s %s: %w", cacheFlavours[f], t, err)
			}
		}
	}
	for i := len(servedTypes) - 1; i >= 0; i-- {
		t := servedTypes[i]
		for f, ch := range changes {
			if len(ch.del[t]) == 0 || t == resource.ScopedRouteType {
				continue
			}
			if err := c.caches[cacheFlavours[f]][t].UpdateResources(nil, ch.del[t]); err != nil {
				return fmt.Errorf("%s %s: %w", cacheFlavours[f], t, err)
			}
		}
	}
	c.served = out
	c.gate.open()
	return nil
}

// setScopes serves flavour f every scope of out, as one snapshot.
func (c *resourceCache) setScopes(f Flavour, out *translate.Output, i int) error {
	scopes := append([]types.Resource(nil), out.Shared[i][resource.ScopedRouteType]...)
	for _, m := range out.Models {
		scopes = append(scopes, m.Res[i][resource.ScopedRouteType]...)
	}
	snap, err := cachev3.NewSnapshot(out.Version, map[string][]types.Resource{resource.ScopedRouteType: scopes})
	if err != nil {
		return fmt.Errorf("%s scopes: %w", f, err)
	}
	return c.scopes.SetSnapshot(context.Background(), string(f), snap)
}

// scopesVersion is the version of the scopes flavour f is served ("" before any).
func (c *resourceCache) scopesVersion(f string) string {
	snap, err := c.scopes.GetSnapshot(f)
	if err != nil {
		return ""
	}
	return snap.GetVersion(resource.ScopedRouteType)
}

// resources is what flavour f is served now (tests and status).
func (c *resourceCache) resources(f Flavour) translate.Resources {
	if c.served == nil {
		return translate.Resources{}
	}
	for i, cf := range cacheFlavours {
		if cf == f {
			return c.served.Flavour(i)
		}
	}
	return translate.Resources{}
}

// gate holds the watches opened before the first config is served and lets them through
// to their caches when it opens. A LinearCache answers a client's first request at once,
// even with nothing in it (the xDS protocol's rule for a first request); before the first
// good config that answer would be an empty config, which would make an Envoy that
// reconnects to a restarted control plane drop its listeners and clusters.
type gate struct {
	mu      sync.Mutex
	opened  bool
	pending []func() // each opens one held watch on its cache
}

func (g *gate) open() {
	g.mu.Lock()
	if g.opened {
		g.mu.Unlock()
		return
	}
	g.opened = true
	held := g.pending
	g.pending = nil
	g.mu.Unlock()
	for _, start := range held {
		start()
	}
}

func (g *gate) wrap(c cachev3.Cache) cachev3.Cache { return &gatedCache{Cache: c, gate: g} }

// gatedCache is one cache behind the gate.
type gatedCache struct {
	cachev3.Cache
	gate *gate
}

// heldWatch is a watch waiting for the gate; cancel stops it, whether it has been opened
// on its cache by then or not.
type heldWatch struct {
	mu       sync.Mutex
	canceled bool
	cancel   func()
}

func (h *heldWatch) stop() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.canceled = true
	if h.cancel != nil {
		h.cancel()
	}
}

// start opens the watch on its cache unless it was canceled meanwhile.
func (h *heldWatch) start(open func() (func(), error)) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.canceled {
		return
	}
	cancel, err := open()
	if err != nil {
		return // the stream gets nothing on this type until it asks again
	}
	h.cancel = cancel
}

// hold returns nil, false when the gate is open (open the watch now); otherwise the watch
// is queued and its cancel returned.
func (g *gate) hold(open func() (func(), error)) (func(), bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.opened {
		return nil, false
	}
	h := &heldWatch{}
	g.pending = append(g.pending, func() { h.start(open) })
	return h.stop, true
}

func (c *gatedCache) CreateWatch(req *cachev3.Request, sub cachev3.Subscription, out chan cachev3.Response) (func(), error) {
	open := func() (func(), error) { return c.Cache.CreateWatch(req, sub, out) }
	if cancel, held := c.gate.hold(open); held {
		return cancel, nil
	}
	return open()
}

func (c *gatedCache) CreateDeltaWatch(req *cachev3.DeltaRequest, sub cachev3.Subscription, out chan cachev3.DeltaResponse) (func(), error) {
	open := func() (func(), error) { return c.Cache.CreateDeltaWatch(req, sub, out) }
	if cancel, held := c.gate.hold(open); held {
		return cancel, nil
	}
	return open()
}

// Served is a view of what one flavour is served now, by type and name.
type Served struct{ res translate.Resources }

// GetResources returns the served resources of a type by name, as typed messages.
func (v Served) GetResources(typeURL string) map[string]types.Resource {
	out := map[string]types.Resource{}
	for _, r := range v.res[typeURL] {
		if raw, ok := r.(*translate.Raw); ok {
			m, err := raw.Decode(typeURL)
			if err != nil {
				continue // cannot happen: the bytes were marshalled from this type
			}
			r = m
		}
		out[cachev3.GetResourceName(r)] = r
	}
	return out
}

// Served returns what flavour f is served now; an error before the first config.
func (s *Server) Served(f Flavour) (Served, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.res.served == nil {
		return Served{}, fmt.Errorf("no config served yet")
	}
	return Served{res: s.res.resources(f)}, nil
}
