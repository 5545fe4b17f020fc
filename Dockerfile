# seedkeeper container image: build with the Rust toolchain, run on a small Debian base as a
# non-root user. The reference seed and the dev realm are inside (the binary embeds both too).
#   docker build -t seedkeeper .
#   docker run --rm seedkeeper --help

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them: build the locked dependency graph
# against stub targets. Cargo.toml names explicit bench and test targets, and cargo refuses a
# manifest whose target files are missing, so those get stubs too; they stay stubs (only the
# binary is built), which keeps edits under tests/ and benches/ from invalidating any layer.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches tests/it \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/sync.rs && echo 'fn main() {}' > tests/soak.rs \
    && touch tests/it/main.rs \
    && cargo build --release --locked --bin seedkeeper \
    && rm -rf src
# The binary embeds the migrations, the reference seed and the dev realm at compile time.
COPY src ./src
COPY migrations ./migrations
COPY config ./config
COPY realms ./realms
# COPY keeps the files' own mtimes, which can be older than the stub build: touch the crate
# roots so cargo rebuilds seedkeeper itself (the dependencies stay cached).
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin seedkeeper

FROM debian:bookworm-slim AS runtime
LABEL org.opencontainers.image.title="seedkeeper" \
      org.opencontainers.image.description="Keycloak-aware identity bootstrap daemon" \
      org.opencontainers.image.licenses="Apache-2.0"
# rustls needs no OpenSSL, only the CA bundle to verify Keycloak's certificate.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 seedkeeper \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin seedkeeper
COPY --from=build /src/target/release/seedkeeper /usr/local/bin/seedkeeper
COPY config/reference-seed.toml config/seedkeeper.example.toml /usr/share/seedkeeper/
COPY realms/ /usr/share/seedkeeper/realms/
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# In a container the HTTP endpoints must listen beyond loopback.
ENV SEEDKEEPER_HTTP__LISTEN=0.0.0.0:8787 \
    SEEDKEEPER_LOG__FORMAT=json
EXPOSE 8787
# Liveness: probes /healthz on the listen address above (0.0.0.0 is probed as 127.0.0.1; no curl
# needed): the daemon serves and its scheduler ticks. A PostgreSQL or Keycloak outage does not
# make the container unhealthy (a restart cannot fix it); readiness is /readyz.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["seedkeeper", "healthcheck"]
ENTRYPOINT ["seedkeeper"]
CMD ["run"]
