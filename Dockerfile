# syntax=docker/dockerfile:1
# patchbay: one binary (xds, extproc, modelhost, up, rollout), non-root.
#   docker build -t patchbay .                      cgo build + ONNX Runtime (runtime: onnx), distroless/cc
#   docker build --target static -t patchbay:static .   static CGO_ENABLED=0 build, distroless/static:
#                                                   every runtime but onnx (which refuses its models saying so)
#   docker run --rm patchbay help
ARG GO_VERSION=1.26

# ONNX Runtime 1.24.1 (the version github.com/yalue/onnxruntime_go v1.27.0 is made for)
# from npm's onnxruntime-node, fetched with `npm pack` (no install scripts run) and
# sha256-checked by the same script `make onnxruntime` runs.
FROM node:22-bookworm-slim AS onnxruntime
WORKDIR /src
COPY scripts/onnxruntime.sh scripts/
RUN scripts/onnxruntime.sh /out

# bookworm, to match distroless' Debian 12 glibc for the cgo binary.
FROM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
# Dependencies first: this layer stays cached while only the code changes.
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
ARG TARGETOS=linux
ARG TARGETARCH
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=${TARGETOS} GOARCH=${TARGETARCH} \
    go build -trimpath -ldflags="-s -w" -o /out/static/patchbay ./cmd/patchbay
# The cgo build (runtime: onnx); native only: cross-building it needs a cross C compiler.
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=1 go build -trimpath -ldflags="-s -w" -o /out/cgo/patchbay ./cmd/patchbay
# The example model repository and rollouts, for the Helm chart's defaults and compose.yaml.
RUN mkdir -p /out/examples && cp -r examples/models examples/rollouts /out/examples/
# The control plane's state directory (--state-file), owned by the non-root user so a named
# volume mounted there (compose.yaml) starts writable.
RUN mkdir -p /out/state

FROM gcr.io/distroless/static-debian12:nonroot AS static
COPY --from=build /out/static/patchbay /usr/local/bin/patchbay
COPY --from=build /out/examples /usr/share/patchbay/examples
COPY --from=build --chown=65532:65532 /out/state /var/lib/patchbay
USER 65532:65532
EXPOSE 18000 18001 18080 18081 8000 8001
ENTRYPOINT ["/usr/local/bin/patchbay"]
CMD ["help"]

# The default image: the cgo binary, with libc and libstdc++ (distroless/cc) for it and
# ONNX Runtime, which modelhost finds through PATCHBAY_ONNXRUNTIME_LIB.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/cgo/patchbay /usr/local/bin/patchbay
COPY --from=onnxruntime /out/lib/libonnxruntime.so.1.24.1 /usr/lib/patchbay/libonnxruntime.so.1.24.1
ENV PATCHBAY_ONNXRUNTIME_LIB=/usr/lib/patchbay/libonnxruntime.so.1.24.1
COPY --from=build /out/examples /usr/share/patchbay/examples
COPY --from=build --chown=65532:65532 /out/state /var/lib/patchbay
# 65532:65532 is distroless' "nonroot"; the Helm chart runs it with a read-only root FS.
USER 65532:65532
EXPOSE 18000 18001 18080 18081 8000 8001
ENTRYPOINT ["/usr/local/bin/patchbay"]
CMD ["help"]
