# seedkeeper container image: build with the Rust toolchain, run from an empty (scratch) image
# that holds the binary, the C libraries it links and nothing else, as a non-root numeric user.
# The reference seed and the dev realm are inside (the binary embeds both too).
#   scripts/image-build.sh                   # tags seedkeeper:dev, sets the version/revision labels
#   docker build -t seedkeeper .             # the same without the labels' values
#   docker run --rm seedkeeper --help
# Needs no BuildKit feature (CI builds it with Docker 20.10's classic builder). The base image
# names are read by scripts/base-images.sh (local stand-ins where no registry is reachable):
# keep them literal, no ARG in FROM.

# --- planner: the manifest's target files ------------------------------------------------------
# The dependency layer below needs every target the manifest names (cargo refuses a manifest whose
# bench or test file is missing). `cargo metadata` lists them, so a new bench, test or binary
# never breaks that step. This stage sees the whole context and reruns on any edit, in well under
# a second; its output, /targets, changes only when the set of targets does, and the build stage
# copies only that file, so its dependency layer stays cached.
FROM rust:1.95-bookworm AS planner
WORKDIR /src
COPY . .
RUN cargo metadata --no-deps --format-version 1 --offline >/tmp/metadata.json \
    && grep -o '"src_path":"[^"]*"' /tmp/metadata.json \
        | sed -e 's/^"src_path":"//' -e 's/"$//' -e 's|^/src/||' | sort -u >/targets \
    && ! grep -v '^[A-Za-z0-9_./-]*$' /targets \
    && ! grep '^/' /targets \
    && test -s /targets

# --- build: dependencies once, then seedkeeper -------------------------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY --from=planner /targets /targets
# Every target a stub (a crate root with an empty main compiles as lib, bin, test or bench), then
# the locked dependency graph; only the binary is built, so the stubs of tests and benches stay.
RUN while IFS= read -r f; do mkdir -p "$(dirname "$f")" && echo '#![allow(dead_code)] fn main() {}' >"$f"; done </targets \
    && cargo build --profile dist --locked --bin seedkeeper \
    && rm -rf src
# The binary embeds the migrations, the reference seed and the dev realm at compile time.
COPY src ./src
COPY migrations ./migrations
COPY config ./config
COPY realms ./realms
# COPY keeps the files' own mtimes, which can be older than the stub build: touch the crate
# roots so cargo rebuilds seedkeeper itself (the dependencies stay cached). The revision is
# compiled in (seedkeeper_build_info's `revision`), the same value as the image's label.
ARG REVISION=unknown
RUN touch src/main.rs src/lib.rs \
    && SEEDKEEPER_REVISION="$REVISION" cargo build --profile dist --locked --bin seedkeeper

# --- rootfs: what the runtime image holds ------------------------------------------------------
# The binary, the glibc pieces `ldd` names (libc, libm, libgcc_s, the loader), a passwd entry for
# the numeric user, /tmp. No shell, no package manager, no CA bundle: seedkeeper trusts the
# Mozilla roots built into it (webpki-roots); a private CA is a file (keycloak.ca_file,
# sslrootcert in the database URL).
FROM debian:bookworm-slim AS rootfs
COPY --from=build /src/target/dist/seedkeeper /rootfs/usr/local/bin/seedkeeper
RUN set -e \
    && for lib in $(ldd /rootfs/usr/local/bin/seedkeeper | grep -o '/[^ ]*'); do cp -L --parents "$lib" /rootfs; done \
    && mkdir -p /rootfs/etc /rootfs/tmp && chmod 1777 /rootfs/tmp \
    && echo 'seedkeeper:x:10001:10001:seedkeeper:/nonexistent:/usr/sbin/nologin' >/rootfs/etc/passwd \
    && echo 'seedkeeper:x:10001:' >/rootfs/etc/group \
    && echo 'hosts: files dns' >/rootfs/etc/nsswitch.conf \
    && chroot /rootfs /usr/local/bin/seedkeeper --version

# --- runtime -----------------------------------------------------------------------------------
FROM scratch AS runtime
COPY --from=rootfs /rootfs/ /
COPY config/reference-seed.toml config/seedkeeper.example.toml /usr/share/seedkeeper/
COPY realms/ /usr/share/seedkeeper/realms/
# Set by scripts/image-build.sh from Cargo.toml's version (the one seedkeeper_build_info reports;
# scripts/image-test.sh checks they agree) and `git rev-parse HEAD`.
ARG VERSION=unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.title="seedkeeper" \
      org.opencontainers.image.description="Keycloak-aware identity bootstrap daemon" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$REVISION"
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# Secure by default: production refuses the embedded dev realm, keycloak.tls_verify = false and
# plaintext to a remote database. The compose stack says `development` itself.
# In a container the HTTP endpoints must listen beyond loopback.
ENV SEEDKEEPER_ENVIRONMENT=production \
    SEEDKEEPER_HTTP__LISTEN=0.0.0.0:8787 \
    SEEDKEEPER_LOG__FORMAT=json
EXPOSE 8787
# Liveness: probes /healthz on the listen address above (0.0.0.0 is probed as 127.0.0.1; no curl
# needed): the daemon serves and its scheduler ticks. A PostgreSQL or Keycloak outage does not
# make the container unhealthy (a restart cannot fix it); readiness is /readyz.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["seedkeeper", "healthcheck"]
ENTRYPOINT ["seedkeeper"]
CMD ["run"]
