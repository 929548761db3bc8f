package modelhost

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/patchbay-io/patchbay/api/contract"
	"github.com/patchbay-io/patchbay/api/headers"
	"github.com/patchbay-io/patchbay/api/oip"
	"github.com/patchbay-io/patchbay/modelhost/tensor"
)

// grpcService implements inference.GRPCInferenceService.
type grpcService struct {
	oip.UnimplementedGRPCInferenceServiceServer
	s *Server
}

// RegisterGRPC registers the OIP gRPC service on g.
func (s *Server) RegisterGRPC(g *grpc.Server) {
	oip.RegisterGRPCInferenceServiceServer(g, &grpcService{s: s})
}

// GRPCServerOptions are the options Serve uses for its gRPC server (without TLS): message
// sizes bounded by MaxBodyBytes, at most MaxInflight streams per connection (one connection,
// as from Envoy, may use the host's whole budget, no more), the in-flight admission tap
// (which also gives a ModelInfer stream ReadTimeout to deliver its message), and the
// connection timeouts REST has: ReadHeaderTimeout for the handshake, IdleTimeout for a
// connection with no stream (closed with GOAWAY), and keepalive pings after IdleTimeout of
// silence, a peer not answering within ReadHeaderTimeout being dropped.
func (s *Server) GRPCServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{grpc.MaxRecvMsgSize(int(s.cfg.MaxBodyBytes)), grpc.MaxSendMsgSize(int(s.cfg.MaxBodyBytes)),
		grpc.MaxConcurrentStreams(uint32(min(s.cfg.MaxInflight, 1<<20))), grpc.InTapHandle(s.tap),
		grpc.ConnectionTimeout(s.cfg.ReadHeaderTimeout),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: s.cfg.IdleTimeout, Time: s.cfg.IdleTimeout, Timeout: s.cfg.ReadHeaderTimeout})}
}

func grpcErr(e *apiError) error { return status.Error(e.code, e.msg) }

func (g *grpcService) ServerLive(context.Context, *oip.ServerLiveRequest) (*oip.ServerLiveResponse, error) {
	return &oip.ServerLiveResponse{Live: true}, nil
}

func (g *grpcService) ServerReady(context.Context, *oip.ServerReadyRequest) (*oip.ServerReadyResponse, error) {
	return &oip.ServerReadyResponse{Ready: g.s.Ready()}, nil
}

func (g *grpcService) ModelReady(ctx context.Context, r *oip.ModelReadyRequest) (*oip.ModelReadyResponse, error) {
	if e := checkRoutedModel(r.GetName(), metadata.ValueFromIncomingContext(ctx, headers.Model)); e != nil {
		return nil, grpcErr(e)
	}
	ver, e := grpcRoutedVersion(ctx, r.GetVersion(), "version")
	if e != nil {
		return nil, grpcErr(e)
	}
	ok, err := g.s.modelReady(r.GetName(), ver)
	if err != nil {
		return nil, grpcErr(err)
	}
	return &oip.ModelReadyResponse{Ready: ok}, nil
}

func (g *grpcService) ServerMetadata(context.Context, *oip.ServerMetadataRequest) (*oip.ServerMetadataResponse, error) {
	m := g.s.serverMetadata()
	return &oip.ServerMetadataResponse{Name: m.Name, Version: m.Version, Extensions: m.Extensions}, nil
}

func (g *grpcService) ModelMetadata(ctx context.Context, r *oip.ModelMetadataRequest) (*oip.ModelMetadataResponse, error) {
	if e := checkRoutedModel(r.GetName(), metadata.ValueFromIncomingContext(ctx, headers.Model)); e != nil {
		return nil, grpcErr(e)
	}
	ver, e := grpcRoutedVersion(ctx, r.GetVersion(), "version")
	if e != nil {
		return nil, grpcErr(e)
	}
	md, err := g.s.metadata(r.GetName(), ver)
	if err != nil {
		return nil, grpcErr(err)
	}
	// The ModelMetadataResponse has no field for an optional input: the header lists them
	// (present and empty when none, so a client knows every other input is required).
	var optional []string
	for _, t := range md.Inputs {
		if t.Optional != nil && *t.Optional {
			optional = append(optional, t.Name)
		}
	}
	_ = grpc.SetHeader(ctx, metadata.Pairs(contract.OptionalInputsHeader, strings.Join(optional, ",")))
	conv := func(ts []tensorMeta) []*oip.ModelMetadataResponse_TensorMetadata {
		out := make([]*oip.ModelMetadataResponse_TensorMetadata, len(ts))
		for i, t := range ts {
			out[i] = &oip.ModelMetadataResponse_TensorMetadata{Name: t.Name, Datatype: t.Datatype, Shape: t.Shape}
		}
		return out
	}
	return &oip.ModelMetadataResponse{Name: md.Name, Versions: md.Versions, Platform: md.Platform, Inputs: conv(md.Inputs), Outputs: conv(md.Outputs)}, nil
}

// The repository calls are served only on the admin listener (admin.go).

func (g *grpcService) RepositoryIndex(context.Context, *oip.RepositoryIndexRequest) (*oip.RepositoryIndexResponse, error) {
	return nil, grpcErr(errRepositoryOffDataPath)
}

func (g *grpcService) RepositoryModelLoad(context.Context, *oip.RepositoryModelLoadRequest) (*oip.RepositoryModelLoadResponse, error) {
	return nil, grpcErr(errRepositoryOffDataPath)
}

func (g *grpcService) RepositoryModelUnload(context.Context, *oip.RepositoryModelUnloadRequest) (*oip.RepositoryModelUnloadResponse, error) {
	return nil, grpcErr(errRepositoryOffDataPath)
}

// mdCarrier adapts incoming gRPC metadata for trace context extraction.
type mdCarrier metadata.MD

func (c mdCarrier) Get(k string) string {
	if v := metadata.MD(c).Get(k); len(v) > 0 {
		return v[0]
	}
	return ""
}
func (c mdCarrier) Set(k, v string) { metadata.MD(c).Set(k, v) }
func (c mdCarrier) Keys() []string {
	out := make([]string, 0, len(c))
	for k := range c {
		out = append(out, k)
	}
	return out
}

// incoming reads one metadata value without copying the whole incoming metadata.
func incoming(ctx context.Context, k string) string {
	if v := metadata.ValueFromIncomingContext(ctx, k); len(v) > 0 {
		return v[0]
	}
	return ""
}

// grpcRoutedVersion decides the version of a gRPC model call (infer, metadata, readiness):
// the version the router chose (x-patchbay-version, set by Envoy and ext_proc) wins.
// ext_proc cannot read gRPC bodies, so a message naming another version in field would
// otherwise step around the split, experiments and pinning rules; a conflict is refused.
func grpcRoutedVersion(ctx context.Context, ver, field string) (string, *apiError) {
	routed := metadata.ValueFromIncomingContext(ctx, headers.Version)
	switch {
	case len(routed) == 0 || (len(routed) == 1 && routed[0] == ""):
		return ver, nil
	case len(routed) > 1:
		return "", errInvalid("%s given %d times; one version per request", headers.Version, len(routed))
	case ver != "" && ver != routed[0]:
		return "", errInvalid("%s %q conflicts with the version the router chose (%q); leave %s empty behind patchbay", field, ver, routed[0], field)
	}
	return routed[0], nil
}

func (g *grpcService) ModelInfer(ctx context.Context, r *oip.ModelInferRequest) (*oip.ModelInferResponse, error) {
	s := g.s
	start := time.Now()
	name, ver := r.GetModelName(), r.GetModelVersion()
	// The model the router routed on (x-patchbay-model) is the model: a message naming
	// another one would run a model the route did not decide.
	if routed := metadata.ValueFromIncomingContext(ctx, headers.Model); len(routed) > 0 {
		if name == "" && len(routed) == 1 {
			name = routed[0]
		}
		if e := checkRoutedModel(name, routed); e != nil {
			return nil, status.Errorf(codes.InvalidArgument, "model_name: %s; leave model_name empty or equal to it behind patchbay", e.msg)
		}
	}
	ver, verr := grpcRoutedVersion(ctx, ver, "model_version")
	if verr != nil {
		return nil, grpcErr(verr)
	}
	// The stream was admitted before its message was read (tap), for the largest message it
	// could send; that reservation gives way to the message's real size now that it is known.
	if end := received(ctx); end != nil {
		defer end()
	}
	charge := grpcRequestBytes(r)
	if e := s.limits.acquireBytes(charge); e != nil {
		s.inst.refused.Add(ctx, 1, s.inst.refusedGRPC)
		return nil, grpcErr(e)
	}
	defer s.limits.releaseBytes(charge)
	var carrier mdCarrier
	traced := incoming(ctx, "traceparent") != ""
	if traced {
		md, _ := metadata.FromIncomingContext(ctx)
		carrier = mdCarrier(md)
	}
	ctx, span := s.startSpan(ctx, carrier, traced, "oip.grpc.infer")
	defer span.End()
	// grpc-go hands the request's :authority to handlers as incoming metadata.
	tr := trafficOfHost(incoming(ctx, ":authority"))
	if name == "" {
		e := errInvalid("model_name is empty and no %s metadata was sent", headers.Model)
		s.failed(ctx, span, nil, "grpc", tr, e)
		return nil, grpcErr(e)
	}
	v, aerr := s.lookup(name, ver)
	if aerr != nil {
		s.failed(ctx, span, nil, "grpc", tr, aerr)
		return nil, grpcErr(aerr)
	}
	defer v.release()
	if span.IsRecording() {
		span.SetAttributes(attribute.String("patchbay.model", name), attribute.String("patchbay.version", v.spec.Version))
	}
	resp, aerr := s.inferGRPC(ctx, v, r, tr, start)
	if aerr != nil {
		s.failed(ctx, span, v, "grpc", tr, aerr)
		return nil, grpcErr(aerr)
	}
	_ = grpc.SetHeader(ctx, v.servedByMD)
	s.inst.requests.Add(ctx, 1, v.attrs.grpc[tr].add...)
	s.inst.latency.Record(ctx, time.Since(start).Seconds(), v.attrs.grpc[tr].rec...)
	return resp, nil
}

func (s *Server) inferGRPC(ctx context.Context, v *version, r *oip.ModelInferRequest, tr traffic, start time.Time) (*oip.ModelInferResponse, *apiError) {
	raw := r.GetRawInputContents()
	if len(raw) > 0 && len(raw) != len(r.GetInputs()) {
		return nil, errInvalid("raw_input_contents has %d entries for %d inputs", len(raw), len(r.GetInputs()))
	}
	in := make([]*tensor.Tensor, len(r.GetInputs()))
	limit := s.cfg.MaxTensorElements
	for i, pt := range r.GetInputs() {
		dt, ok := tensor.ParseDatatype(pt.GetDatatype())
		if !ok {
			return nil, errInvalid("input %q: unknown datatype %q", pt.GetName(), pt.GetDatatype())
		}
		t := &tensor.Tensor{Name: pt.GetName(), Datatype: dt, Shape: pt.GetShape()}
		n, err := tensor.Elements(t.Shape, limit)
		if err != nil {
			return nil, errInvalid("input %q: %v", t.Name, err)
		}
		if len(raw) > 0 {
			if pt.GetContents() != nil {
				return nil, errInvalid("input %q: contents and raw_input_contents are both set", t.Name)
			}
			if err := fromRaw(t, raw[i], n); err != nil {
				return nil, errInvalid("input %q: %v", t.Name, err)
			}
		} else if err := fromContents(t, pt.GetContents()); err != nil {
			return nil, errInvalid("input %q: %v", t.Name, err)
		}
		in[i] = t
	}
	in, aerr := s.complete(ctx, v, func(k string) string { return incoming(ctx, k) }, in)
	if aerr != nil {
		return nil, aerr
	}
	requested := make([]string, len(r.GetOutputs()))
	for i, o := range r.GetOutputs() {
		requested[i] = o.GetName()
	}
	ordered, aerr := s.prepare(v, in, make([]*tensor.Tensor, 0, len(v.spec.Inputs)), requested)
	if aerr != nil {
		return nil, aerr
	}
	outs, err := s.run(ctx, v, ordered, requested, tr)
	if err != nil {
		return nil, asAPIError(err)
	}
	if s.shadow != nil {
		s.shadow.offer(v, incoming(ctx, "x-request-id"), tr, outs, start)
	}
	resp := &oip.ModelInferResponse{ModelName: v.spec.Model, ModelVersion: v.spec.Version, Id: r.GetId(),
		Outputs: make([]*oip.ModelInferResponse_InferOutputTensor, len(outs))}
	// FP16 has no typed contents field, so a response with an FP16 output is all raw
	// (raw_output_contents covers every output or none).
	useRaw := len(raw) > 0
	for _, o := range outs {
		useRaw = useRaw || o.Datatype == tensor.FP16
	}
	for i, o := range outs {
		po := &oip.ModelInferResponse_InferOutputTensor{Name: o.Name, Datatype: o.Datatype.String(), Shape: o.Shape}
		if useRaw {
			resp.RawOutputContents = append(resp.RawOutputContents, toRaw(o))
		} else {
			po.Contents = toContents(o)
		}
		resp.Outputs[i] = po
	}
	return resp, nil
}

// fromContents takes typed contents; the field must match the datatype.
func fromContents(t *tensor.Tensor, c *oip.InferTensorContents) error {
	if c == nil {
		return errors.New("no contents (and no raw_input_contents)")
	}
	set := 0
	for _, n := range []int{len(c.BoolContents), len(c.IntContents), len(c.Int64Contents), len(c.UintContents), len(c.Uint64Contents), len(c.Fp32Contents), len(c.Fp64Contents), len(c.BytesContents)} {
		if n > 0 {
			set++
		}
	}
	if set > 1 {
		return errors.New("more than one contents field is set")
	}
	wrong := func(field string) error {
		if set == 1 {
			return fmt.Errorf("datatype %s takes %s, another contents field is set", t.Datatype, field)
		}
		return nil
	}
	switch t.Datatype {
	case tensor.FP32:
		t.F32 = c.Fp32Contents
		if len(t.F32) == 0 {
			return wrong("fp32_contents")
		}
	case tensor.FP64:
		t.F64 = c.Fp64Contents
		if len(t.F64) == 0 {
			return wrong("fp64_contents")
		}
	case tensor.INT64:
		t.I64 = c.Int64Contents
		if len(t.I64) == 0 {
			return wrong("int64_contents")
		}
	case tensor.UINT64:
		t.U64 = c.Uint64Contents
		if len(t.U64) == 0 {
			return wrong("uint64_contents")
		}
	case tensor.BOOL:
		t.Bool = c.BoolContents
		if len(t.Bool) == 0 {
			return wrong("bool_contents")
		}
	case tensor.BYTES:
		t.Bytes = c.BytesContents
		if len(t.Bytes) == 0 {
			return wrong("bytes_contents")
		}
	case tensor.INT8, tensor.INT16, tensor.INT32:
		if len(c.IntContents) == 0 {
			return wrong("int_contents")
		}
		lo, hi := t.Datatype.IntRange()
		t.I64 = make([]int64, len(c.IntContents))
		for i, x := range c.IntContents {
			if int64(x) < lo || int64(x) > hi {
				return fmt.Errorf("value %d out of %s range", x, t.Datatype)
			}
			t.I64[i] = int64(x)
		}
	case tensor.UINT8, tensor.UINT16, tensor.UINT32:
		if len(c.UintContents) == 0 {
			return wrong("uint_contents")
		}
		_, hi := t.Datatype.IntRange()
		t.I64 = make([]int64, len(c.UintContents))
		for i, x := range c.UintContents {
			if int64(x) > hi {
				return fmt.Errorf("value %d out of %s range", x, t.Datatype)
			}
			t.I64[i] = int64(x)
		}
	case tensor.FP16:
		return errors.New("FP16 has no typed contents field: send it in raw_input_contents (2 bytes an element, little-endian IEEE binary16)")
	default:
		return fmt.Errorf("datatype %s is not supported in typed contents", t.Datatype)
	}
	return nil
}

// fromRaw decodes little-endian raw bytes for n elements.
func fromRaw(t *tensor.Tensor, b []byte, n int) error {
	if t.Datatype == tensor.BYTES {
		for len(b) > 0 {
			if len(b) < 4 {
				return errors.New("raw BYTES: truncated length prefix")
			}
			l := binary.LittleEndian.Uint32(b)
			if uint64(l) > uint64(len(b)-4) {
				return errors.New("raw BYTES: element longer than the data")
			}
			t.Bytes = append(t.Bytes, b[4:4+l])
			b = b[4+l:]
			if len(t.Bytes) > n {
				break
			}
		}
		return nil // the element count is checked against the shape later
	}
	size := t.Datatype.Size()
	if size == 0 {
		return fmt.Errorf("datatype %s is not supported", t.Datatype)
	}
	if len(b) != n*size {
		return fmt.Errorf("raw contents hold %d bytes, shape %s of %s needs %d", len(b), tensor.FormatShape(t.Shape), t.Datatype, n*size)
	}
	le := binary.LittleEndian
	switch t.Datatype {
	case tensor.FP32:
		t.F32 = make([]float32, n)
		for i := range t.F32 {
			t.F32[i] = math.Float32frombits(le.Uint32(b[i*4:]))
		}
	case tensor.FP64:
		t.F64 = make([]float64, n)
		for i := range t.F64 {
			t.F64[i] = math.Float64frombits(le.Uint64(b[i*8:]))
		}
	case tensor.FP16:
		// The OIP gRPC spec (kserve/open-inference-protocol,
		// specification/protocol/open_inference_grpc.proto, raw_input_contents): FP16
		// "must be represented as raw content as there is no specific data type for a
		// 16-bit float type"; raw data is flattened row-major, little-endian here as for
		// every other datatype. The bits are kept as they are (NaN payloads included).
		t.F16 = make([]uint16, n)
		for i := range t.F16 {
			t.F16[i] = le.Uint16(b[i*2:])
		}
	case tensor.UINT64:
		t.U64 = make([]uint64, n)
		for i := range t.U64 {
			t.U64[i] = le.Uint64(b[i*8:])
		}
	case tensor.BOOL:
		t.Bool = make([]bool, n)
		for i := range t.Bool {
			t.Bool[i] = b[i] != 0
		}
	default:
		t.I64 = make([]int64, n)
		for i := range t.I64 {
			switch t.Datatype {
			case tensor.INT8:
				t.I64[i] = int64(int8(b[i]))
			case tensor.UINT8:
				t.I64[i] = int64(b[i])
			case tensor.INT16:
				t.I64[i] = int64(int16(le.Uint16(b[i*2:])))
			case tensor.UINT16:
				t.I64[i] = int64(le.Uint16(b[i*2:]))
			case tensor.INT32:
				t.I64[i] = int64(int32(le.Uint32(b[i*4:])))
			case tensor.UINT32:
				t.I64[i] = int64(le.Uint32(b[i*4:]))
			case tensor.INT64:
				t.I64[i] = int64(le.Uint64(b[i*8:]))
			}
		}
	}
	return nil
}

func toContents(o *tensor.Tensor) *oip.InferTensorContents {
	c := &oip.InferTensorContents{}
	switch o.Datatype {
	case tensor.FP32:
		c.Fp32Contents = o.F32
	case tensor.FP64:
		c.Fp64Contents = o.F64
	case tensor.INT64:
		c.Int64Contents = o.I64
	case tensor.UINT64:
		c.Uint64Contents = o.U64
	case tensor.BOOL:
		c.BoolContents = o.Bool
	case tensor.BYTES:
		c.BytesContents = o.Bytes
	case tensor.INT8, tensor.INT16, tensor.INT32:
		c.IntContents = make([]int32, len(o.I64))
		for i, x := range o.I64 {
			c.IntContents[i] = int32(x)
		}
	case tensor.UINT8, tensor.UINT16, tensor.UINT32:
		c.UintContents = make([]uint32, len(o.I64))
		for i, x := range o.I64 {
			c.UintContents[i] = uint32(x)
		}
	}
	return c
}

func toRaw(o *tensor.Tensor) []byte {
	le := binary.LittleEndian
	switch o.Datatype {
	case tensor.FP32:
		b := make([]byte, 0, 4*len(o.F32))
		for _, x := range o.F32 {
			b = le.AppendUint32(b, math.Float32bits(x))
		}
		return b
	case tensor.FP64:
		b := make([]byte, 0, 8*len(o.F64))
		for _, x := range o.F64 {
			b = le.AppendUint64(b, math.Float64bits(x))
		}
		return b
	case tensor.FP16:
		b := make([]byte, 0, 2*len(o.F16))
		for _, x := range o.F16 {
			b = le.AppendUint16(b, x)
		}
		return b
	case tensor.UINT64:
		b := make([]byte, 0, 8*len(o.U64))
		for _, x := range o.U64 {
			b = le.AppendUint64(b, x)
		}
		return b
	case tensor.BOOL:
		b := make([]byte, len(o.Bool))
		for i, x := range o.Bool {
			if x {
				b[i] = 1
			}
		}
		return b
	case tensor.BYTES:
		var b []byte
		for _, x := range o.Bytes {
			b = le.AppendUint32(b, uint32(len(x)))
			b = append(b, x...)
		}
		return b
	}
	size := o.Datatype.Size()
	b := make([]byte, 0, size*len(o.I64))
	for _, x := range o.I64 {
		switch size {
		case 1:
			b = append(b, byte(x))
		case 2:
			b = le.AppendUint16(b, uint16(x))
		case 4:
			b = le.AppendUint32(b, uint32(x))
		default:
			b = le.AppendUint64(b, uint64(x))
		}
	}
	return b
}
