package xds

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/url"
	"strings"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/patchbay-io/patchbay/internal/tlsfiles"
)

// Roles a client certificate can carry. With client certificates required (--client-ca),
// an xDS client's flavour follows its role, whatever its node says:
// edge → envoy-edge, sidecar → envoy-sidecar, grpc → grpc, extproc → extproc (the policy
// only); operator may use the admin API's mutations; any other identity gets nothing.
const (
	RoleEdge     = "edge"
	RoleSidecar  = "sidecar"
	RoleGRPC     = "grpc"
	RoleExtproc  = "extproc"
	RoleOperator = "operator"
)

// SPIFFEPrefix is the URI SAN prefix of the built-in identities:
// spiffe://patchbay.local/role/<role>.
const SPIFFEPrefix = "spiffe://patchbay.local/role/"

var knownRoles = map[string]bool{RoleEdge: true, RoleSidecar: true, RoleGRPC: true, RoleExtproc: true, RoleOperator: true, "modelhost": true}

// roleFlavour is the flavour each xDS role is served.
var roleFlavour = map[string]Flavour{RoleEdge: FlavourEdge, RoleSidecar: FlavourSidecar, RoleGRPC: FlavourGRPC, RoleExtproc: FlavourExtproc}

// peerRoles maps certificate URIs to roles: the configured mapping first, then the built-in
// SPIFFE form.
type peerRoles struct{ byURI map[string]string }

func newPeerRoles(m map[string]string) (*peerRoles, error) {
	p := &peerRoles{byURI: map[string]string{}}
	for uri, role := range m {
		if _, err := url.Parse(uri); err != nil || uri == "" {
			return nil, fmt.Errorf("peer role mapping: %q is not a URI", uri)
		}
		if !knownRoles[role] {
			return nil, fmt.Errorf("peer role mapping %s: unknown role %q (want edge, sidecar, grpc, extproc, operator or modelhost)", uri, role)
		}
		p.byURI[uri] = role
	}
	return p, nil
}

// role returns the role of a verified peer certificate ("" when none).
func (p *peerRoles) role(cs *tls.ConnectionState) string {
	uri := tlsfiles.PeerURI(cs)
	if uri == "" {
		return ""
	}
	if r, ok := p.byURI[uri]; ok {
		return r
	}
	if r, ok := strings.CutPrefix(uri, SPIFFEPrefix); ok && knownRoles[r] {
		return r
	}
	return ""
}

// streamRole returns the role of the client of an xDS stream, from its TLS peer.
func (p *peerRoles) streamRole(ctx context.Context) string {
	pr, ok := peer.FromContext(ctx)
	if !ok {
		return ""
	}
	ti, ok := pr.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return ""
	}
	return p.role(&ti.State)
}

// ParsePeerRole parses a --peer-role flag value, URI=role.
func ParsePeerRole(s string) (uri, role string, err error) {
	i := strings.LastIndexByte(s, '=')
	if i <= 0 || i == len(s)-1 {
		return "", "", fmt.Errorf("peer role %q: want URI=role", s)
	}
	uri, role = s[:i], s[i+1:]
	if !knownRoles[role] {
		return "", "", fmt.Errorf("peer role %q: unknown role %q", s, role)
	}
	return uri, role, nil
}
