package envoyvalidate

import (
	"strings"
	"testing"

	xdstypev3 "github.com/cncf/xds/go/xds/type/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

const httpOptionsKey = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

func mustAny(t testing.TB, m proto.Message) *anypb.Any {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// h2Cluster is a valid cluster whose HTTP/2 settings sit inside an Any.
func h2Cluster(t testing.TB, maxStreams uint32) *clusterv3.Cluster {
	opts := &upstreamhttpv3.HttpProtocolOptions{
		UpstreamProtocolOptions: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_{
			ExplicitHttpConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{
					Http2ProtocolOptions: &corev3.Http2ProtocolOptions{
						MaxConcurrentStreams: wrapperspb.UInt32(maxStreams),
					},
				},
			},
		},
	}
	return &clusterv3.Cluster{
		Name:                          "patchbay_extproc",
		ConnectTimeout:                durationpb.New(1e9),
		ClusterDiscoveryType:          &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STRICT_DNS},
		TypedExtensionProtocolOptions: map[string]*anypb.Any{httpOptionsKey: mustAny(t, opts)},
	}
}

func TestValidate(t *testing.T) {
	t.Parallel()
	unknownAny := &anypb.Any{TypeUrl: "type.googleapis.com/patchbay.test.NoSuchType", Value: []byte{}}
	hcmInListener := func(hcm *hcmv3.HttpConnectionManager) *listenerv3.Listener {
		return &listenerv3.Listener{
			Name: "l",
			Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
				Address: "127.0.0.1", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 10000},
			}}},
			FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{{
				Name:       "envoy.filters.network.http_connection_manager",
				ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(t, hcm)},
			}}}},
		}
	}
	okHCM := func() *hcmv3.HttpConnectionManager {
		return &hcmv3.HttpConnectionManager{
			StatPrefix:     "edge",
			RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{RouteConfigName: "r", ConfigSource: &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}}}},
			HttpFilters: []*hcmv3.HttpFilter{{
				Name:       "envoy.filters.http.router",
				ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(t, &routerv3.Router{})},
			}},
		}
	}
	badRouterInHCM := okHCM()
	// A Router with a bad value two Any levels down (listener -> HCM -> router).
	badRouterInHCM.HttpFilters[0].ConfigType = &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(t, &routerv3.Router{
		UpstreamLog: nil, StrictCheckHeaders: []string{"not-an-envoy-header"},
	})}
	typedStruct := func(fields map[string]any) *anypb.Any {
		s, err := structpb.NewStruct(fields)
		if err != nil {
			t.Fatal(err)
		}
		return mustAny(t, &xdstypev3.TypedStruct{TypeUrl: "type.googleapis.com/" + httpOptionsKey, Value: s})
	}
	withTS := func(a *anypb.Any) *clusterv3.Cluster {
		c := h2Cluster(t, 100)
		c.TypedExtensionProtocolOptions[httpOptionsKey] = a
		return c
	}
	deprecated := h2Cluster(t, 100)
	deprecated.Http2ProtocolOptions = &corev3.Http2ProtocolOptions{} //nolint:staticcheck // the point of the case

	for _, tc := range []struct {
		name    string
		msg     proto.Message
		wantErr []string // substrings; empty means valid
	}{
		{name: "valid cluster", msg: h2Cluster(t, 100)},
		{name: "valid listener, two Any levels", msg: hcmInListener(okHCM())},
		{name: "top-level rule", msg: &clusterv3.Cluster{}, wantErr: []string{"Cluster: ", "Name"}},
		{
			name:    "rule inside an Any in a map",
			msg:     h2Cluster(t, 0), // max_concurrent_streams must be >= 1
			wantErr: []string{`typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]<envoy.extensions.upstreams.http.v3.HttpProtocolOptions>`, "MaxConcurrentStreams"},
		},
		{
			name:    "rule inside an Any inside an Any",
			msg:     hcmInListener(badRouterInHCM),
			wantErr: []string{"<envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager>.http_filters[0].typed_config<envoy.extensions.filters.http.router.v3.Router>", "StrictCheckHeaders"},
		},
		{
			name:    "unregistered Any type",
			msg:     withTS(unknownAny),
			wantErr: []string{"patchbay.test.NoSuchType", "not registered"},
		},
		{name: "valid TypedStruct", msg: withTS(typedStruct(map[string]any{"explicit_http_config": map[string]any{"http2_protocol_options": map[string]any{}}}))},
		{
			name:    "TypedStruct with an unknown field",
			msg:     withTS(typedStruct(map[string]any{"explicit_http_config": map[string]any{"http9_protocol_options": map[string]any{}}})),
			wantErr: []string{"TypedStruct", "http9_protocol_options"},
		},
		{
			name:    "TypedStruct whose message breaks a rule",
			msg:     withTS(typedStruct(map[string]any{"explicit_http_config": map[string]any{"http2_protocol_options": map[string]any{"max_concurrent_streams": 0}}})),
			wantErr: []string{"<xds.type.v3.TypedStruct><envoy.extensions.upstreams.http.v3.HttpProtocolOptions>", "MaxConcurrentStreams"},
		},
		{name: "deprecated field", msg: deprecated, wantErr: []string{"Cluster.http2_protocol_options: field is deprecated"}},
		{name: "Any without type", msg: withTS(&anypb.Any{}), wantErr: []string{"no type_url"}},
		{name: "Any with garbage bytes", msg: withTS(&anypb.Any{TypeUrl: "type.googleapis.com/" + httpOptionsKey, Value: []byte{0xff, 0xff, 0xff}}), wantErr: []string{"unpack Any"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := Validate(tc.msg)
			if len(tc.wantErr) == 0 {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate = nil, want an error containing %q", tc.wantErr)
			}
			for _, s := range tc.wantErr {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("Validate error\n%v\ndoes not contain %q", err, s)
				}
			}
		})
	}
}

// TestValidateSeesWhatValidateAllMisses pins the reason this package exists: the
// generated validator of the outer message accepts a broken inner Any.
func TestValidateSeesWhatValidateAllMisses(t *testing.T) {
	t.Parallel()
	c := h2Cluster(t, 0)
	if err := c.ValidateAll(); err != nil {
		t.Fatalf("Cluster.ValidateAll unexpectedly looked inside the Any: %v", err)
	}
	if err := Validate(c); err == nil {
		t.Fatal("Validate accepted max_concurrent_streams 0 inside typed_extension_protocol_options")
	}
}

func TestValidateNil(t *testing.T) {
	t.Parallel()
	if err := Validate(nil); err == nil {
		t.Fatal("Validate(nil) = nil")
	}
}

// FuzzValidateAny feeds arbitrary bytes as the content of an Any of a few Envoy
// types: Validate must return (an error or nil), never panic.
func FuzzValidateAny(f *testing.F) {
	for _, m := range []proto.Message{
		h2Cluster(f, 1),
		&hcmv3.HttpConnectionManager{StatPrefix: "x"},
		&routerv3.Router{},
	} {
		b, err := proto.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(string(m.ProtoReflect().Descriptor().FullName()), b)
	}
	f.Fuzz(func(t *testing.T, typeName string, value []byte) {
		l := &listenerv3.Listener{Name: "l", FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{{
			Name:       "f",
			ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: &anypb.Any{TypeUrl: "type.googleapis.com/" + typeName, Value: value}},
		}}}}}
		_ = Validate(l)
	})
}
