package xds

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"github.com/patchbay-io/patchbay/api/contract"
	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/xds/rollout"
	"github.com/patchbay-io/patchbay/xds/translate"
)

// Reading a version's OIP model metadata, shared by the control plane's contract check and
// `patchbay rollout validate --live`, so both read it the same way.

// MetadataEndpoint is one address a version's OIP model metadata is read on.
type MetadataEndpoint struct {
	// Addr is the host:port dialled.
	Addr string
	// ServerName is the TLS server name: the host as the rollout writes it.
	ServerName string
	// GRPC reads it with gRPC ModelMetadata; else REST GET /v2/models/<m>/versions/<v>.
	GRPC bool
}

func (e MetadataEndpoint) String() string {
	if e.GRPC {
		return "grpc://" + e.Addr
	}
	return e.Addr
}

// MetadataEndpoints are the endpoints version v's metadata is read on: its REST endpoints,
// or, for a version without any (protocol: grpc, or grpcEndpoints only), its gRPC ones.
// resolve gives the addresses one written address dials (nil: the address as written).
func MetadataEndpoints(v rollout.Version, resolve func(addr string) []string) []MetadataEndpoint {
	addrs, grpcOnly := v.RESTEndpoints(), false
	if len(addrs) == 0 {
		addrs, grpcOnly = v.GRPCAddrs(), true
	}
	var out []MetadataEndpoint
	for _, a := range addrs {
		host := a
		if i := strings.LastIndexByte(a, ':'); i >= 0 {
			host = strings.Trim(a[:i], "[]")
		}
		dial := []string{a}
		if resolve != nil {
			dial = resolve(a)
		}
		for _, d := range dial {
			out = append(out, MetadataEndpoint{Addr: d, ServerName: host, GRPC: grpcOnly})
		}
	}
	return out
}

// ReadVersionMetadata reads model/version's OIP model metadata on ep, over TLS with tlsCfg
// when it is not nil, within timeout (0: translate.HealthCheckTimeout). Over gRPC, the
// inputs a patchbay host may fill itself come from the response header
// contract.OptionalInputsHeader (absent: Optional stays nil, as for another OIP server).
func ReadVersionMetadata(ctx context.Context, model, version string, ep MetadataEndpoint, tlsCfg *tls.Config, timeout time.Duration) (rollout.Metadata, error) {
	if timeout <= 0 {
		timeout = translate.HealthCheckTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if ep.GRPC {
		return readGRPCMetadata(ctx, model, version, ep, tlsCfg)
	}
	return readRESTMetadata(ctx, model, version, ep, tlsCfg)
}

// CheckVersionContract reads model/version's metadata on every endpoint and returns why the
// version is held ("metadata unreadable: ..." or "breaks the contract (addr): ..."), or ""
// when every endpoint's metadata keeps c. tlsCfg gives the client TLS config for a server
// name; nil reads in plaintext.
func CheckVersionContract(ctx context.Context, c *rollout.Contract, model, version string, eps []MetadataEndpoint, tlsCfg func(serverName string) (*tls.Config, error), timeout time.Duration) string {
	if len(eps) == 0 {
		return "no resolved endpoint to read its OIP model metadata from"
	}
	var problems []string
	for _, ep := range eps {
		var cfg *tls.Config
		if tlsCfg != nil {
			var err error
			if cfg, err = tlsCfg(ep.ServerName); err != nil {
				problems = append(problems, "metadata unreadable ("+ep.String()+"): "+err.Error())
				continue
			}
		}
		md, err := ReadVersionMetadata(ctx, model, version, ep, cfg, timeout)
		if err != nil {
			problems = append(problems, "metadata unreadable: "+err.Error())
			continue
		}
		if err := rollout.CheckContract(c, md); err != nil {
			problems = append(problems, "breaks the contract ("+ep.String()+"): "+strings.ReplaceAll(err.Error(), "\n", "; "))
		}
	}
	return strings.Join(problems, "; ")
}

func readRESTMetadata(ctx context.Context, model, version string, ep MetadataEndpoint, tlsCfg *tls.Config) (rollout.Metadata, error) {
	var md rollout.Metadata
	tr, scheme := &http.Transport{DisableKeepAlives: true}, "http"
	if tlsCfg != nil {
		tr.TLSClientConfig, scheme = tlsCfg, "https"
	}
	defer tr.CloseIdleConnections()
	url := scheme + "://" + ep.Addr + "/v2/models/" + model + "/versions/" + version
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return md, err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return md, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxMetadataBytes+1))
	if err != nil {
		return md, fmt.Errorf("GET %s: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return md, fmt.Errorf("GET %s: HTTP %d %s", url, resp.StatusCode, strings.TrimSpace(string(body[:min(len(body), 200)])))
	}
	if len(body) > maxMetadataBytes {
		return md, fmt.Errorf("GET %s: answer over %d bytes", url, maxMetadataBytes)
	}
	if err := json.Unmarshal(body, &md); err != nil {
		return md, fmt.Errorf("GET %s: not OIP model metadata: %v", url, err)
	}
	return md, nil
}

// readGRPCMetadata calls inference.GRPCInferenceService/ModelMetadata on ep. The header
// metadata comes from grpc.Header, a CallOption filled once the call has its response
// headers (grpc-go rpc_util.go, HeaderCallOption).
func readGRPCMetadata(ctx context.Context, model, version string, ep MetadataEndpoint, tlsCfg *tls.Config) (rollout.Metadata, error) {
	var md rollout.Metadata
	conn, err := dialVersion(ep.Addr, tlsCfg, grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMetadataBytes)))
	if err != nil {
		return md, fmt.Errorf("gRPC ModelMetadata on %s: %w", ep.Addr, err)
	}
	defer conn.Close()
	var hdr metadata.MD
	resp, err := oip.NewGRPCInferenceServiceClient(conn).ModelMetadata(ctx,
		&oip.ModelMetadataRequest{Name: model, Version: version}, grpc.Header(&hdr))
	if err != nil {
		return md, fmt.Errorf("gRPC ModelMetadata on %s: %w", ep.Addr, err)
	}
	optional, said := optionalInputs(hdr)
	conv := func(ts []*oip.ModelMetadataResponse_TensorMetadata, inputs bool) []rollout.Tensor {
		out := make([]rollout.Tensor, 0, len(ts))
		for _, t := range ts {
			ct := contract.Tensor{Name: t.GetName(), Datatype: t.GetDatatype(), Shape: t.GetShape()}
			if inputs && said {
				opt := optional[t.GetName()]
				ct.Optional = &opt
			}
			out = append(out, ct)
		}
		return out
	}
	md.Inputs, md.Outputs = conv(resp.GetInputs(), true), conv(resp.GetOutputs(), false)
	return md, nil
}

// optionalInputs reads contract.OptionalInputsHeader: the inputs listed (comma-separated,
// in one or more values), and whether the header was there at all.
func optionalInputs(hdr metadata.MD) (map[string]bool, bool) {
	vals := hdr.Get(contract.OptionalInputsHeader)
	if len(vals) == 0 {
		return nil, false
	}
	out := map[string]bool{}
	for _, v := range vals {
		for n := range strings.SplitSeq(v, ",") {
			if n = strings.TrimSpace(n); n != "" {
				out[n] = true
			}
		}
	}
	return out, true
}
