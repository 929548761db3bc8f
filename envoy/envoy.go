// Package envoy holds patchbay's Envoy bootstraps (edge.yaml, sidecar.yaml, and their
// mutual-TLS variants edge-mtls.yaml, sidecar-mtls.yaml with the SDS files in sds/),
// embedded, with the strict parser, the checks they must pass and the renderer that sets
// their addresses for a deployment (`patchbay up`, the Helm chart's test).
package envoy

import (
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	overloadv3 "github.com/envoyproxy/go-control-plane/envoy/config/overload/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	downstreamv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/resource_monitors/downstream_connections/v3"
	fixedheapv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/resource_monitors/fixed_heap/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/patchbay-io/patchbay/internal/envoyvalidate"

	// Extensions named by the bootstraps' typed_config: linking them registers their
	// types, which the deep validation needs to open each Any.
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
)

//go:embed edge.yaml sidecar.yaml edge-mtls.yaml sidecar-mtls.yaml sds/*.yaml
var files embed.FS

//go:embed .envoy-version
var versionFile string

// Version is the Envoy release patchbay is built and tested against (.envoy-version).
func Version() string { return strings.TrimSpace(versionFile) }

// Role is the kind of Envoy node; the control plane reads it from node metadata.
type Role string

// The roles, and the names the bootstraps and the control plane agree on.
const (
	Edge    Role = "edge"
	Sidecar Role = "sidecar"

	// RoleKey is the node metadata key carrying the Role.
	RoleKey = "patchbay.role"

	ClusterXDS     = "patchbay_xds"     // the control plane's ADS server
	ClusterExtProc = "patchbay_extproc" // the ext_proc router
	ClusterOTel    = "patchbay_otel"    // the OTLP/gRPC trace collector
	ClusterAdmin   = "envoy_admin"      // Envoy's own admin, behind ListenerStats
	ListenerStats  = "patchbay_stats"   // /ready and /stats/prometheus

	httpOptionsKey = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
)

// Roles lists every role with a bootstrap file.
var Roles = []Role{Edge, Sidecar}

// File returns the bootstrap file of a role, as shipped.
func File(role Role) ([]byte, error) {
	switch role {
	case Edge, Sidecar:
		return files.ReadFile(string(role) + ".yaml")
	}
	return nil, fmt.Errorf("envoy bootstrap: unknown role %q (want edge or sidecar)", role)
}

// MTLSFile returns the mutual-TLS bootstrap file of a role (<role>-mtls.yaml), as shipped.
func MTLSFile(role Role) ([]byte, error) {
	switch role {
	case Edge, Sidecar:
		return files.ReadFile(string(role) + "-mtls.yaml")
	}
	return nil, fmt.Errorf("envoy bootstrap: unknown role %q (want edge or sidecar)", role)
}

// Parse decodes a YAML (or JSON) bootstrap strictly: unknown fields, wrong types and
// duplicate keys are errors, as they are for Envoy.
func Parse(data []byte) (*bootstrapv3.Bootstrap, error) {
	var doc any
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("envoy bootstrap: yaml: %w", err)
	}
	js, err := json.Marshal(doc)
	if err != nil {
		return nil, fmt.Errorf("envoy bootstrap: yaml to json: %w", err)
	}
	b := new(bootstrapv3.Bootstrap)
	if err := (protojson.UnmarshalOptions{DiscardUnknown: false}).Unmarshal(js, b); err != nil {
		return nil, fmt.Errorf("envoy bootstrap: %w", err)
	}
	return b, nil
}

// Params are the per-deployment settings of a bootstrap. Empty fields keep the
// file's value. Addresses are host:port; hosts may be DNS names (clusters are
// STRICT_DNS) except Admin and Stats, which are bind addresses.
type Params struct {
	NodeID  string // node.id (Envoy's --service-node overrides it at run time)
	XDS     string // patchbay xds --listen
	ExtProc string // patchbay extproc --listen
	OTel    string // OTLP/gRPC collector
	Admin   string // Envoy admin bind address; must be loopback
	Stats   string // bind address of the /ready + /stats/prometheus listener
	// MaxHeapBytes is the overload manager's fixed_heap size; 0 keeps the file's.
	MaxHeapBytes uint64
	// MaxConnections caps downstream connections; 0 keeps the file's.
	MaxConnections int64
	// MTLS renders <role>-mtls.yaml: TLS with client certificates to patchbay_xds and
	// patchbay_extproc, certificates through SDS from files.
	MTLS bool
	// SDSDir is the directory of the SDS files the mTLS variant reads (SDSCertificateFile,
	// SDSValidationFile; see WriteSDS); empty keeps DefaultSDSDir. Only with MTLS.
	SDSDir string
}

// Render returns the role's bootstrap with p applied, checked with Check.
// With p.MTLS it is the mTLS variant, checked with CheckMTLS.
func Render(role Role, p Params) (*bootstrapv3.Bootstrap, error) {
	file, check := File, Check
	if p.MTLS {
		file, check = MTLSFile, CheckMTLS
	} else if p.SDSDir != "" {
		return nil, errors.New("render: SDSDir is only for the mTLS bootstrap (set MTLS)")
	}
	data, err := file(role)
	if err != nil {
		return nil, err
	}
	b, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s bootstrap file: %w", role, err)
	}
	if err := apply(b, role, p); err != nil {
		return nil, fmt.Errorf("render %s bootstrap: %w", role, err)
	}
	if p.SDSDir != "" {
		if err := setSDSDir(b, p.SDSDir); err != nil {
			return nil, fmt.Errorf("render %s bootstrap: %w", role, err)
		}
	}
	if err := check(role, b); err != nil {
		return nil, fmt.Errorf("render %s bootstrap: %w", role, err)
	}
	return b, nil
}

// MarshalJSON encodes a bootstrap as JSON for `envoy -c file.json`.
func MarshalJSON(b *bootstrapv3.Bootstrap) ([]byte, error) {
	return protojson.MarshalOptions{Multiline: true, UseProtoNames: true}.Marshal(b)
}

func apply(b *bootstrapv3.Bootstrap, role Role, p Params) error {
	if p.NodeID != "" {
		b.GetNode().Id = p.NodeID
	}
	var errs []error
	for name, addr := range map[string]string{ClusterXDS: p.XDS, ClusterExtProc: p.ExtProc, ClusterOTel: p.OTel, ClusterAdmin: p.Admin} {
		if addr == "" {
			continue
		}
		c := staticCluster(b, name)
		if c == nil {
			errs = append(errs, fmt.Errorf("no static cluster %q", name))
			continue
		}
		sa, err := socketAddress(addr)
		if err != nil {
			errs = append(errs, fmt.Errorf("cluster %s: %w", name, err))
			continue
		}
		c.LoadAssignment = &endpointv3.ClusterLoadAssignment{
			ClusterName: name,
			Endpoints: []*endpointv3.LocalityLbEndpoints{{LbEndpoints: []*endpointv3.LbEndpoint{{
				HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: sa}},
			}}}},
		}
	}
	if p.Admin != "" {
		sa, err := socketAddress(p.Admin)
		if err != nil {
			errs = append(errs, fmt.Errorf("admin: %w", err))
		} else {
			b.GetAdmin().Address = sa
		}
	}
	if p.Stats != "" {
		sa, err := socketAddress(p.Stats)
		if err != nil {
			errs = append(errs, fmt.Errorf("stats listener: %w", err))
		} else {
			found := false
			for _, l := range b.GetStaticResources().GetListeners() {
				if l.GetName() == ListenerStats {
					l.Address, found = sa, true
				}
			}
			if !found {
				errs = append(errs, fmt.Errorf("no static listener %q", ListenerStats))
			}
		}
	}
	if p.MaxHeapBytes > 0 || p.MaxConnections > 0 {
		if err := setMonitors(b, p); err != nil {
			errs = append(errs, err)
		}
	}
	if p.MaxConnections > 0 {
		if err := setListenerLimit(b, role, p.MaxConnections*4/5); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// socketAddress parses host:port.
func socketAddress(hostport string) (*corev3.Address, error) {
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		return nil, fmt.Errorf("address %q: %w", hostport, err)
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 {
		return nil, fmt.Errorf("address %q: port must be 1..65535", hostport)
	}
	if host == "" {
		return nil, fmt.Errorf("address %q: empty host", hostport)
	}
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: host, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(n)},
	}}}, nil
}

func staticCluster(b *bootstrapv3.Bootstrap, name string) *clusterv3.Cluster {
	for _, c := range b.GetStaticResources().GetClusters() {
		if c.GetName() == name {
			return c
		}
	}
	return nil
}

// Check runs the deep proto validation (envoyvalidate: every rule, inside every Any)
// and patchbay's own rules for a bootstrap of the given role:
//   - node cluster "patchbay-<role>" and metadata patchbay.role = role;
//   - admin bound to a loopback address;
//   - ADS over gRPC to a static cluster, and LDS/CDS through ADS;
//   - static clusters patchbay_xds, patchbay_extproc and patchbay_otel exist and speak
//     HTTP/2 explicitly (typed_extension_protocol_options), as gRPC needs;
//   - every cluster a static listener routes to exists, and envoy_admin points at admin;
//   - names are unique, each static cluster has an endpoint, STATIC clusters and
//     listeners use IP literals (Envoy resolves no names there);
//   - patchbay_extproc has a gRPC health check, outlier detection and panic routing off
//     (checkExtProcFailFast), so a dead ext_proc is skipped at once;
//   - a TLS transport socket on patchbay_xds or patchbay_extproc has the shape CheckMTLS
//     asks for (a half-configured TLS cluster is an error, not plain text).
func Check(role Role, b *bootstrapv3.Bootstrap) error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if err := envoyvalidate.Validate(b); err != nil {
		errs = append(errs, err)
	}

	if want := "patchbay-" + string(role); b.GetNode().GetCluster() != want {
		bad("node.cluster = %q, want %q", b.GetNode().GetCluster(), want)
	}
	if got := b.GetNode().GetMetadata().GetFields()[RoleKey].GetStringValue(); got != string(role) {
		bad("node.metadata[%q] = %q, want %q", RoleKey, got, role)
	}

	adminAddr := b.GetAdmin().GetAddress().GetSocketAddress()
	if ip := net.ParseIP(adminAddr.GetAddress()); ip == nil || !ip.IsLoopback() {
		// An IP literal: the admin address is bound, and envoy_admin is a STATIC cluster.
		bad("admin.address %q is not a loopback IP: admin can drain and stop Envoy", adminAddr.GetAddress())
	}

	clusters := map[string]*clusterv3.Cluster{}
	for i, c := range b.GetStaticResources().GetClusters() {
		if _, dup := clusters[c.GetName()]; dup {
			bad("static_resources.clusters[%d]: duplicate name %q", i, c.GetName())
		}
		clusters[c.GetName()] = c
		if n := c.GetLoadAssignment().GetClusterName(); n != c.GetName() {
			bad("cluster %s: load_assignment.cluster_name = %q", c.GetName(), n)
		}
		if !hasEndpoint(c) {
			bad("cluster %s: no endpoint", c.GetName())
		}
		if c.GetType() == clusterv3.Cluster_STATIC {
			for _, le := range c.GetLoadAssignment().GetEndpoints() {
				for _, e := range le.GetLbEndpoints() {
					if a := e.GetEndpoint().GetAddress().GetSocketAddress().GetAddress(); net.ParseIP(a) == nil {
						bad("cluster %s is STATIC but endpoint %q is not an IP (Envoy resolves no names there)", c.GetName(), a)
					}
				}
			}
		}
	}

	ads := b.GetDynamicResources().GetAdsConfig()
	switch ads.GetApiType() {
	case corev3.ApiConfigSource_GRPC, corev3.ApiConfigSource_DELTA_GRPC:
	default:
		bad("dynamic_resources.ads_config.api_type = %v, want GRPC or DELTA_GRPC", ads.GetApiType())
	}
	if len(ads.GetGrpcServices()) == 0 {
		bad("dynamic_resources.ads_config: no grpc_services")
	}
	for i, gs := range ads.GetGrpcServices() {
		name := gs.GetEnvoyGrpc().GetClusterName()
		if name == "" {
			bad("ads_config.grpc_services[%d]: want envoy_grpc with a cluster_name", i)
		} else if clusters[name] == nil {
			bad("ads_config.grpc_services[%d]: cluster %q is not a static cluster", i, name)
		}
	}
	for field, cs := range map[string]*corev3.ConfigSource{"lds_config": b.GetDynamicResources().GetLdsConfig(), "cds_config": b.GetDynamicResources().GetCdsConfig()} {
		if cs.GetAds() == nil {
			bad("dynamic_resources.%s must use ads", field)
		}
	}

	for _, name := range []string{ClusterXDS, ClusterExtProc, ClusterOTel} {
		c := clusters[name]
		if c == nil {
			bad("static cluster %q is missing", name)
			continue
		}
		if err := checkHTTP2(c); err != nil {
			bad("cluster %s: %v", name, err)
		}
	}
	if c := clusters[ClusterExtProc]; c != nil {
		for _, err := range checkExtProcFailFast(c) {
			bad("cluster %s: %v", ClusterExtProc, err)
		}
	}
	for _, name := range []string{ClusterXDS, ClusterExtProc} {
		if c := clusters[name]; c.GetTransportSocket() != nil {
			if err := checkUpstreamMTLS(c, serverIdentity[name]); err != nil {
				bad("cluster %s: %v", name, err)
			}
		}
	}

	listeners := map[string]bool{}
	for i, l := range b.GetStaticResources().GetListeners() {
		if listeners[l.GetName()] {
			bad("static_resources.listeners[%d]: duplicate name %q", i, l.GetName())
		}
		listeners[l.GetName()] = true
		if a := l.GetAddress().GetSocketAddress().GetAddress(); net.ParseIP(a) == nil {
			bad("listener %s binds %q, which is not an IP", l.GetName(), a)
		}
		for _, target := range routedClusters(l.GetFilterChains()) {
			if clusters[target] == nil {
				bad("listener %s routes to cluster %q, which is not a static cluster", l.GetName(), target)
			}
		}
	}
	if !listeners[ListenerStats] {
		bad("static listener %q is missing (probes and Prometheus use it)", ListenerStats)
	}
	if c := clusters[ClusterAdmin]; c != nil && !proto.Equal(firstEndpoint(c), b.GetAdmin().GetAddress()) {
		bad("cluster %s does not point at admin.address", ClusterAdmin)
	}
	return errors.Join(errs...)
}

func hasEndpoint(c *clusterv3.Cluster) bool {
	return firstEndpoint(c).GetSocketAddress().GetPortValue() != 0
}

func firstEndpoint(c *clusterv3.Cluster) *corev3.Address {
	for _, le := range c.GetLoadAssignment().GetEndpoints() {
		for _, e := range le.GetLbEndpoints() {
			return e.GetEndpoint().GetAddress()
		}
	}
	return nil
}

// ExtProcHealthService is the gRPC health service name the ext_proc cluster checks:
// the ext_proc service itself, which patchbay extproc reports NOT_SERVING until it
// holds a policy.
var ExtProcHealthService = extprocv3.ExternalProcessor_ServiceDesc.ServiceName

// checkExtProcFailFast requires what lets Envoy skip a dead or black-holed ext_proc at
// once rather than wait message_timeout per request: an active gRPC health check of the
// ext_proc service (timeout below the interval), outlier detection that ejects on
// consecutive local-origin and gateway failures, and panic routing off (with panic
// routing, a cluster with no healthy host sends to every host anyway).
func checkExtProcFailFast(c *clusterv3.Cluster) []error {
	var errs []error
	var grpcHC *corev3.HealthCheck
	for _, hc := range c.GetHealthChecks() {
		if hc.GetGrpcHealthCheck() != nil {
			grpcHC = hc
		}
	}
	switch {
	case grpcHC == nil:
		errs = append(errs, errors.New("no gRPC health check: a dead ext_proc would cost every request message_timeout"))
	default:
		if n := grpcHC.GetGrpcHealthCheck().GetServiceName(); n != ExtProcHealthService && n != "" {
			errs = append(errs, fmt.Errorf("gRPC health check of service %q: extproc reports %q (or \"\")", n, ExtProcHealthService))
		}
		if to, iv := grpcHC.GetTimeout().AsDuration(), grpcHC.GetInterval().AsDuration(); to <= 0 || to >= iv {
			errs = append(errs, fmt.Errorf("gRPC health check timeout %v must be below its interval %v", to, iv))
		}
		if nt := grpcHC.GetNoTrafficInterval(); nt == nil || nt.AsDuration() > grpcHC.GetInterval().AsDuration() {
			errs = append(errs, errors.New("gRPC health check needs no_traffic_interval <= interval (Envoy's default is 60 s before the first request)"))
		}
	}
	od := c.GetOutlierDetection()
	switch {
	case od == nil:
		errs = append(errs, errors.New("no outlier_detection: ext_proc hosts that fail streams are never ejected"))
	default:
		if !od.GetSplitExternalLocalOriginErrors() || od.GetEnforcingConsecutiveLocalOriginFailure() == nil || od.GetEnforcingConsecutiveLocalOriginFailure().GetValue() == 0 {
			errs = append(errs, errors.New("outlier_detection must split local-origin errors and enforce consecutive_local_origin_failure (connect failures and timeouts)"))
		}
		if e := od.GetEnforcingConsecutiveGatewayFailure(); e == nil || e.GetValue() == 0 {
			errs = append(errs, errors.New("outlier_detection must enforce consecutive_gateway_failure (Envoy's default enforcement is 0%)"))
		}
		if m := od.GetMaxEjectionPercent(); m == nil || m.GetValue() < 100 {
			errs = append(errs, errors.New("outlier_detection.max_ejection_percent must be 100 so every dead ext_proc host can be ejected"))
		}
	}
	if p := c.GetCommonLbConfig().GetHealthyPanicThreshold(); p == nil || p.GetValue() != 0 {
		errs = append(errs, errors.New("common_lb_config.healthy_panic_threshold must be 0: in panic Envoy sends to unhealthy ext_proc hosts and waits message_timeout"))
	}
	return errs
}

// checkHTTP2 requires explicit HTTP/2 upstream options.
func checkHTTP2(c *clusterv3.Cluster) error {
	a := c.GetTypedExtensionProtocolOptions()[httpOptionsKey]
	if a == nil {
		return fmt.Errorf("no typed_extension_protocol_options[%q]: Envoy would speak HTTP/1.1, and gRPC needs HTTP/2", httpOptionsKey)
	}
	opts := new(upstreamhttpv3.HttpProtocolOptions)
	if err := a.UnmarshalTo(opts); err != nil {
		return fmt.Errorf("typed_extension_protocol_options[%q]: %w", httpOptionsKey, err)
	}
	if opts.GetExplicitHttpConfig().GetHttp2ProtocolOptions() == nil {
		return errors.New("HttpProtocolOptions must set explicit_http_config.http2_protocol_options")
	}
	return nil
}

// routedClusters lists the clusters named by inline route configs of HCM filters.
func routedClusters(chains []*listenerv3.FilterChain) []string {
	var out []string
	for _, fc := range chains {
		for _, f := range fc.GetFilters() {
			hcm := new(hcmv3.HttpConnectionManager)
			if f.GetTypedConfig() == nil || f.GetTypedConfig().UnmarshalTo(hcm) != nil {
				continue
			}
			for _, vh := range hcm.GetRouteConfig().GetVirtualHosts() {
				for _, r := range vh.GetRoutes() {
					if name := r.GetRoute().GetCluster(); name != "" {
						out = append(out, name)
					}
					for _, wc := range r.GetRoute().GetWeightedClusters().GetClusters() {
						out = append(out, wc.GetName())
					}
				}
			}
		}
	}
	return out
}

// setMonitors sets the overload manager's heap size and connection cap.
func setMonitors(b *bootstrapv3.Bootstrap, p Params) error {
	heapSet, connSet := p.MaxHeapBytes == 0, p.MaxConnections == 0
	for _, rm := range b.GetOverloadManager().GetResourceMonitors() {
		var msg proto.Message
		switch {
		case rm.GetName() == "envoy.resource_monitors.fixed_heap" && !heapSet:
			msg, heapSet = &fixedheapv3.FixedHeapConfig{MaxHeapSizeBytes: p.MaxHeapBytes}, true
		case rm.GetName() == "envoy.resource_monitors.global_downstream_max_connections" && !connSet:
			msg, connSet = &downstreamv3.DownstreamConnectionsConfig{MaxActiveDownstreamConnections: p.MaxConnections}, true
		default:
			continue
		}
		a, err := anypb.New(msg)
		if err != nil {
			return fmt.Errorf("overload_manager %s: %w", rm.GetName(), err)
		}
		rm.ConfigType = &overloadv3.ResourceMonitor_TypedConfig{TypedConfig: a}
	}
	if !heapSet || !connSet {
		return errors.New("overload_manager: the resource monitor to set is missing from the file")
	}
	return nil
}

// ListenerLimitKey is the runtime key capping connections on the role's routing listener.
func ListenerLimitKey(role Role) string {
	return "envoy.resource_limits.listener.patchbay_" + string(role) + ".connection_limit"
}

// setListenerLimit sets the per-listener connection cap in the "static" runtime layer:
// four fifths of the global cap, so probes still get in under a connection flood.
func setListenerLimit(b *bootstrapv3.Bootstrap, role Role, limit int64) error {
	for _, l := range b.GetLayeredRuntime().GetLayers() {
		if l.GetName() != "static" || l.GetStaticLayer() == nil {
			continue
		}
		if l.GetStaticLayer().Fields == nil {
			l.GetStaticLayer().Fields = map[string]*structpb.Value{}
		}
		l.GetStaticLayer().Fields[ListenerLimitKey(role)] = structpb.NewNumberValue(float64(limit))
		return nil
	}
	return errors.New("layered_runtime: no static layer for the listener connection limit")
}
