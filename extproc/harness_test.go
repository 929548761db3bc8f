package extproc

import (
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/patchbay-io/patchbay/api/headers"
	policyv1 "github.com/patchbay-io/patchbay/api/policy/v1"
)

// testPolicy has a model with a pinnable version and two layered experiments, and a
// body-mode model.
func testPolicy(version string) *policyv1.Policy {
	return &policyv1.Policy{
		ConfigVersion: version,
		Layers:        []*policyv1.Layer{{Name: "ranking", Salt: "L1"}, {Name: "ui", Salt: "L2"}},
		Models: []*policyv1.Model{
			{Name: "ranker", Salt: "ranker-salt", Versions: []string{"v7", "v8"}, Pinning: false,
				Experiments: []*policyv1.Experiment{
					{Name: "ltv", Layer: "ranking", SlotStart: 0, SlotEnd: 2000, Salt: "ltv",
						Arms: []*policyv1.Arm{{Name: "control", Version: "v7", Weight: 30}, {Name: "treatment", Version: "v8", Weight: 70}}},
					{Name: "color", Layer: "ui", SlotStart: 0, SlotEnd: 5000, Salt: "color",
						Arms: []*policyv1.Arm{{Name: "a", Version: "v7", Weight: 1}, {Name: "b", Version: "v8", Weight: 1}}},
				}},
			{Name: "thumbs", Salt: "thumbs-salt", Versions: []string{"v1", "v2"}, Pinning: true, BodyMode: true},
		},
	}
}

// harness is a running Server on 127.0.0.1:0 with a connected ext_proc client.
type harness struct {
	srv    *Server
	client extprocv3.ExternalProcessorClient
	conn   *grpc.ClientConn
	addr   string
}

func startServer(t testing.TB, cfg Config, p *policyv1.Policy) *harness {
	t.Helper()
	srv, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if p != nil {
		if err := srv.SetPolicy(p); err != nil {
			t.Fatalf("SetPolicy: %v", err)
		}
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, lis) }()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return after cancel")
		}
	})
	return &harness{srv: srv, client: extprocv3.NewExternalProcessorClient(conn), conn: conn, addr: lis.Addr().String()}
}

// exchange plays Envoy: one stream, each message sent and (unless observability mode)
// its answer read before the next, then half-close. It returns the answers and the
// stream's final error (nil for a clean end).
func (h *harness) exchange(t testing.TB, msgs ...*extprocv3.ProcessingRequest) ([]*extprocv3.ProcessingResponse, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := h.client.Process(ctx)
	if err != nil {
		t.Fatalf("Process: %v", err)
	}
	var out []*extprocv3.ProcessingResponse
	for _, m := range msgs {
		if err := s.Send(m); err != nil {
			t.Fatalf("Send: %v", err)
		}
		if m.GetObservabilityMode() {
			continue
		}
		r, err := s.Recv()
		if err != nil {
			return out, err
		}
		out = append(out, r)
	}
	if err := s.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if r, err := s.Recv(); !errors.Is(err, io.EOF) {
		if err == nil {
			t.Fatalf("unexpected extra answer %v", r)
		}
		return out, err
	}
	return out, nil
}

// reqHeaders is a request-headers message with Envoy's raw_value encoding.
func reqHeaders(endOfStream bool, kv ...string) *extprocv3.ProcessingRequest {
	hm := &corev3.HeaderMap{}
	for i := 0; i < len(kv); i += 2 {
		hm.Headers = append(hm.Headers, &corev3.HeaderValue{Key: kv[i], RawValue: []byte(kv[i+1])})
	}
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestHeaders{
		RequestHeaders: &extprocv3.HttpHeaders{Headers: hm, EndOfStream: endOfStream},
	}}
}

func set(key, value string) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{
		Header:       &corev3.HeaderValue{Key: key, RawValue: []byte(value)},
		Append:       wrapperspb.Bool(false), // Envoy's ext_proc reads this, not append_action
		AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
	}
}

func bucketOf(salt, id string) *corev3.HeaderValueOption {
	return set(headers.Bucket, strconv.FormatUint(policyv1.Hash(salt, id), 10))
}

// routed is the expected headers answer of a routed request.
func routed(remove []string, sets ...*corev3.HeaderValueOption) *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{
		RequestHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{
			HeaderMutation:  &extprocv3.HeaderMutation{SetHeaders: sets, RemoveHeaders: remove},
			ClearRouteCache: true,
		}},
	}}
}

// userIn finds a user, by the contract's formulas (independently of the code under
// test), whose layer slot and arm satisfy pred.
func userIn(t testing.TB, pred func(id string) bool) string {
	t.Helper()
	for i := range 100000 {
		id := "user-" + strconv.Itoa(i)
		if pred(id) {
			return id
		}
	}
	t.Fatal("no user found")
	return ""
}

func slot(layerSalt, id string) uint64 { return policyv1.Hash(layerSalt, id) % policyv1.LayerSlots }

func newLocalListener(t testing.TB) net.Listener {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lis.Close() })
	return lis
}

type anyT = anypb.Any

func mustAny(t testing.TB, m proto.Message) *anypb.Any {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}
