// Package xdsclient is a minimal State-of-the-World ADS client for one resource type and
// one resource name: it subscribes, hands every response to an apply function, ACKs what
// was applied and NACKs what was not, and reconnects with backoff when the stream breaks.
// Whatever was applied last stays in force while the control plane is away.
package xdsclient

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/rs/zerolog"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/anypb"
)

// ApplyFunc applies the resources of one response; a non-nil error NACKs it.
type ApplyFunc func(version string, resources []*anypb.Any) error

// Config configures a Client.
type Config struct {
	// Address of the ADS server (host:port).
	Address string
	// Node identifies this client to the control plane.
	Node         *corev3.Node
	TypeURL      string
	ResourceName string
	Apply        ApplyFunc
	Logger       zerolog.Logger
	// MinBackoff and MaxBackoff bound the reconnect delay (defaults 100ms and 5s).
	MinBackoff, MaxBackoff time.Duration
	// TLS, when set, secures the connection (credentials.NewTLS); nil: plaintext.
	TLS *tls.Config
	// DialOptions are added to the defaults (the transport credentials above).
	DialOptions []grpc.DialOption
}

// Client is an ADS client for one resource.
type Client struct {
	cfg   Config
	conn  *grpc.ClientConn
	ads   discoveryv3.AggregatedDiscoveryServiceClient
	acked string // last ACKed version, sent again with NACKs
}

// New validates cfg and creates the client connection (no I/O happens until Run).
func New(cfg Config) (*Client, error) {
	if cfg.Address == "" || cfg.TypeURL == "" || cfg.ResourceName == "" || cfg.Apply == nil || cfg.Node == nil {
		return nil, errors.New("xds client: address, node, type URL, resource name and apply are required")
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 100 * time.Millisecond
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		cfg.MaxBackoff = 5 * time.Second
	}
	creds := insecure.NewCredentials()
	if cfg.TLS != nil {
		creds = credentials.NewTLS(cfg.TLS)
	}
	opts := append([]grpc.DialOption{grpc.WithTransportCredentials(creds)}, cfg.DialOptions...)
	conn, err := grpc.NewClient(cfg.Address, opts...)
	if err != nil {
		return nil, fmt.Errorf("xds client: dial %q: %w", cfg.Address, err)
	}
	return &Client{cfg: cfg, conn: conn, ads: discoveryv3.NewAggregatedDiscoveryServiceClient(conn)}, nil
}

// Run keeps a subscription open until ctx ends, reconnecting with jittered exponential
// backoff. It returns nil when ctx ends.
func (c *Client) Run(ctx context.Context) error {
	defer c.conn.Close()
	backoff := c.cfg.MinBackoff
	for {
		got, err := c.stream(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if got {
			backoff = c.cfg.MinBackoff
		}
		c.cfg.Logger.Warn().Err(err).Str("xds", c.cfg.Address).Dur("retry_in", backoff).Msg("xds stream ended; keeping last good policy")
		delay := backoff/2 + rand.N(backoff/2+1)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(delay):
		}
		backoff = min(backoff*2, c.cfg.MaxBackoff)
	}
}

// stream runs one ADS stream; got reports whether any response arrived on it.
func (c *Client) stream(ctx context.Context) (got bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s, err := c.ads.StreamAggregatedResources(ctx, grpc.WaitForReady(false))
	if err != nil {
		return false, fmt.Errorf("open ADS stream: %w", err)
	}
	// A new stream starts from scratch (empty version and nonce) so that a restarted
	// control plane whose version counter collides with ours still sends its state.
	req := &discoveryv3.DiscoveryRequest{
		Node:          c.cfg.Node,
		TypeUrl:       c.cfg.TypeURL,
		ResourceNames: []string{c.cfg.ResourceName},
	}
	if err := s.Send(req); err != nil {
		return false, fmt.Errorf("send subscription: %w", err)
	}
	for {
		resp, err := s.Recv()
		if err != nil {
			return got, fmt.Errorf("receive: %w", err)
		}
		got = true
		next := &discoveryv3.DiscoveryRequest{
			TypeUrl:       resp.GetTypeUrl(),
			ResourceNames: []string{c.cfg.ResourceName},
			ResponseNonce: resp.GetNonce(),
		}
		if resp.GetTypeUrl() != c.cfg.TypeURL {
			next.VersionInfo = ""
			next.ErrorDetail = &status.Status{Code: int32(codes.InvalidArgument), Message: fmt.Sprintf("unexpected type %q", resp.GetTypeUrl())}
		} else if err := c.cfg.Apply(resp.GetVersionInfo(), resp.GetResources()); err != nil {
			c.cfg.Logger.Error().Err(err).Str("version", resp.GetVersionInfo()).Msg("rejected policy (NACK); keeping last good")
			next.VersionInfo = c.acked
			next.ErrorDetail = &status.Status{Code: int32(codes.InvalidArgument), Message: err.Error()}
		} else {
			c.acked = resp.GetVersionInfo()
			next.VersionInfo = c.acked
		}
		if err := s.Send(next); err != nil {
			return got, fmt.Errorf("send ack: %w", err)
		}
	}
}
