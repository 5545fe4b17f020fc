#!/usr/bin/env bash
# Builds the seedkeeper image (default tag seedkeeper:dev, the one docker-compose.yml runs) with
# its OCI labels set: org.opencontainers.image.version from Cargo.toml (the version
# seedkeeper_build_info reports) and org.opencontainers.image.revision from `git rev-parse HEAD`.
# Prints the wall time and the image size.
#
#   scripts/image-build.sh [TAG]
#
# The base images must exist or be pullable (scripts/docker-setup.sh, scripts/base-images.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-seedkeeper:dev}"
version="$(sed -nE '/^\[package\]/,/^\[/ s/^version[[:space:]]*=[[:space:]]*"([^"]+)".*/\1/p' Cargo.toml | head -n1)"
[[ -n "$version" ]] || { echo "image-build: no [package] version in Cargo.toml" >&2; exit 1; }
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    echo "image-build: the work tree has uncommitted changes; the revision label names HEAD ($revision)" >&2
fi
t0=$SECONDS
docker build --build-arg VERSION="$version" --build-arg REVISION="$revision" -t "$tag" . >&2
size="$(docker image inspect --format '{{.Size}}' "$tag")"
echo "image-build: $tag built in $((SECONDS - t0)) s: version $version, revision $revision, $((size / 1000000)) MB ($size bytes)" >&2
