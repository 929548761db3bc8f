package fanout

import (
	"testing"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// TestLiteCodecReadsEnvelope: the fleet's codec reads version, nonce and resource count of
// SotW and delta responses as marshalled by the server, skipping the resources.
func TestLiteCodecReadsEnvelope(t *testing.T) {
	res := &anypb.Any{TypeUrl: "type.googleapis.com/x", Value: make([]byte, 1000)}
	for _, m := range []proto.Message{
		&discoveryv3.DiscoveryResponse{VersionInfo: "v7", Nonce: "n3", TypeUrl: "t", Resources: []*anypb.Any{res, res}},
		&discoveryv3.DeltaDiscoveryResponse{SystemVersionInfo: "v7", Nonce: "n3", TypeUrl: "t",
			Resources: []*discoveryv3.Resource{{Name: "a", Version: "x", Resource: res}, {Name: "b", Version: "y", Resource: res}}},
	} {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		var l lite
		if err := (liteCodec{}).Unmarshal(b, &l); err != nil {
			t.Fatal(err)
		}
		if l.version != "v7" || l.nonce != "n3" || l.resources != 2 || l.bytes != len(b) {
			t.Errorf("%T: got %+v", m, l)
		}
	}
	var l lite
	if err := (liteCodec{}).Unmarshal([]byte{0x0a, 0x05, 'x'}, &l); err == nil {
		t.Error("a truncated message decoded without error")
	}
}
