#!/usr/bin/env bash
# Checks that `scripts/keycloak.sh fetch` unpacks the zip `mvn dependency:copy` wrote, and not a
# path guessed under $HOME/.m2: it runs with HOME set to an empty folder, as under sudo, on a CI
# runner or in a container. Maven still uses the account's local repository there (Java's
# user.home comes from the account, not from HOME), so nothing is downloaded again when the
# artifact is cached, while a guess at $HOME/.m2 misses. A state folder of its own makes the
# unpack run from scratch. Prints one line; exit 1 on failure.
#
#   scripts/test-keycloak-fetch.sh        (KEYCLOAK_VERSION as for scripts/keycloak.sh)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/home"
fail() { echo "test-keycloak-fetch: FAILED: $*" >&2; exit 1; }

start=$SECONDS
kc_home="$(HOME="$tmp/home" KEYCLOAK_STATE="$tmp/state" bash "$root/scripts/keycloak.sh" fetch)" ||
    fail "scripts/keycloak.sh fetch with HOME=$tmp/home exited non-zero"
[[ "$kc_home" == "$tmp/state/keycloak-"* ]] || fail "it printed $kc_home, not a folder under $tmp/state"
[[ -x "$kc_home/bin/kc.sh" ]] || fail "no executable $kc_home/bin/kc.sh after the fetch"
leftover=$(compgen -G "$tmp/state/download*" || true)
[[ -z "$leftover" ]] || fail "the download folder $leftover was left behind"
# A second fetch finds the unpacked tree and does nothing.
again="$(HOME="$tmp/home" KEYCLOAK_STATE="$tmp/state" bash "$root/scripts/keycloak.sh" fetch 2>/dev/null)"
[[ "$again" == "$kc_home" ]] || fail "a second fetch printed $again"
echo "test-keycloak-fetch: ok: $(basename "$kc_home") unpacked with HOME=$tmp/home in $((SECONDS - start)) s"
