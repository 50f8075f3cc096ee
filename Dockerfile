# syntax=docker/dockerfile:1
#
# edgenode's images. Two final targets:
#
#   docker build --target cpu -t edgenode:cpu .        # the default deployment (also fly.toml)
#   docker build --target cuda -t edgenode:cuda \
#       --build-arg CUDA_COMPUTE_CAP=90 [--build-arg FLASH_ATTN=1] .
#
# Models are not in the image. They live on a volume mounted at /data/models; at first start
# `edgenode serve` fetches the missing ones with pip and verifies every file against the
# sha256 digests of the manifest built into the binary (models/manifest.toml at build time)
# before it loads them. A later start finds them there, verifies them again and loads them.
#
#   docker run --stop-timeout 45 -p 8080:8080 -v edgenode-models:/data/models edgenode:cpu
#   docker run --gpus all --stop-timeout 45 -p 8080:8080 -v edgenode-models:/data/models edgenode:cuda
#
# (--stop-timeout: on SIGTERM edgenode drains for up to 30 s; docker kills after 10 s by default.)
#
# Dependencies are cached with cargo-chef: the `cook` layers depend only on Cargo.toml,
# Cargo.lock and .cargo/config.toml, so an edit under src/ rebuilds edgenode alone.

ARG RUST_VERSION=1.95.0
ARG CARGO_CHEF_VERSION=0.1.78
ARG DEBIAN_RELEASE=bookworm
ARG CUDA_VERSION=13.0.1
ARG CUDA_UBUNTU=ubuntu24.04

# ---------------------------------------------------------------------------------------------
# Rust and cargo-chef.
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS chef
ARG CARGO_CHEF_VERSION
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}"
WORKDIR /src

# The dependency recipe: a function of the manifests only.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# ---------------------------------------------------------------------------------------------
# CPU build.
FROM chef AS build-cpu
ARG BUILD_GIT_SHA=""
# g++: esaxx-rs (under the tokenizers mistral.rs uses) compiles C++; the image has only gcc.
# DL3008 (pin apt versions) is ignored on purpose: Debian's stable release pins them, and it
# drops superseded versions from its archive, so pins would break the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
# The rustflags (target-cpu=x86-64-v3) must be in place before cooking, or every
# dependency is built twice.
COPY .cargo .cargo
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
RUN BUILD_GIT_SHA="${BUILD_GIT_SHA}" cargo build --release --locked --bin edgenode \
    && install -m 0755 target/release/edgenode /usr/local/bin/edgenode

# ---------------------------------------------------------------------------------------------
# CUDA build: nvcc from NVIDIA's devel image, Rust copied from the chef stage.
FROM nvidia/cuda:${CUDA_VERSION}-devel-${CUDA_UBUNTU} AS build-cuda
# There is no GPU during `docker build`, so nothing can ask one for its compute capability:
# 90 is H100/H200, 89 L40S, 80 A100. candle and mistral.rs compile their kernels for it.
ARG CUDA_COMPUTE_CAP=90
# 1 adds FlashAttention-2 (cargo feature `flash-attn`: a much longer build).
ARG FLASH_ATTN=0
ARG BUILD_GIT_SHA=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# DL3008 (pin apt versions) is ignored on purpose: the base image's Ubuntu release pins
# them, and Ubuntu drops superseded versions from its archive, so pins would break the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gcc g++ \
    && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:$PATH \
    CUDA_ROOT=/usr/local/cuda \
    CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
COPY --from=chef /usr/local/rustup /usr/local/rustup
COPY --from=chef /usr/local/cargo /usr/local/cargo
WORKDIR /src
COPY .cargo .cargo
COPY --from=planner /src/recipe.json recipe.json
# The link step finds libcuda.so in /usr/local/cuda/lib64/stubs (the driver's real one is
# mounted into the container at run time by the NVIDIA container toolkit).
RUN features=cuda; if [ "${FLASH_ATTN}" = 1 ]; then features=flash-attn; fi \
    && cargo chef cook --release --locked --features "${features}" --recipe-path recipe.json
COPY . .
RUN features=cuda; if [ "${FLASH_ATTN}" = 1 ]; then features=flash-attn; fi \
    && BUILD_GIT_SHA="${BUILD_GIT_SHA}" cargo build --release --locked --features "${features}" --bin edgenode \
    && install -m 0755 target/release/edgenode /usr/local/bin/edgenode

# ---------------------------------------------------------------------------------------------
# CUDA runtime: the CUDA libraries the binary links (cudart, cuBLAS, cuRAND, NVRTC) at the
# version it was built with; libcuda comes from the host's driver.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${CUDA_UBUNTU} AS cuda
# python3 and pip: `serve` fetches missing models with `python3 -m pip download`.
# DL3008 ignored as in build-cuda: the base image's Ubuntu release pins the versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-pip \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/edgenode --shell /usr/sbin/nologin edgenode \
    && mkdir -p /data/models \
    && chown edgenode:edgenode /data/models
COPY --from=build-cuda /usr/local/bin/edgenode /usr/local/bin/edgenode
COPY scripts/docker-entrypoint.sh /usr/local/bin/docker-entrypoint
# The shipped config (the built-in defaults, commented), where an operator can mount another.
COPY edgenode.toml /etc/edgenode/edgenode.toml
# The card's models (TinyLlama and bge-small from the Hugging Face Hub): fly.card.toml points
# EDGENODE_CONFIG at this config, which reads the manifest beside it.
COPY deploy/card/ /etc/edgenode/card/
# Only the keys edgenode knows: an unknown EDGENODE_* variable stops start-up. `cuda` (not
# `auto`) so that a container started without a GPU fails at once instead of quietly
# serving from the CPU.
ENV EDGENODE_CONFIG=/etc/edgenode/edgenode.toml \
    EDGENODE_STORE__DIR=/data/models \
    EDGENODE_LOG__FORMAT=json \
    EDGENODE_RUNTIME__DEVICE=cuda
WORKDIR /home/edgenode
VOLUME ["/data/models"]
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4)"]
# No USER: the entrypoint starts as root only to hand a root-owned volume to the `edgenode`
# user (uid 10001), then drops to it with setpriv; the daemon itself never runs as root.
# `docker run --user 10001:10001` skips that step.
ENTRYPOINT ["/usr/local/bin/docker-entrypoint"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
# CPU runtime: the default deployment (last, so a plain `docker build .` builds it).
FROM debian:${DEBIAN_RELEASE}-slim AS cpu
# python3 and pip: `serve` fetches missing models with `python3 -m pip download`.
# DL3008 (pin apt versions) is ignored on purpose: Debian's stable release pins them, and
# it drops superseded versions from its archive after each security update, which would
# break a pinned build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-pip \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/edgenode --shell /usr/sbin/nologin edgenode \
    && mkdir -p /data/models \
    && chown edgenode:edgenode /data/models
COPY --from=build-cpu /usr/local/bin/edgenode /usr/local/bin/edgenode
COPY scripts/docker-entrypoint.sh /usr/local/bin/docker-entrypoint
# The shipped config (the built-in defaults, commented), where an operator can mount another.
COPY edgenode.toml /etc/edgenode/edgenode.toml
# The card's models (TinyLlama and bge-small from the Hugging Face Hub): fly.card.toml points
# EDGENODE_CONFIG at this config, which reads the manifest beside it.
COPY deploy/card/ /etc/edgenode/card/
# Only the keys edgenode knows: an unknown EDGENODE_* variable stops start-up.
ENV EDGENODE_CONFIG=/etc/edgenode/edgenode.toml \
    EDGENODE_STORE__DIR=/data/models \
    EDGENODE_LOG__FORMAT=json \
    EDGENODE_RUNTIME__DEVICE=cpu
WORKDIR /home/edgenode
VOLUME ["/data/models"]
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4)"]
# No USER: see the cuda target above (root only to chown the volume, then setpriv).
ENTRYPOINT ["/usr/local/bin/docker-entrypoint"]
CMD ["serve"]
