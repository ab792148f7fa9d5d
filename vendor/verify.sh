#!/usr/bin/env bash
# Proves vendor/mistralrs-core is crates.io's mistralrs-core 0.8.1 plus vendor/mistralrs-core.patch
# and nothing else: has cargo fetch the published .crate (a throw-away manifest that depends on
# it, so cargo's own registry client and cache are used), checks its sha256 (the one Cargo.lock
# had), applies the patch and compares the trees. Run by .ci/run; needs cargo, tar, patch, diff.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
sha=a2b8b9e5c94491d9ceeded3a30291cb6af6ae74810a5776dd55e3bbb8b3429d4
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/fetch/src"
touch "$work/fetch/src/lib.rs"
cat > "$work/fetch/Cargo.toml" <<'TOML'
[package]
name = "fetch-mistralrs-core"
version = "0.0.0"
edition = "2021"

[dependencies]
mistralrs-core = { version = "=0.8.1", default-features = false }
TOML
cargo fetch --quiet --manifest-path "$work/fetch/Cargo.toml"
crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/mistralrs-core-0.8.1.crate | head -1)
cp "$crate" "$work/c.crate"
echo "$sha  $work/c.crate" | sha256sum -c --quiet
tar -C "$work" -xzf "$work/c.crate"
up="$work/mistralrs-core-0.8.1"
rm -f "$up/Cargo.lock" "$up/.cargo_vcs_info.json" "$up/Cargo.toml.orig"
if [ "${1:-}" = --update ]; then
  (cd "$work" && diff -ruN mistralrs-core-0.8.1 "$here/mistralrs-core" || true) | grep -v '^diff ' \
    | sed -E "s#^(---|\+\+\+) [^ \t]*mistralrs-core(-0\.8\.1)?/([^\t]*).*#\1 X/\3#" \
    | sed -E "1,\$ { /^--- X\//s#X/#a/#; /^\+\+\+ X\//s#X/#b/# }" > "$here/mistralrs-core.patch"
  echo "wrote vendor/mistralrs-core.patch"
  exit 0
fi
(cd "$up" && patch -s -p1 < "$here/mistralrs-core.patch")
if ! diff -r "$up" "$here/mistralrs-core" > "$work/diff"; then
  echo "vendor/mistralrs-core differs from mistralrs-core 0.8.1 + vendor/mistralrs-core.patch:" >&2
  head -50 "$work/diff" >&2
  echo "regenerate the patch (see vendor/README.md) or undo the stray edit" >&2
  exit 1
fi
echo "vendor/mistralrs-core = mistralrs-core 0.8.1 (sha256 ${sha:0:12}…) + vendor/mistralrs-core.patch"
