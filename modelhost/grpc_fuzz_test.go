package modelhost

import (
	"context"
	"encoding/binary"
	"math"
	"path/filepath"
	"testing"

	"github.com/rs/zerolog"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/patchbay-io/patchbay/api/oip"
)

// FuzzModelInfer feeds arbitrary ModelInferRequest bytes (typed and raw contents,
// shapes, datatypes) through the gRPC infer path against the example models: it must
// never panic, and every failure is InvalidArgument, NotFound or Unavailable.
func FuzzModelInfer(f *testing.F) {
	raw := make([]byte, 0, 32)
	for i := range 8 {
		raw = binary.LittleEndian.AppendUint32(raw, math.Float32bits(float32(i)))
	}
	seeds := []*oip.ModelInferRequest{
		{ModelName: "ranker", Inputs: []*oip.ModelInferRequest_InferInputTensor{{Name: "features", Datatype: "FP32", Shape: []int64{1, 8},
			Contents: &oip.InferTensorContents{Fp32Contents: make([]float32, 8)}}}},
		{ModelName: "ranker", Inputs: []*oip.ModelInferRequest_InferInputTensor{{Name: "features", Datatype: "FP32", Shape: []int64{1, 8}}},
			RawInputContents: [][]byte{raw}},
		{ModelName: "recs", Inputs: []*oip.ModelInferRequest_InferInputTensor{{Name: "user_id", Datatype: "INT64", Shape: []int64{2},
			Contents: &oip.InferTensorContents{Int64Contents: []int64{1, 99}}}}, Outputs: []*oip.ModelInferRequest_InferRequestedOutputTensor{{Name: "scores"}}},
		{ModelName: "recs", Inputs: []*oip.ModelInferRequest_InferInputTensor{{Name: "user_id", Datatype: "BYTES", Shape: []int64{1}}},
			RawInputContents: [][]byte{{3, 0, 0, 0, 'a', 'b', 'c'}}},
		// FP16: raw only (2 bytes an element); typed contents are refused.
		{ModelName: "ranker", Inputs: []*oip.ModelInferRequest_InferInputTensor{{Name: "features", Datatype: "FP16", Shape: []int64{1, 8}}},
			RawInputContents: [][]byte{raw[:16]}},
		{ModelName: "ranker", Inputs: []*oip.ModelInferRequest_InferInputTensor{{Name: "features", Datatype: "FP16", Shape: []int64{1, 8},
			Contents: &oip.InferTensorContents{Fp32Contents: make([]float32, 8)}}}},
	}
	for _, s := range seeds {
		b, err := proto.Marshal(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	s, err := New(Config{Repository: filepath.Join("..", "examples", "models"), Logger: zerolog.Nop(), MaxTensorElements: 4096})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(s.Close)
	g := &grpcService{s: s}
	f.Fuzz(func(t *testing.T, b []byte) {
		var req oip.ModelInferRequest
		if proto.Unmarshal(b, &req) != nil {
			return
		}
		_, err := g.ModelInfer(context.Background(), &req)
		if err == nil {
			return
		}
		switch c := grpcCode(err); c {
		case codes.InvalidArgument, codes.NotFound, codes.Unavailable:
		default:
			t.Fatalf("request %v: error code %v: %v", &req, c, err)
		}
	})
}

func grpcCode(err error) codes.Code {
	type coder interface{ GRPCStatus() *status.Status }
	if c, ok := err.(coder); ok {
		return c.GRPCStatus().Code()
	}
	return codes.Unknown
}
