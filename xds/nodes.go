package xds

import (
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"

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
// of the version the client just rejected. go-control-plane's caches answer any request
// whose version differs from theirs at once; a client that NACKs re-requests with its last
// good version, which differs, so it would be sent the same bad config forever (a prototype
// saw ~9,400 responses in 2 s; TestNACKDoesNotStorm measures ~22,000/s without this guard). Here a NACK of the current version is treated as the client
// holding it: the watch stays open and fires on the next change.
type nackGuard struct {
	cachev3.Cache
	snapshots cachev3.SnapshotCache
}

func (g *nackGuard) CreateWatch(req *cachev3.Request, sub cachev3.Subscription, out chan cachev3.Response) (func(), error) {
	if req.GetErrorDetail() != nil {
		req = g.holdNACKed(req, sub)
	}
	return g.Cache.CreateWatch(req, sub, out)
}

func (g *nackGuard) holdNACKed(req *cachev3.Request, sub cachev3.Subscription) *cachev3.Request {
	held := proto.Clone(req).(*discoveryv3.DiscoveryRequest)
	if req.GetTypeUrl() == policyv1.TypeURL {
		// The linear cache compares per-resource versions once the request carries any
		// version; an empty one would make it reply with everything again.
		if held.VersionInfo == "" {
			held.VersionInfo = "nacked"
		}
		return held
	}
	snap, err := g.snapshots.GetSnapshot(nodeHash{}.ID(req.GetNode()))
	if err != nil {
		return req
	}
	current := snap.GetVersion(req.GetTypeUrl())
	for _, sent := range sub.ReturnedResources() {
		if sent == current {
			held.VersionInfo = current
			return held
		}
		break // in SotW every returned resource carries the response's version
	}
	return req
}
