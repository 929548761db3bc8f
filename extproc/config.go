// Package extproc is patchbay's Envoy external-processing server: for every prediction
// request it reads the request headers, decides the sticky bucket, experiment arms and
// (when an arm or an allowed pin decides it) the version, and answers Envoy with header
// mutations. Its routing policy arrives from the control plane over xDS.
package extproc

import (
	"crypto/tls"
	"errors"
	"time"

	"github.com/rs/zerolog"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/trace"
)

// Config configures a Server. The zero value of every optional field is usable.
type Config struct {
	// XDSAddress is the control plane's ADS address. Empty: no xDS client; the
	// policy is set with SetPolicy (tests, embedding).
	XDSAddress string
	// NodeID is the xDS node id presented to the control plane (default hostname-pid).
	NodeID string
	// IdentityHeaders are read for the user's identity, first present wins, when the
	// policy names none (default ["x-user-id"]).
	IdentityHeaders []string
	// Logger receives the component's logs (nothing per request above debug).
	Logger zerolog.Logger
	// Meter records decision metrics (default: no-op).
	Meter metric.Meter
	// TracerProvider enables a span per decision when set.
	TracerProvider trace.TracerProvider
	// NumStreamWorkers is passed to grpc.NumStreamWorkers when > 0.
	NumStreamWorkers uint32
	// MaxBodyBytes bounds what body mode reads of a request body (default 1 MiB).
	MaxBodyBytes int
	// XDSMinBackoff and XDSMaxBackoff bound reconnect delays (defaults 100ms, 5s).
	XDSMinBackoff, XDSMaxBackoff time.Duration
	// ShutdownGrace bounds graceful stop when Serve's context ends (default 5s).
	ShutdownGrace time.Duration
	// TLS, when set, serves ext_proc and gRPC health over TLS; client certificates are
	// required when it asks for them (tlsfiles.Source.ServerConfig("h2") with a client
	// CA). Nil: plaintext.
	TLS *tls.Config
	// AdminTLS, when set, serves ServeAdmin over TLS (tlsfiles.Source.ServerConfig("h2",
	// "http/1.1")). Nil: plaintext.
	AdminTLS *tls.Config
	// XDSTLS, when set, is the xDS client's TLS: it verifies the control plane and
	// presents a certificate if it has one (tlsfiles.Source.ClientConfig(host of
	// XDSAddress)). Nil: plaintext.
	XDSTLS *tls.Config
}

func (c *Config) defaults() error {
	if c.Meter == nil {
		c.Meter = noop.NewMeterProvider().Meter("")
	}
	if c.MaxBodyBytes == 0 {
		c.MaxBodyBytes = 1 << 20
	}
	if c.MaxBodyBytes < 0 {
		return errors.New("extproc config: MaxBodyBytes must be positive")
	}
	if c.ShutdownGrace <= 0 {
		c.ShutdownGrace = 5 * time.Second
	}
	return nil
}
