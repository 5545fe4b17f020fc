# seedkeeper container image: build with the Rust toolchain, run on a small Debian base as a
# non-root user. The reference seed and the dev realm are inside (the binary embeds both too).
#   docker build -t seedkeeper .
#   docker run --rm seedkeeper --help

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches tests/it \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/sync.rs && echo 'fn main() {}' > tests/soak.rs \
    && touch tests/it/main.rs \
    && cargo build --release --locked --bin seedkeeper \
    && rm -rf src benches tests
COPY src ./src
COPY migrations ./migrations
COPY config ./config
COPY realms ./realms
COPY benches ./benches
COPY tests ./tests
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin seedkeeper

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin seedkeeper
COPY --from=build /src/target/release/seedkeeper /usr/local/bin/seedkeeper
COPY config/reference-seed.toml config/seedkeeper.example.toml /usr/share/seedkeeper/
COPY realms/ /usr/share/seedkeeper/realms/
USER 10001:10001
# In a container the HTTP endpoints must listen beyond loopback.
ENV SEEDKEEPER_HTTP__LISTEN=0.0.0.0:8787 \
    SEEDKEEPER_LOG__FORMAT=json
EXPOSE 8787
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["seedkeeper", "healthcheck"]
ENTRYPOINT ["seedkeeper"]
CMD ["run"]
