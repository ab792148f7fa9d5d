"""CI checks of the Nix files that need no nixpkgs: every file parses (nix-instantiate
--parse), is laid out as nixfmt lays it out where that can be checked without nixfmt
(two-space indents, no tabs or trailing blanks, one final newline), and flake.lock pins
every input to a revision with its narHash. The full `nixfmt --check` runs in the flake's
own `checks.nix-format` on a Nix host."""
import json
import pathlib
import subprocess
import sys

root = pathlib.Path(__file__).resolve().parent.parent
problems = []
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

lock = json.loads((root / "flake.lock").read_text())
if lock.get("version") != 7:
    problems.append("flake.lock: version must be 7")
nodes = lock["nodes"]
for name in nodes[lock["root"]]["inputs"].values():
    locked = nodes[name].get("locked", {})
    for key in ("rev", "narHash", "lastModified", "owner", "repo", "type"):
        if key not in locked:
            problems.append(f"flake.lock: input {name} lacks locked.{key}")
    if len(locked.get("rev", "")) != 40 or not locked.get("narHash", "").startswith("sha256-"):
        problems.append(f"flake.lock: input {name} is not pinned to a full revision and hash")
flake = (root / "flake.nix").read_text()
for name in nodes[lock["root"]]["inputs"]:
    if f"{name}.url" not in flake:
        problems.append(f"flake.lock: input {name} is not declared in flake.nix")

for p in problems:
    print(p)
print(f"nix lint: {len(files)} files, {len(nodes) - 1} locked inputs, {len(problems)} problems")
sys.exit(1 if problems else 0)
