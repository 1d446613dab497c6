# syntax=docker/dockerfile:1
#
# The podroute image: one static binary, nothing else.
#
#   docker build -t podroute:0.1.0 .
#
# Stage 1 builds a fully static x86_64 binary against musl from Cargo.lock; stage 2 is an
# empty image holding only that binary. The agent needs no shell, no libc and no CA bundle
# (in a cluster the API server's CA comes with the service account token). It runs as root
# (uid 0, the only user of an empty image): the DaemonSet drops every capability except
# NET_ADMIN, NET_RAW and NET_BIND_SERVICE.

FROM rust:1.95-bookworm AS build
# musl-gcc compiles the crates' C and assembly parts for the musl target.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
RUN rustup target add x86_64-unknown-linux-musl
ENV CC_x86_64_unknown_linux_musl=musl-gcc
WORKDIR /src
COPY . .
# The registry and target directories are BuildKit cache mounts (kept between builds, not in
# the image), so the binary is copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-musl --bin podroute \
 && cp target/x86_64-unknown-linux-musl/release/podroute /podroute

FROM scratch
COPY --from=build /podroute /podroute
ENTRYPOINT ["/podroute"]
CMD ["agent"]
