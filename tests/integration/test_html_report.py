"""report.html of a real run, opened in a real headless Chromium.

A short `flwr run . local` (Flower's simulation, the simulated LLM) leaves its run folder with
report.html; `fedtextgrad report` writes the page again; Chromium loads it from disk with no network,
its DOM is checked (the round table's rows, a diff with <ins> and <del>, the final test table, the
simulated label, the local steps with their feedback from the simulated clients' step log) and a
screenshot is saved under the test's tmp folder (its path is printed). Without Chromium the test is
skipped with the reason (it fails instead when CI is set, so CI cannot pass by skipping it):
Debian's package, `apt-get install -y --no-install-recommends chromium` (.ci/chromium.sh).

The MLflow run of a tracked federation holds report.html among its artifacts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.support.simulation_helpers import flwr_run

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BROWSER_TIMEOUT = 120


def chromium() -> str:
    """Chromium's command, or the test skips (fails under CI) saying how to install it."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    reason = "no chromium on PATH: apt-get install -y --no-install-recommends chromium (.ci/chromium.sh)"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and {reason}")
    pytest.skip(reason)


def browse(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium with a profile of its own (nothing of the user's is read or written)."""
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
               f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT, check=False)


class Dom(HTMLParser):
    """What the checks need of the DOM Chromium built: each table's body rows as cell texts, how many
    <ins> and <del> sit inside a diff, the text of elements with an id."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, dict[str, str]]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.texts: dict[str, str] = {}
        self.marks = {"ins": 0, "del": 0}
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        if tag in ("meta", "br", "img", "input", "link"):
            return
        self.stack.append((tag, attributes))
        if tag == "table":
            self._table = attributes.get("id", "")
            self.tables.setdefault(self._table, [])
        elif tag == "tr" and self._table is not None and any(t == "tbody" for t, _ in self.stack):
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag in ("ins", "del") and any("diff" in a.get("class", "").split() for _, a in self.stack):
            self.marks[tag] += 1

    def handle_endtag(self, tag: str) -> None:
        while self.stack:
            name, _ = self.stack.pop()
            if name == tag:
                break
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        for _, attributes in self.stack:
            if "id" in attributes:
                self.texts[attributes["id"]] = self.texts.get(attributes["id"], "") + data


@pytest.fixture(scope="module")
def run_folder(flwr_home, tmp_path_factory) -> Path:
    """A real 2-round federation of three simulated clients, through `flwr run . local`."""
    results = tmp_path_factory.mktemp("results")
    output = flwr_run(flwr_home, f"results-dir='{results}' run-name='report' num-server-rounds=2")
    folder = results / "report"
    assert (folder / "summary.json").exists(), output[-3000:]
    assert f"report: {folder.resolve() / 'report.html'}" in output, output[-3000:]
    return folder


def test_a_real_runs_report_opens_in_headless_chromium_with_its_key_parts(run_folder: Path, tmp_path: Path) -> None:
    browser = chromium()
    assert (run_folder / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    # the simulated clients kept their steps with the feedback in the run folder
    assert sorted(p.name for p in (run_folder / "clients").iterdir()) == ["0", "1", "2"]
    page = tmp_path / "report.html"
    done = subprocess.run([sys.executable, "-m", "fedtextgrad_core.tools.cli", "report", str(run_folder), "--out",
                           str(page)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == f"report: {page}", done.stderr

    dumped = browse(browser, tmp_path / "profile", "--dump-dom", page.as_uri())
    assert dumped.returncode == 0 and "</html>" in dumped.stdout, dumped.stderr[-2000:]
    dom = Dom()
    dom.feed(dumped.stdout)
    rounds = dom.tables["rounds"]
    assert [row[0] for row in rounds] == ["0 (start)", "1", "2"]
    assert all("%" in row[1] and "n=" in row[1] for row in rounds)
    tests = {row[0]: row for row in dom.tables["tests"]}
    assert set(tests) == {"best prompt", "last prompt", "initial prompt"}
    assert all(row[1].endswith("%") and row[3] == "100" for row in tests.values())
    assert dom.tables["comparisons"][0][0] == "best vs initial"
    # the simulator's rewrites only add instructions: its diffs hold insertions (deletions: the unit tests)
    assert dom.marks["ins"] >= 3
    assert "never that the method does" in dom.texts["simulated-note"]
    assert "round-1" in dom.texts and "round-2" in dom.texts
    assert "accuracy-figure" in dom.texts or 'id="accuracy-figure"' in dumped.stdout
    assert "feedback text(s)" in dumped.stdout and ">kept<" in dumped.stdout  # each step, from the step log
    assert "<script" not in dumped.stdout

    shot = tmp_path / "report.png"
    taken = browse(browser, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri())
    assert taken.returncode == 0 and shot.read_bytes().startswith(PNG_MAGIC), taken.stderr[-2000:]
    assert shot.stat().st_size > 20_000  # a page, not a blank
    print(f"screenshot: {shot}")


def test_the_report_is_an_artifact_of_the_tracked_mlflow_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from tests.support.flower_loopback import LoopbackGrid, make_strategy

    store = tmp_path / "mlruns"
    strategy, run_config, recorder, lines = make_strategy(
        tmp_path, **{"num-server-rounds": 1, "local-steps": 1, "synthetic-size": 40, "tracker": "mlflow",
                     "tracking-uri": str(store)})
    strategy.start(LoopbackGrid(run_config))
    assert (recorder.path / "report.html").is_file()
    run_id = recorder.tracker.run_id  # type: ignore[attr-defined]
    assert run_id, lines
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=store.as_uri())
    assert "report.html" in {Path(info.path).name for info in client.list_artifacts(run_id)}
    text = Path(client.download_artifacts(run_id, "report.html", str(tmp_path / "down"))).read_text(encoding="utf-8")
    assert 'id="rounds"' in text
