#!/usr/bin/env bash
# Refresh requirements-lock.txt: every package that requirements-dev.txt pulls in, pinned (==) at the version
# installed in this Python environment, the one the tests and stored runs were made with. After upgrading
# (pip install -U ...) and running the tests: bash scripts/lock.sh, then commit the lock. PYTHON picks another
# environment's interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# pip-tools in a virtual environment of its own (the same interpreter, so it resolves for this Python and
# platform), so that the environment being recorded stays as it was tested.
"$py" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q pip-tools==7.6.2

# pip-compile keeps the pins it finds in its output file where they fit: start it from this environment's
# versions, so it records those rather than the newest. --strip-extras: the lock also serves as a -c file;
# --allow-unsafe: setuptools (torch and tensorboard need it) is pinned too; no index or find-links lines:
# pip's own configuration says where packages come from.
"$py" -m pip freeze --all > "$tmp/lock.txt"
CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" "$tmp/venv/bin/pip-compile" --quiet --strip-extras --allow-unsafe \
    --no-emit-index-url --no-emit-find-links --output-file "$tmp/lock.txt" requirements-dev.txt

# Every pin must be the installed version: a pin that pip-compile had to change means this environment does
# not satisfy requirements*.txt (install them, run the tests, run this again).
"$py" - "$tmp/lock.txt" <<'PY'
import re, sys
from importlib.metadata import PackageNotFoundError, version
def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"
pins = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", open(sys.argv[1]).read(), re.M)
wrong = [f"{name}=={pin} (installed: {installed(name)})" for name, pin in pins if installed(name) != pin]
sys.exit("lock.sh: pip-compile pinned versions not installed here: " + ", ".join(wrong) if wrong else 0)
PY

# A local build label is dropped (torch 2.13.0+cpu -> torch==2.13.0): PyPI's files have none, so the plain pin
# installs anywhere, and pip still takes the +cpu wheel wherever an index offers it (it sorts above 2.13.0).
labelled=$(grep -Eo '^[A-Za-z0-9._-]+==[^ +]+\+[^ ]+' "$tmp/lock.txt" | paste -sd ' ' || true)
platform=$("$py" -c 'import platform as p; print(f"{p.system()} {p.machine()}, {p.python_implementation()} {p.python_version()}")')
{
    echo "# The exact versions the tests and stored runs were made with ($platform), for pip's -c or -r;"
    echo "# requirements*.txt hold the ranges. Install: pip install -c requirements-lock.txt -r requirements-dev.txt"
    echo "# (or -r requirements.txt and the extras wanted). Made by pip-tools' pip-compile 7.6.2 from this environment."
    [ -z "$labelled" ] || echo "# Tested: $labelled; the pins below drop the local label."
    sed -E 's/^([A-Za-z0-9._-]+==[^+ ]+)\+[^ ]+$/\1/' "$tmp/lock.txt"
} > requirements-lock.txt
echo "requirements-lock.txt: $(grep -cE '^[A-Za-z0-9]' requirements-lock.txt) pins ($platform)"
