# patchbay — `make help` lists the targets.
SHELL := bash
GO    ?= go
PKGS  ?= ./...
# controller-gen's CRD options; api/k8s/v1's generation test runs the same (keep them equal).
# Floats are allowed: the file format's percentages are decimals (0.25).
CRD_OPTIONS := crd:allowDangerousTypes=true

.PHONY: help up build pgo test test-short vet fmt-check test-deps onnxruntime fixtures-onnx bench bench-deps soak fuzz test-k8s generate generate-k8s generate-proto tools fixtures e2e-envoy clean

help: ## this list
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

up: ## run everything on this machine from examples/; Envoy from ENVOY_BIN, else envoy on PATH, else a func-e download
	$(GO) tool patchbay up

build: ## build bin/patchbay (static)
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/patchbay ./cmd/patchbay

pgo: ## regenerate cmd/patchbay/default.pgo (a CPU profile of patchbay extproc under the ext_proc benchmark's load; ~1 min): go build uses it for profile-guided optimisation
	test/bench/extproc/pgo.sh

test: fmt-check vet test-deps ## the whole suite: gofmt, go vet, go test -race of both modules (this one, then test/k8s's real API server tests; the model host's allocation bounds once more without -race, where they are meaningful) with one summary (what CI runs); ends listing every skipped test and why
	set -o pipefail; { $(GO) test -race -count=1 -timeout 15m -json $(PKGS); r=$$?; \
	  $(GO) test -count=1 -timeout 5m -json -run 'AllocsBounded$$' ./modelhost/...; r=$$(( r | $$? )); \
	  (cd test/k8s && $(GO) test -race -count=1 -timeout 10m -json ./...); exit $$(( r | $$? )); } | $(GO) run ./test/testreport

test-k8s: ## only test/k8s (its own module): the Kubernetes source and store against a real kube-apiserver in process
	set -o pipefail; (cd test/k8s && $(GO) test -race -count=1 -timeout 10m -json ./...) | $(GO) run ./test/testreport

test-short: ## go test without -race, for a quick loop
	$(GO) test -count=1 $(PKGS)

vet: ## go vet (both modules)
	$(GO) vet $(PKGS)
	cd test/k8s && $(GO) vet ./...

fmt-check: ## fail if gofmt would change a file
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

bench: bench-deps ## run the benchmark suites the report lists (each with a same-run baseline; large sizes with PATCHBAY_BENCH_LARGE=1) and write docs/bench/report.md, figures.png and scale.png
	$(GO) run ./test/bench/report -out docs/bench

soak: ## a bounded soak of the chain (control plane, ext_proc, model host, the test model of Envoy): steady load, a rollout edit every 3 s, every process's RSS, threads and fds sampled; 10 min (PATCHBAY_SOAK_DURATION=2m to shorten); not in CI
	PATCHBAY_SOAK=1 $(GO) test -count=1 -v -run '^TestSoak$$' -timeout 60m ./test/bench/soak/

test-deps: onnxruntime ## install Debian's prometheus (the real server the Prometheus provider's test, xds/analysis, scrapes) and redis-server (the model host's feature store tests) (needs root; skipped when present; without them those tests skip saying why)
	@command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt="apt-get -o DPkg::Lock::Timeout=120 install -y --no-install-recommends prometheus"; \
	    DEBIAN_FRONTEND=noninteractive $$apt || { apt-get update && DEBIAN_FRONTEND=noninteractive $$apt; } || \
	      echo "test-deps: could not install prometheus (the Prometheus provider test will skip)"; \
	  else echo "test-deps: prometheus missing; as root: apt-get install prometheus (the Prometheus provider test will skip)"; fi; }
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt="apt-get -o DPkg::Lock::Timeout=120 install -y --no-install-recommends redis-server"; \
	    DEBIAN_FRONTEND=noninteractive $$apt || { apt-get update && DEBIAN_FRONTEND=noninteractive $$apt; } || \
	      echo "test-deps: could not install redis-server (the model host's feature store tests will skip)"; \
	  else echo "test-deps: redis-server missing; as root: apt-get install redis-server (the model host's feature store tests will skip)"; fi; }

onnxruntime: ## fetch ONNX Runtime 1.24.1 (npm's onnxruntime-node, sha256-checked) into .cache/onnxruntime/lib for the onnx runtime; as root also Debian's python3-onnx and libonnx-testdata (fixtures, backend test data)
	@[ -f .cache/onnxruntime/lib/libonnxruntime.so.1.24.1 ] || command -v npm >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt="apt-get -o DPkg::Lock::Timeout=120 install -y --no-install-recommends npm"; \
	    DEBIAN_FRONTEND=noninteractive $$apt || { apt-get update && DEBIAN_FRONTEND=noninteractive $$apt; } || \
	      echo "onnxruntime: could not install npm (needed to fetch onnxruntime-node)"; \
	  else echo "onnxruntime: npm missing; as root: apt-get install npm"; fi; }
	@scripts/onnxruntime.sh || echo "onnxruntime: not installed (the onnx runtime's tests will skip saying why)"
	@{ [ -d /usr/share/libonnx-testdata ] && /usr/bin/python3 -c 'import onnx' 2>/dev/null; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt="apt-get -o DPkg::Lock::Timeout=120 install -y --no-install-recommends python3-onnx libonnx-testdata"; \
	    DEBIAN_FRONTEND=noninteractive $$apt || { apt-get update && DEBIAN_FRONTEND=noninteractive $$apt; } || \
	      echo "onnxruntime: could not install python3-onnx libonnx-testdata (the ONNX backend test will skip)"; \
	  else echo "onnxruntime: as root: apt-get install python3-onnx libonnx-testdata (the ONNX backend test will skip)"; fi; }

fixtures-onnx: onnxruntime bench-deps ## regenerate the ONNX fixtures, their numpy expectations and the ONNX/XGBoost example pair (python3-onnx, numpy, python3-xgboost)
	/usr/bin/python3 test/fixtures/onnx/gen.py

bench-deps: ## install Debian's python3-xgboost, the reference the XGBoost benchmark compares against (needs root; skipped when present)
	@/usr/bin/python3 -c 'import xgboost' 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y python3-xgboost || { apt-get update && apt-get install -y python3-xgboost; }); \
	  else echo "bench-deps: python3-xgboost missing; as root: apt-get install python3-xgboost (the XGBoost rows will say 'not measured')"; fi; }

fuzz: ## run each fuzz target for 30s
	$(GO) test -run '^$$' -fuzz 'FuzzParse$$' -fuzztime 30s ./xds/rollout/
	$(GO) test -run '^$$' -fuzz FuzzDecide -fuzztime 30s ./extproc/internal/assign/
	$(GO) test -run '^$$' -fuzz FuzzParsePath -fuzztime 30s ./extproc/internal/assign/
	$(GO) test -run '^$$' -fuzz FuzzIdentityFromBody -fuzztime 30s ./extproc/
	$(GO) test -run '^$$' -fuzz FuzzHandle -fuzztime 30s ./extproc/
	$(GO) test -run '^$$' -fuzz FuzzDecode -fuzztime 30s ./modelhost/internal/oipjson/
	$(GO) test -run '^$$' -fuzz FuzzModelInfer -fuzztime 30s ./modelhost/
	$(GO) test -run '^$$' -fuzz 'FuzzParse$$' -fuzztime 30s ./envoy/
	$(GO) test -run '^$$' -fuzz FuzzValidateAny -fuzztime 30s ./internal/envoyvalidate/
	$(GO) test -run '^$$' -fuzz FuzzParseHundredths -fuzztime 30s ./xds/rollout/
	$(GO) test -run '^$$' -fuzz FuzzParseSDS -fuzztime 30s ./envoy/
	$(GO) test -run '^$$' -fuzz FuzzParse -fuzztime 30s ./modelhost/internal/bearer/
	$(GO) test -run '^$$' -fuzz FuzzRender -fuzztime 30s ./xds/kube/
	$(GO) test -run '^$$' -fuzz FuzzParseFile -fuzztime 30s ./xds/store/
	$(GO) test -run '^$$' -fuzz FuzzServiceOf -fuzztime 30s ./xds/endpointslice/
	$(GO) test -run '^$$' -fuzz FuzzParseLimit -fuzztime 30s ./internal/runtimetune/
	$(GO) test -run '^$$' -fuzz FuzzCacheLoadsLikeAParse -fuzztime 30s ./xds/rollout/
	$(GO) test -run '^$$' -fuzz FuzzRecord -fuzztime 30s ./xds/shadow/
	$(GO) test -run '^$$' -fuzz FuzzCheckPrometheusQuery -fuzztime 30s ./xds/analysis/
	$(GO) test -run '^$$' -fuzz FuzzCheckContract -fuzztime 30s ./xds/rollout/
	$(GO) test -run '^$$' -fuzz FuzzParseOptions -fuzztime 30s ./modelhost/runtime/onnx/
	$(GO) test -run '^$$' -fuzz FuzzOptionalInputs -fuzztime 30s ./xds/
	$(GO) test -run '^$$' -fuzz FuzzParseFeatureFile -fuzztime 30s ./cmd/patchbay/
	$(GO) test -run '^$$' -fuzz FuzzParseContract -fuzztime 30s ./modelhost/
	$(GO) test -run '^$$' -fuzz FuzzParseBucket -fuzztime 30s ./modelhost/
	$(GO) test -run '^$$' -fuzz FuzzDecodeFP16 -fuzztime 30s ./modelhost/internal/oipjson/

fixtures: bench-deps ## regenerate the XGBoost fixtures and example models (with Debian's python3-xgboost)
	/usr/bin/python3 test/fixtures/xgboost/gen.py

generate: generate-k8s generate-proto ## regenerate everything generated: the Rollout CRD and deepcopy, then the protobuf code

generate-k8s: ## regenerate the Rollout CRD (charts/patchbay/crds) and api/k8s/v1's deepcopy from the Go types (controller-gen, a go tool)
	$(GO) tool controller-gen object paths=./api/k8s/v1/...
	$(GO) tool controller-gen $(CRD_OPTIONS) paths=./api/k8s/v1/... output:crd:stdout > charts/patchbay/crds/rollouts.patchbay.io.yaml

generate-proto: ## regenerate protobuf code in api/ (needs protoc, protoc-gen-go, protoc-gen-go-grpc)
	PATH="$$PATH:$$($(GO) env GOPATH)/bin" protoc --go_out=. --go_opt=paths=source_relative api/policy/v1/policy.proto
	PATH="$$PATH:$$($(GO) env GOPATH)/bin" protoc --go_out=. --go_opt=paths=source_relative \
	  --go-grpc_out=. --go-grpc_opt=paths=source_relative api/shadow/v1/shadow.proto
	cd api/oip && PATH="$$PATH:$$($(GO) env GOPATH)/bin" protoc --go_out=. --go_opt=paths=source_relative \
	  --go-grpc_out=. --go-grpc_opt=paths=source_relative grpc_predict_v2.proto

tools: ## install protoc (Debian) and the Go protoc plugins used by make generate
	apt-get install -y protobuf-compiler
	$(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
	$(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2

e2e-envoy: ## real-Envoy end-to-end tests (need envoy on PATH or ENVOY_BIN)
	$(GO) test -count=1 -v ./test/envoy/...

clean: ## remove build output
	rm -rf bin
