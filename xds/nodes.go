package xds

import (
	"context"
	"errors"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
)

// Flavour is the kind of xDS client; each flavour has its own snapshot.
type Flavour string

// The flavours the control plane serves.
const (
	FlavourEdge    Flavour = "envoy-edge"
	FlavourSidecar Flavour = "envoy-sidecar"
	FlavourGRPC    Flavour = "grpc"
	FlavourExtproc Flavour = "extproc"
)

// RoleMetadataKey is the node metadata field that marks an Envoy as a sidecar.
const RoleMetadataKey = "patchbay.role"

// Flavours lists every flavour, for metrics and status.
var Flavours = []Flavour{FlavourEdge, FlavourSidecar, FlavourGRPC, FlavourExtproc}

// FlavourOf classifies a node: ext_proc by its user agent, gRPC libraries by theirs
// ("gRPC Go", "gRPC Java", "gRPC C-core" ...), Envoy sidecars by metadata; anything else is
// served as an edge Envoy.
func FlavourOf(n *corev3.Node) Flavour {
	ua := n.GetUserAgentName()
	switch {
	case ua == policyv1.ExtprocUserAgent:
		return FlavourExtproc
	case strings.HasPrefix(strings.ToLower(ua), "grpc"):
		return FlavourGRPC
	}
	if f, ok := n.GetMetadata().GetFields()[RoleMetadataKey]; ok && f.GetStringValue() == "sidecar" {
		return FlavourSidecar
	}
	return FlavourEdge
}

// flavourKey is the node metadata field in which the server records the flavour it decided
// for a stream (from the client certificate when identities are on); any value a client
// sends there is overwritten.
const flavourKey = "patchbay.flavour"

// nodeHash keys the snapshot cache by flavour: every node of a flavour shares one snapshot.
// It reads only the mark the callbacks write (over anything the client sent there); a node
// without it never passed admission and is keyed to no snapshot: it is served nothing,
// never a default flavour.
type nodeHash struct{}

func (nodeHash) ID(n *corev3.Node) string {
	if f, ok := n.GetMetadata().GetFields()[flavourKey]; ok {
		return f.GetStringValue()
	}
	return unadmitted
}

// unadmitted is the cache key of a node the callbacks did not mark: no snapshot has it.
const unadmitted = "unadmitted"

// withFlavour returns a copy of n marked with the flavour the server decided. The client's
// node is not changed in place: go-control-plane keeps it for the stream's later requests.
func withFlavour(n *corev3.Node, f Flavour) *corev3.Node {
	c := proto.Clone(n).(*corev3.Node)
	if c.Metadata == nil {
		c.Metadata = &structpb.Struct{}
	}
	if c.Metadata.Fields == nil {
		c.Metadata.Fields = map[string]*structpb.Value{}
	}
	c.Metadata.Fields[flavourKey] = structpb.NewStringValue(string(f))
	return c
}

// nackGuard wraps the composed cache so that a NACK does not trigger an immediate resend
// of the version the client just rejected. go-control-plane's caches answer at once a
// request that carries no version; a client that NACKs its very first response re-requests
// with an empty version, so it would be sent the same bad config forever (a prototype saw
// ~9,400 responses in 2 s; TestNACKDoesNotStorm measures ~22,000/s without this guard).
// Here a NACK without a version is given one of this control plane's: the linear caches
// then compare what this stream was sent (the NACKed versions) with what they hold, and the
// watch stays open until the next change.
//
// Scopes are served from a snapshot cache, which compares the request's version with the
// snapshot's: there a NACK is held by giving it the current snapshot version.
type nackGuard struct {
	cachev3.Cache
	// scopesVersion is the current scopes snapshot version of a flavour.
	scopesVersion func(flavour string) string
}

func (g *nackGuard) CreateWatch(req *cachev3.Request, sub cachev3.Subscription, out chan cachev3.Response) (func(), error) {
	if req.GetErrorDetail() == nil {
		return g.Cache.CreateWatch(req, sub, out)
	}
	held := proto.Clone(req).(*discoveryv3.DiscoveryRequest)
	switch {
	case req.GetTypeUrl() == resource.ScopedRouteType && g.scopesVersion != nil:
		if v := g.scopesVersion(nodeHash{}.ID(req.GetNode())); v != "" {
			held.VersionInfo = v
		}
	case req.GetVersionInfo() == "":
		held.VersionInfo = versionPrefix + "nacked"
	}
	return g.Cache.CreateWatch(held, sub, out)
}

// The MuxCache keys of the policy cache and of the cache that never answers.
const (
	policyKey = "policy"
	silentKey = "silent"
)

// silentCache opens watches that never fire: a node the callbacks did not admit is served
// nothing, and a type no flavour is served is never answered (as the snapshot cache did).
type silentCache struct{}

func (silentCache) CreateWatch(*cachev3.Request, cachev3.Subscription, chan cachev3.Response) (func(), error) {
	return func() {}, nil
}

func (silentCache) CreateDeltaWatch(*cachev3.DeltaRequest, cachev3.Subscription, chan cachev3.DeltaResponse) (func(), error) {
	return func() {}, nil
}

func (silentCache) Fetch(context.Context, *cachev3.Request) (cachev3.Response, error) {
	return nil, errors.New("fetch is not served: use ADS")
}
