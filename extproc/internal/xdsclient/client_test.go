package xdsclient

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/anypb"
)

// scriptedADS sends the scripted responses one by one, each after the client's
// previous request, and records the requests. It exercises the client's answers to
// what go-control-plane never sends (a foreign type URL).
type scriptedADS struct {
	discoveryv3.UnimplementedAggregatedDiscoveryServiceServer
	script []*discoveryv3.DiscoveryResponse
	reqs   chan *discoveryv3.DiscoveryRequest
}

func (s *scriptedADS) StreamAggregatedResources(st discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesServer) error {
	for i := 0; ; i++ {
		req, err := st.Recv()
		if err != nil {
			return nil
		}
		s.reqs <- req
		if i < len(s.script) {
			if err := st.Send(s.script[i]); err != nil {
				return err
			}
		}
	}
}

func TestClientAcksNacks(t *testing.T) {
	const typ = "type.googleapis.com/test.Thing"
	ads := &scriptedADS{
		reqs: make(chan *discoveryv3.DiscoveryRequest, 16),
		script: []*discoveryv3.DiscoveryResponse{
			{VersionInfo: "1", TypeUrl: typ, Nonce: "n1", Resources: []*anypb.Any{{TypeUrl: typ}}},
			{VersionInfo: "2", TypeUrl: "type.googleapis.com/other", Nonce: "n2"},
			{VersionInfo: "3", TypeUrl: typ, Nonce: "n3"}, // apply fails
			{VersionInfo: "4", TypeUrl: typ, Nonce: "n4"},
		},
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(gs, ads)
	go func() { _ = gs.Serve(lis) }()
	defer gs.Stop()

	var applied []string
	c, err := New(Config{
		Address: lis.Addr().String(), Node: &corev3.Node{Id: "n"}, TypeURL: typ, ResourceName: "r",
		Logger: zerolog.Nop(),
		Apply: func(version string, _ []*anypb.Any) error {
			applied = append(applied, version)
			if version == "3" {
				return errors.New("bad thing")
			}
			return nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()

	want := []struct {
		version, nonce string
		nack           bool
	}{
		{"", "", false}, {"1", "n1", false}, {"", "n2", true}, {"1", "n3", true}, {"4", "n4", false},
	}
	for i, w := range want {
		select {
		case r := <-ads.reqs:
			if r.GetVersionInfo() != w.version || r.GetResponseNonce() != w.nonce || (r.GetErrorDetail() != nil) != w.nack {
				t.Errorf("request %d = version %q nonce %q error %v; want %q %q nack=%v", i, r.GetVersionInfo(), r.GetResponseNonce(), r.GetErrorDetail(), w.version, w.nonce, w.nack)
			}
			if i == 0 && (r.GetNode().GetId() != "n" || r.GetTypeUrl() != typ || len(r.GetResourceNames()) != 1) {
				t.Errorf("subscription = %v", r)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("request %d never came", i)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}
	if len(applied) != 3 || applied[0] != "1" || applied[1] != "3" || applied[2] != "4" {
		t.Errorf("applied %v, want [1 3 4] (the foreign type is never applied)", applied)
	}
}

func TestNewValidates(t *testing.T) {
	if _, err := New(Config{Address: "127.0.0.1:1"}); err == nil {
		t.Error("incomplete config accepted")
	}
}
