package envoy

import (
	overloadv3 "github.com/envoyproxy/go-control-plane/envoy/config/overload/v3"
	"google.golang.org/protobuf/types/known/anypb"
)

func typedConfig(a *anypb.Any) *overloadv3.ResourceMonitor_TypedConfig {
	return &overloadv3.ResourceMonitor_TypedConfig{TypedConfig: a}
}
