#!/bin/sh
# Install milter-bridge (the bridge and the milter_policy SDK) into a new virtual
# environment at PREFIX. The Dockerfile's builder stage runs this, and so does
# tests/deploy/test_dockerfile.py, which then runs the installed entrypoint: the
# image's install steps live here only, so they are tested without a Docker engine.
#
#   docker/install.sh PREFIX [SOURCE]
#
# SOURCE: the project directory (pyproject.toml, README.md, bridge/, sdk/) or a
# built wheel; default: the directory above this script.
#
# Environment:
#   PYTHON   interpreter for the venv (default: python3)
#   PIP_*    pip's own settings. The image installs from PyPI. The tests have no
#            network: they give the same build context as the image's, the test
#            interpreter as PYTHON, and PIP_NO_INDEX=1 with PIP_FIND_LINKS set to
#            the wheelhouse ./test downloads (tests/tools.py): the build
#            requirements and dependencies of pyproject.toml, as wheels.
set -eu

if [ "$#" -lt 1 ] || [ "$#" -gt 2 ]; then
    echo "usage: $0 PREFIX [SOURCE]" >&2
    exit 2
fi
prefix=$1
source=${2:-$(cd "$(dirname "$0")/.." && pwd)}
python=${PYTHON:-python3}

if [ -e "$prefix/bin/python" ]; then
    echo "$0: $prefix already holds a virtual environment" >&2
    exit 2
fi

"$python" -m venv "$prefix"
"$prefix/bin/python" -m pip install --no-cache-dir --disable-pip-version-check --quiet "$source"

# The entrypoint works and runs the code installed here, not a checkout's.
"$prefix/bin/milter-bridge" --version
"$prefix/bin/python" - "$prefix" <<'PY'
import sys
from pathlib import Path

import milter_bridge
import milter_policy

prefix = Path(sys.argv[1]).resolve()
for module in (milter_bridge, milter_policy):
    where = Path(module.__file__).resolve()
    if prefix not in where.parents:
        sys.exit(f"{module.__name__} imports from {where}, not from {prefix}")
PY

# Only what runs is kept: no pip, no setuptools in the installed environment.
"$prefix/bin/python" -m pip uninstall --yes --quiet --disable-pip-version-check pip setuptools
