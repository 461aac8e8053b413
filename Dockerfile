# cropfleet: one small image with the three binaries, cropfleet-worker (the default command),
# cropfleet-producer and cropfleet-aggregator.
#   docker build -t cropfleet:dev .
#   docker run --rm cropfleet:dev cropfleet-producer --help
# Every flag is also an environment variable CROPFLEET_<FLAG>; see docker-compose.yml and k8s/.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---- build: a Rust toolchain plus what libjpeg-turbo's source build needs --------------------
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# turbojpeg-sys builds libjpeg-turbo from source with cmake; nasm gives it SIMD, and the
# `require-simd` feature fails the build without it.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake nasm make g++ \
 && rm -rf /var/lib/apt/lists/*
# Keep symbol names for backtraces, drop the line tables the release profile adds.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo \
    CARGO_TERM_COLOR=never
WORKDIR /src

# Dependency layer: only the manifests and stub sources, so everything below is rebuilt only
# when Cargo.toml or Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY shared/Cargo.toml shared/
COPY worker/Cargo.toml worker/
COPY producer/Cargo.toml producer/
COPY aggregator/Cargo.toml aggregator/
# Every [[bench]] a manifest declares needs a file for cargo to read the manifest at all.
RUN mkdir -p shared/src worker/src producer/src aggregator/src \
 && touch shared/src/lib.rs \
 && for crate in worker producer aggregator; do echo 'fn main() {}' > "$crate/src/main.rs"; done \
 && for crate in shared worker producer aggregator; do \
      awk '/^\[\[bench\]\]/ {b = 1; next} /^\[/ {b = 0} b && /^name *=/ {gsub(/^name *= *"|".*$/, ""); print}' \
        "$crate/Cargo.toml" | while read -r bench; do \
          mkdir -p "$crate/benches" && echo 'fn main() {}' > "$crate/benches/$bench.rs"; \
        done; \
    done \
 && cargo build --release --locked --bins \
 && rm -rf shared/src worker/src producer/src aggregator/src ./*/benches

# The commit the image is built from, for the provenance of run records (no .git in the build
# context): `--build-arg CROPFLEET_GIT_COMMIT=$(git rev-parse HEAD)`; docker-compose.yml passes
# it from the environment. Declared after the dependency layer so it never invalidates it.
ARG CROPFLEET_GIT_COMMIT=unknown
# The sources; touched so cargo never mistakes them for the stubs built above.
COPY shared/ shared/
COPY worker/ worker/
COPY producer/ producer/
COPY aggregator/ aggregator/
RUN find shared worker producer aggregator -name '*.rs' -exec touch {} + \
 && cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/cropfleet-worker target/release/cropfleet-producer target/release/cropfleet-aggregator /out/

# ---- runtime: glibc, CA certificates and the binaries; no compiler, no build tools -----------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 cropfleet \
 && useradd --system --uid 10001 --gid cropfleet --home-dir /home/cropfleet --create-home \
      --shell /usr/sbin/nologin cropfleet \
 && mkdir -p /data \
 && chown cropfleet:cropfleet /data
COPY --from=build /out/ /usr/local/bin/
LABEL org.opencontainers.image.title="cropfleet" \
      org.opencontainers.image.description="cropfleet worker, producer and aggregator" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 10001:10001
WORKDIR /home/cropfleet
# The worker's health and metrics listener: /healthz, /readyz, /metrics.
EXPOSE 9090
# The worker drains in-flight tasks on SIGTERM (--shutdown-timeout, 25 s by default).
STOPSIGNAL SIGTERM
CMD ["cropfleet-worker"]
