# syntax=docker/dockerfile:1
# patchbay: one static binary (xds, extproc, modelhost, up, rollout) on distroless, non-root.
#   docker build -t patchbay .
#   docker run --rm patchbay help
ARG GO_VERSION=1.26

FROM golang:${GO_VERSION} AS build
WORKDIR /src
# Dependencies first: this layer stays cached while only the code changes.
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
ARG TARGETOS=linux
ARG TARGETARCH
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=${TARGETOS} GOARCH=${TARGETARCH} \
    go build -trimpath -ldflags="-s -w" -o /out/patchbay ./cmd/patchbay
# The example model repository and rollouts, for the Helm chart's defaults and compose.yaml.
RUN mkdir -p /out/examples && cp -r examples/models examples/rollouts /out/examples/
# The control plane's state directory (--state-file), owned by the non-root user so a named
# volume mounted there (compose.yaml) starts writable.
RUN mkdir -p /out/state

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/patchbay /usr/local/bin/patchbay
COPY --from=build /out/examples /usr/share/patchbay/examples
COPY --from=build --chown=65532:65532 /out/state /var/lib/patchbay
# 65532:65532 is distroless' "nonroot"; the Helm chart runs it with a read-only root FS.
USER 65532:65532
EXPOSE 18000 18001 18080 18081 8000 8001
ENTRYPOINT ["/usr/local/bin/patchbay"]
CMD ["help"]
