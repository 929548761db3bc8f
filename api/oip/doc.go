// Package oip holds the Open Inference Protocol (KServe v2) gRPC types and service
// stubs, generated from grpc_predict_v2.proto. Regenerate with:
//
//	PATH=$PATH:/root/go/bin protoc --go_out=. --go_opt=paths=source_relative \
//	  --go-grpc_out=. --go-grpc_opt=paths=source_relative grpc_predict_v2.proto
package oip

//go:generate protoc --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative grpc_predict_v2.proto
