"""CI checks of the Nix files and of what the flake builds, runnable without nixpkgs: every
Nix file parses (nix-instantiate --parse) and, where a nixfmt 1.x is on PATH, is exactly as
`nixfmt --check` wants it (otherwise the layout rules nixfmt enforces that can be checked
without it: two-space indents, no tabs or trailing blanks, one final newline); flake.lock
pins every input to a revision with its narHash; and no binary gets a RUNPATH entry that
names the build directory (stdenv's audit-tmpdir refuses those, and they point nowhere on
the host that runs the binary): build.rs takes its entries from src/preflight/runpath.rs,
those are `$ORIGIN`-relative, and every zopilot-gpu binary under target*/ (or given as an
argument) carries only `$ORIGIN`, /nix/store and driver entries.

    python3 nix/lint.py [ELF ...]
"""
import json
import pathlib
import re
import shutil
import struct
import subprocess
import sys

root = pathlib.Path(__file__).resolve().parent.parent
problems = []
notes = []

# ---- Nix files
files = [root / "flake.nix", *sorted((root / "nix").glob("*.nix"))]
for f in files:
    r = subprocess.run(["nix-instantiate", "--parse", str(f)], capture_output=True, text=True)
    if r.returncode != 0:
        problems.append(f"{f.name}: does not parse: {r.stderr.strip()}")
    text = f.read_text()
    if not text.endswith("\n") or text.endswith("\n\n"):
        problems.append(f"{f.name}: must end with exactly one newline")
    for n, line in enumerate(text.splitlines(), 1):
        if "\t" in line:
            problems.append(f"{f.name}:{n}: tab")
        if line != line.rstrip():
            problems.append(f"{f.name}:{n}: trailing whitespace")
        indent = len(line) - len(line.lstrip(" "))
        if line.strip() and indent % 2:
            problems.append(f"{f.name}:{n}: odd indentation ({indent} spaces)")

# nixfmt 0.x (nixfmt-classic) formats differently; only the RFC 166 formatter (1.x) counts.
nixfmt = shutil.which("nixfmt")
version = ""
if nixfmt:
    r = subprocess.run([nixfmt, "--version"], capture_output=True, text=True)
    version = r.stdout.strip()
if re.match(r"nixfmt 1\.", version):
    r = subprocess.run([nixfmt, "--check", *map(str, files)], capture_output=True, text=True)
    for line in (r.stdout + r.stderr).splitlines():
        problems.append(f"nixfmt: {line}")
    if r.returncode != 0 and not (r.stdout + r.stderr).strip():
        problems.append(f"nixfmt --check failed ({r.returncode})")
    notes.append(version)
else:
    notes.append("no nixfmt 1.x on PATH: layout rules only (the flake's checks.nix-format runs it)")

# ---- flake.lock
lock = json.loads((root / "flake.lock").read_text())
if lock.get("version") != 7:
    problems.append("flake.lock: version must be 7")
nodes = lock["nodes"]
flake = (root / "flake.nix").read_text()
for name, node in nodes[lock["root"]]["inputs"].items():
    locked = nodes[node].get("locked", {})
    for key in ("rev", "narHash", "lastModified", "owner", "repo", "type"):
        if key not in locked:
            problems.append(f"flake.lock: input {name} lacks locked.{key}")
    if len(locked.get("rev", "")) != 40 or not locked.get("narHash", "").startswith("sha256-"):
        problems.append(f"flake.lock: input {name} is not pinned to a full revision and hash")
    if not re.search(rf"\b{re.escape(name)}(\.url\s*=|\s*=\s*\{{[^}}]*\burl\s*=)", flake):
        problems.append(f"flake.lock: input {name} is not declared in flake.nix")

# ---- RUNPATH
runpath_rs = (root / "src/preflight/runpath.rs").read_text()
m = re.search(r"pub const RUNPATH: &\[&str\] = &\[(.*?)\];", runpath_rs, re.S)
entries = re.findall(r'"([^"]*)"', m.group(1)) if m else []
allowed = re.findall(r'"([^"]*)"', re.search(r"ALLOWED_ABSOLUTE: &\[&str\] = &\[(.*?)\];", runpath_rs, re.S).group(1))
if not entries:
    problems.append("src/preflight/runpath.rs: RUNPATH not found")
for e in entries:
    if not e.startswith("$ORIGIN/"):
        problems.append(f"src/preflight/runpath.rs: RUNPATH entry {e!r} is not $ORIGIN-relative")
build_rs = (root / "build.rs").read_text()
for m in re.finditer(r"-rpath", build_rs):
    start = build_rs.rfind("println!", 0, m.start())
    statement = build_rs[start:build_rs.find(");", m.start())]
    if "runpath::RUNPATH" not in statement:
        n = build_rs.count("\n", 0, m.start()) + 1
        problems.append(f"build.rs:{n}: an rpath not taken from runpath::RUNPATH")


def elf_runpath(path):
    """DT_RUNPATH (or DT_RPATH) of a 64-bit little-endian ELF file; None if it is not one."""
    data = pathlib.Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    for _, sh_type, _, _, off, size, link, _, _, entsize in sections:
        if sh_type != 6:  # SHT_DYNAMIC
            continue
        stroff = sections[link][4]
        found = []
        for i in range(size // (entsize or 16)):
            tag, val = struct.unpack_from("<qQ", data, off + i * 16)
            if tag in (15, 29):  # DT_RPATH, DT_RUNPATH
                end = data.index(b"\0", stroff + val)
                found.append(data[stroff + val:end].decode())
        return ":".join(found)
    return ""


binaries = [pathlib.Path(a) for a in sys.argv[1:]]
# Cargo's binaries: target*/<profile>/ and target*/<triple>/<profile>/.
binaries += sorted(p for g in ("target*/*/zopilot-gpu", "target*/*/*/zopilot-gpu") for p in root.glob(g) if p.is_file())
for b in binaries:
    rp = elf_runpath(b)
    if rp is None:
        problems.append(f"{b}: not a 64-bit ELF file")
        continue
    for e in filter(None, rp.split(":")):
        if not (e.startswith("$ORIGIN") or e.startswith("${ORIGIN}") or any(e.startswith(a) for a in allowed)):
            problems.append(f"{b}: RUNPATH entry {e} names a build-time directory")
notes.append(f"{len(binaries)} binaries' RUNPATH")

for p in problems:
    print(p)
print(
    f"nix lint: {len(files)} files, {len(nodes) - 1} locked inputs, {'; '.join(notes)}, "
    f"{len(problems)} problems"
)
sys.exit(1 if problems else 0)
