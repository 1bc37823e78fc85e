"""A run folder written before the typed records and the settings table still resumes and compares.

``tests/support/data/run-folder-v1`` was written by this project's code of before the redesign (commit
3103d4e): a 3-round run on the simulated LLM killed during round 2's training. Its round line, summary
and checkpoint are in the old format, and its run config has the old ``proximal`` key.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.run.run_folder import RunFolder
from fedtextgrad_core.tools.compare import compare_runs, load_run
from tests import ROOT
from tests.support.flower_loopback import LoopbackGrid, default_run_config
from tests.support.resume_helpers import run_server

OLD = ROOT / "tests" / "support" / "data" / "run-folder-v1"


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    folder = tmp_path / "old-run"
    shutil.copytree(OLD, folder)
    return folder


def saved_config(folder: Path) -> dict:
    return json.loads((folder / "checkpoint.json").read_text())["run_config"]


def test_an_old_folder_is_read_through_the_typed_records(old_run: Path) -> None:
    (record,) = RunFolder(old_run).read_rounds()
    assert record.version == 2 and record.round == 1  # read as today's record
    assert {u.client.partition_id for u in record.uploads} == {0, 1}  # 'fraction-train' 0.67 sampled two
    assert all(u.reply.local.steps == 1 and u.reply.prompt for u in record.uploads)
    assert record.val_accuracy is not None and record.merged_prompt
    summary = RunFolder(old_run).read_summary()
    assert summary.finished is False and summary.rounds == 1


def test_an_old_folder_compares_beside_a_new_one(old_run: Path, tmp_path: Path) -> None:
    rows = compare_runs([old_run])
    assert rows[0]["rounds"] == 1 and rows[0]["finished"] is False and rows[0]["simulated"] is True
    assert load_run(old_run).rounds[0].merge.method == "summarize-uid"


def test_an_old_folder_resumes_with_its_own_settings_and_finishes(old_run: Path) -> None:
    """The old run config's proximal=true is today's keep-rule 'not-worse'; the server was the sim by
    default then, so it is named now. Given those, the run continues after round 1 in its folder."""
    old = saved_config(old_run)
    assert old["proximal"] is True and old["server-backend"] == "sim"
    config = default_run_config(**{**{k: v for k, v in old.items() if k != "proximal"},
                                   "keep-rule": "not-worse", "resume-from": str(old_run),
                                   "results-dir": str(old_run.parent)})
    run_server(config, LoopbackGrid(config, num_nodes=3))
    folder = RunFolder(old_run)
    summary = folder.read_summary()
    assert summary.finished and summary.rounds == 3 and list(summary.resumed_after_rounds) == [1]
    first, *later = folder.read_rounds()
    assert first.round == 1 and [r.round for r in later] == [2, 3]
    assert (old_run / "rounds.jsonl").read_text().splitlines()[0] == (OLD / "rounds.jsonl").read_text().splitlines()[0]
    assert summary.test_accuracy is not None


def test_an_old_folder_refuses_other_settings_and_names_them(old_run: Path) -> None:
    old = saved_config(old_run)
    config = default_run_config(**{**{k: v for k, v in old.items() if k != "proximal"},
                                   "keep-rule": "reference", "resume-from": str(old_run)})
    with pytest.raises(ConfigError) as info:
        run_server(config, LoopbackGrid(config, num_nodes=3))
    assert "keep-rule (saved 'not-worse', now 'reference')" in str(info.value)
