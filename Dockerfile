# syntax=docker/dockerfile:1
# One image for every role: `tern proxy`, `tern init`, `tern inject`, `tern injector`.
#   docker build -t ghcr.io/tern-mesh/tern:0.1.0 .

# --- build ---------------------------------------------------------------------------------
# Pinned: benches/harness/tern.order (link-time function ordering, build.rs) names symbols with
# this rustc's hashes; another toolchain still builds, only without the idle-memory saving.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Reproducible: exactly the versions in Cargo.lock (--locked). The cache mounts keep the
# registry and target/ between builds without putting them in a layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tern \
    && cp target/release/tern /usr/local/bin/tern \
    && strip /usr/local/bin/tern

# --- runtime -------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="tern" \
      org.opencontainers.image.description="A sidecar micro-proxy for Kubernetes service meshes" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/tern-mesh/tern" \
      org.opencontainers.image.licenses="Apache-2.0"
# iptables (nft and legacy backends) for `tern init`; nothing else is added.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/tern /usr/local/bin/tern
# The proxy's UID: `tern init` exempts its traffic from redirection. The injected init
# container overrides it with runAsUser 0 and only NET_ADMIN/NET_RAW.
USER 2102:2102
EXPOSE 4140 4143 4191
ENTRYPOINT ["/usr/local/bin/tern"]
CMD ["proxy"]
