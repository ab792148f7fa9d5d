#!/usr/bin/env bash
# Proves vendor/mistralrs-core is crates.io's mistralrs-core 0.8.1 plus vendor/patches/*.patch
# (applied in lexical order, no fuzz) and nothing else: has cargo fetch the published .crate (a
# throw-away manifest that depends on it, so cargo's own registry client and cache are used),
# checks its sha256 (the one Cargo.lock had), applies the patches one after the other and
# compares the trees. Run by .ci/run; needs cargo, tar, patch, diff.
#
# --update: rewrites the LAST patch file as the difference between vendor/mistralrs-core and
#   upstream plus every earlier patch; the other patch files stay as they are.
# --update NNNN: puts the tree's pending change into the patch whose name starts with NNNN
#   instead: the later patches are taken off the tree in reverse (exactly, no fuzz), NNNN is
#   rewritten against upstream plus the patches before it, and the later ones are rewritten
#   with their new line numbers (same changes). vendor/README.md, "Changing it", has the steps.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
sha=a2b8b9e5c94491d9ceeded3a30291cb6af6ae74810a5776dd55e3bbb8b3429d4
patches=("$here"/patches/*.patch)
if [ ! -e "${patches[0]}" ]; then
  echo "no patch files in vendor/patches/" >&2
  exit 1
fi
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
mv "$work/mistralrs-core-0.8.1" "$work/base"
rm -f "$work/base/Cargo.lock" "$work/base/.cargo_vcs_info.json" "$work/base/Cargo.toml.orig"

# Applies one patch file to $work/base, or says which one failed.
apply() {
  if ! (cd "$work/base" && patch -s -f -F0 -p1 --no-backup-if-mismatch < "$1"); then
    echo "vendor/patches/$(basename "$1") does not apply on top of the patches before it" >&2
    exit 1
  fi
}

# `diff -ruN A B` of two trees under $work, headers rewritten to a/<path> and b/<path> (no
# timestamps, no `diff` lines), so the result applies with `patch -p1`.
mkpatch() {
  (cd "$work" && diff -ruN "$1" "$2" || true) | grep -v '^diff ' \
    | sed -E "s#^--- $1/([^\t]*).*#--- a/\1#; s#^\+\+\+ $2/([^\t]*).*#+++ b/\1#"
}

if [ "${1:-}" = --update ]; then
  target=${patches[-1]}
  if [ -n "${2:-}" ]; then
    matches=("$here"/patches/"$2"*.patch)
    if [ ! -e "${matches[0]}" ] || [ "${#matches[@]}" != 1 ]; then
      echo "--update $2: no single vendor/patches/$2*.patch" >&2
      exit 1
    fi
    target=${matches[0]}
  fi
  later=()
  seen=0
  for p in "${patches[@]}"; do
    if [ "$seen" = 1 ]; then later+=("$p"); fi
    if [ "$p" = "$target" ]; then seen=1; else [ "$seen" = 1 ] || apply "$p"; fi
  done
  # s<i>: the tree without the later patches i.. (s<n> is the tree itself).
  n=${#later[@]}
  cp -r "$here/mistralrs-core" "$work/s$n"
  for ((i = n - 1; i >= 0; i--)); do
    cp -r "$work/s$((i + 1))" "$work/s$i"
    if ! (cd "$work/s$i" && patch -s -f -F0 -R -p1 --no-backup-if-mismatch < "${later[i]}" >/dev/null); then
      echo "vendor/patches/$(basename "${later[i]}") does not come off the tree exactly: the pending" >&2
      echo "change touches its lines or their context; nothing written (vendor/README.md)" >&2
      exit 1
    fi
  done
  mkpatch base s0 > "$target"
  if [ "$n" = 0 ]; then
    echo "wrote vendor/patches/$(basename "$target") only (the tree minus upstream and the earlier patches)"
  else
    echo "wrote vendor/patches/$(basename "$target") (the tree minus upstream, the earlier and the later patches)"
  fi
  for ((i = 0; i < n; i++)); do
    mkpatch "s$i" "s$((i + 1))" > "${later[i]}"
    echo "rewrote vendor/patches/$(basename "${later[i]}") (its changes as before, new line numbers)"
  done
  exit 0
fi

for p in "${patches[@]}"; do
  apply "$p"
done
if ! diff -r "$work/base" "$here/mistralrs-core" > "$work/diff"; then
  echo "vendor/mistralrs-core differs from mistralrs-core 0.8.1 + vendor/patches/*.patch:" >&2
  head -50 "$work/diff" >&2
  echo "regenerate the last patch (see vendor/README.md) or undo the stray edit" >&2
  exit 1
fi
echo "vendor/mistralrs-core = mistralrs-core 0.8.1 (sha256 ${sha:0:12}…) + ${#patches[@]} patches:"
for p in "${patches[@]}"; do
  echo "  vendor/patches/$(basename "$p")"
done
