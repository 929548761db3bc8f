package translate

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"

	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
	"github.com/patchbay-io/patchbay/internal/envoyvalidate"
)

// Built is one translation of a rollout set: a snapshot per node flavour and the ext_proc
// policy, all carrying the same version.
type Built struct {
	Version string
	Edge    *cachev3.Snapshot
	Sidecar *cachev3.Snapshot
	GRPC    *cachev3.Snapshot
	Policy  *policyv1.Policy
}

// Build translates, validates and versions. The version is a hash of the resources'
// deterministic bytes, so replicas given the same files serve the same version and an edit
// that changes nothing changes no version. Nothing is returned unless every resource of
// every flavour passes Envoy's validation rules (inside every Any), every snapshot is
// consistent, every route names a cluster that exists, and the ext_proc policy passes
// policyv1.Validate (the rules ext_proc compiles it by).
func Build(in *Input, opts Options) (*Built, error) {
	edge, err := Envoy(in, opts, Edge)
	if err != nil {
		return nil, err
	}
	sidecar, err := Envoy(in, opts, Sidecar)
	if err != nil {
		return nil, err
	}
	grpc := GRPCWith(in, opts)

	h := sha256.New()
	var errs []error
	for _, f := range []struct {
		name string
		res  Resources
	}{{"edge", edge}, {"sidecar", sidecar}, {"grpc", grpc}} {
		for _, typ := range sortedTypes(f.res) {
			for _, r := range f.res[typ] {
				if err := envoyvalidate.Validate(r); err != nil {
					errs = append(errs, fmt.Errorf("%s %s %q: %w", f.name, shortType(typ), cachev3.GetResourceName(r), err))
				}
				b, err := proto.MarshalOptions{Deterministic: true}.Marshal(r)
				if err != nil {
					errs = append(errs, err)
				}
				h.Write(b)
			}
		}
		if err := checkClusterRefs(f.res); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", f.name, err))
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	// The policy is part of the version: an edit that only touches experiments changes
	// nothing Envoy sees but must still reach ext_proc.
	policy := Policy(in, "")
	// ext_proc compiles the policy by these rules and NACKs a policy that breaks one: refuse
	// it here, with the Envoy resources, so Envoy and ext_proc never disagree.
	if err := policyv1.Validate(policy); err != nil {
		return nil, fmt.Errorf("ext_proc policy: %w", err)
	}
	pb, err := proto.MarshalOptions{Deterministic: true}.Marshal(policy)
	if err != nil {
		return nil, err
	}
	h.Write(pb)
	version := hex.EncodeToString(h.Sum(nil))[:16]
	policy.ConfigVersion = version
	b := &Built{Version: version, Policy: policy}
	for _, f := range []struct {
		dst **cachev3.Snapshot
		res Resources
	}{{&b.Edge, edge}, {&b.Sidecar, sidecar}, {&b.GRPC, grpc}} {
		s, err := cachev3.NewSnapshot(version, f.res)
		if err != nil {
			return nil, fmt.Errorf("snapshot: %w", err)
		}
		if err := s.Consistent(); err != nil {
			return nil, fmt.Errorf("snapshot %s: %w", version, err)
		}
		*f.dst = s
	}
	return b, nil
}

// checkClusterRefs checks that every cluster a route (in RDS or inline in an api_listener)
// or a mirror names is in the resources: Consistent() checks neither.
func checkClusterRefs(res Resources) error {
	clusters := map[string]bool{}
	for _, c := range res[resource.ClusterType] {
		clusters[cachev3.GetResourceName(c)] = true // a *Raw too
	}
	var rcs []*routev3.RouteConfiguration
	for _, r := range res[resource.RouteType] {
		rcs = append(rcs, r.(*routev3.RouteConfiguration))
	}
	for _, l := range res[resource.ListenerType] {
		al := l.(*listenerv3.Listener).GetApiListener()
		if al == nil {
			continue
		}
		hcm := &hcmv3.HttpConnectionManager{}
		if err := al.GetApiListener().UnmarshalTo(hcm); err != nil {
			return fmt.Errorf("listener %s: %w", l.(*listenerv3.Listener).GetName(), err)
		}
		if rc := hcm.GetRouteConfig(); rc != nil {
			rcs = append(rcs, rc)
		}
	}
	var errs []error
	need := func(where, c string) {
		if !clusters[c] {
			errs = append(errs, fmt.Errorf("%s names cluster %q, which does not exist", where, c))
		}
	}
	for _, rc := range rcs {
		for _, vh := range rc.GetVirtualHosts() {
			for _, r := range vh.GetRoutes() {
				a := r.GetRoute()
				if a == nil {
					continue
				}
				where := "route " + r.GetName()
				if c := a.GetCluster(); c != "" {
					need(where, c)
				}
				for _, cw := range a.GetWeightedClusters().GetClusters() {
					need(where, cw.GetName())
				}
				for _, m := range a.GetRequestMirrorPolicies() {
					need(where+" mirror", m.GetCluster())
				}
			}
		}
	}
	return errors.Join(errs...)
}

func sortedTypes(res Resources) []string {
	out := make([]string, 0, len(res))
	for t := range res {
		out = append(out, t)
	}
	sort.Strings(out)
	return out
}

func shortType(t string) string {
	for i := len(t) - 1; i >= 0; i-- {
		if t[i] == '.' {
			return t[i+1:]
		}
	}
	return t
}
