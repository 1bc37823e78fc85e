"""The figures are an extra: a server installed with a site's set (no matplotlib) still runs.

Each case runs in a child interpreter where ``sys.modules["matplotlib"] = None``, so that importing
matplotlib fails there exactly as it does where it is not installed. The run goes on, says once why
it draws no figures and how to get them, and writes no PNG; ``fedtextgrad compare --out`` says the
same in one line instead of a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fedtextgrad_core.run import figures

ROOT = Path(__file__).resolve().parents[3]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
HIDE_MATPLOTLIB = "import sys\nsys.modules['matplotlib'] = None  # as if it were not installed\n"

# a 2-round run over a scripted pool, the figures due after every round (REDRAW_EVERY_SECONDS = 0)
RUN = HIDE_MATPLOTLIB + """
import json
from pathlib import Path
from fedtextgrad_core.run import recorder
from fedtextgrad_core.run.messages import Phase
from tests.support.scripted_pool import ScriptedPool, evals, make_federation, start_prompt, uploads
recorder.REDRAW_EVERY_SECONDS = 0.0
start = start_prompt()
pool = ScriptedPool(2, {
    (Phase.EVALUATE, 0): evals((4, 10), (6, 10)),
    (Phase.TRAIN, 1): uploads(start),
    (Phase.EVALUATE, 1): evals((8, 10), (6, 10)),
    (Phase.TRAIN, 2): lambda request: uploads(request.prompt),
    (Phase.EVALUATE, 2): evals((9, 10), (7, 10)),
    (Phase.TEST, 2): evals((9, 10), (7, 10)),
})
lines = []
fed = make_federation(Path(sys.argv[1]), pool, lines=lines)
summary = fed.run()
print(json.dumps({"lines": lines, "folder": str(fed.recorder.path), "finished": summary.finished}))
"""

COMPARE = HIDE_MATPLOTLIB + """
from fedtextgrad_core.tools.cli import main
sys.exit(main(["compare", sys.argv[1], "--out", sys.argv[2]]))
"""


def child(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300, check=False)


def test_a_run_without_matplotlib_skips_its_figures_with_one_line_and_goes_on(tmp_path: Path) -> None:
    done = child(RUN, str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "could not draw" not in done.stderr, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["finished"] is True
    said = [line for line in result["lines"] if ("figure" in line or "matplotlib" in line) and str(tmp_path) not in line]
    assert said == [figures.SKIPPED]  # once, though the figures were due after each of the 2 rounds
    assert 'pip install "fedtextgrad[figures]"' in figures.SKIPPED and "matplotlib is not installed" in figures.SKIPPED
    folder = Path(result["folder"])
    assert (folder / "summary.json").is_file() and len((folder / "rounds.jsonl").read_text().splitlines()) == 2
    assert not list(folder.rglob("*.png"))

    # the same folder compared: the table, then one line for the figure it cannot draw
    compared = child(COMPARE, str(folder), str(tmp_path / "compare.png"))
    assert compared.returncode == 2
    assert compared.stderr.strip() == f"fedtextgrad compare: {figures.NO_MATPLOTLIB}"
    assert folder.name in compared.stdout and not (tmp_path / "compare.png").exists()


def test_with_matplotlib_the_figures_are_available() -> None:
    assert figures.available()  # the test extra installs the figures extra
