"""Run one fuzz target under atheris.

    python -m fuzz.run TARGET [libFuzzer flags] [corpus dirs]

With no corpus directory, the committed seeds in fuzz/corpus/TARGET are used
(read only: new inputs go to a temporary directory unless one is given first).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

HERE = Path(__file__).parent


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1].startswith("-"):
        sys.exit(f"usage:{__doc__}")
    name = argv[1]
    with atheris.instrument_imports(include=["milter_bridge", "fuzz"]):
        from fuzz.targets import TARGETS  # noqa: PLC0415

    if name not in TARGETS:
        sys.exit(f"unknown target {name!r}; one of {', '.join(TARGETS)}")
    args = argv[2:]
    target = TARGETS[name]
    if not any(not a.startswith("-") for a in args):
        # libFuzzer writes new inputs to the first directory: keep the seeds clean.
        scratch = tempfile.mkdtemp(prefix=f"fuzz-{name}-")
        args += [scratch, str(HERE / "corpus" / name)]
    atheris.Setup([argv[0], *args], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
