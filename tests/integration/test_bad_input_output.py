"""What a user sees for bad input: one line naming the setting, file or option, the value and what is
accepted, and no traceback, in `flwr run`'s own output and on the command line.

Every refused setting is checked through the real ServerApp's ``main`` with the run config fused
the way `flwr run` fuses it (Flower's own parser and the app's defaults): the line it prints.
Under `flwr run` itself (a real Flower simulation, each starting Ray: ~9 CPU-seconds a run) go
one case of each way a run can fail at start (a setting, a setting holding a secret, the results
folder, resume, the federation's size, the clients' LLM against the task) and every client-side
case, each its own run on this module's SuperLink (its own FLWR_HOME and ports), two at a time;
the output checked is everything `flwr run --stream` printed. A refused setting takes the same path through Flower
whichever setting it is. After our line Flower adds its own report of a failed run
("Simulation raised an exception", "Exit Code: 700" and a link), which this project cannot
change; the test checks that no Python traceback is among it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from flwr.common.config import get_fused_config_from_dir, parse_config_args

from fedtextgrad_core.errors import ConfigError
from server_app.server_app import main as server_main
from tests.support.faulty_llm_server import closed_port
from tests.support.simulation_helpers import ROOT, flwr_run

START = "fedtextgrad: the run cannot start: "
STOPPED = "fedtextgrad: the run stopped: "


def no_traceback(output: str) -> None:
    assert "Traceback" not in output, output[-3000:]
    assert 'File "' not in output, output[-3000:]


def bad_bbh_file(tmp_path: Path) -> Path:
    """An object-counting file whose targets are words: the task cannot score them."""
    path = tmp_path / "object_counting.json"
    examples = [{"input": f"I have {i} apples. How many fruits do I have?", "target": "many"} for i in range(250)]
    path.write_text(json.dumps({"examples": examples}))
    return path


def broken_json(tmp_path: Path) -> Path:
    path = tmp_path / "object_counting.json"
    path.write_text('{"examples": [{"input": "x", "target": "1"},\n')
    return path


# (id, run config given the test's tmp folder, the exact text expected in the output)
SETTINGS = [
    ("unknown-merge", lambda t: "merge='average'",
     START + "setting 'merge' = 'average' is not accepted; expected concat, summarize, summarize-uid, "
             "summarize-uid-explicit"),
    ("zero-rounds", lambda t: "num-server-rounds=0",
     START + "setting 'num-server-rounds' = 0 is not accepted; expected a whole number of at least 1 and at most 10000"),
    ("absurd-rounds", lambda t: "num-server-rounds=1000000000",
     START + "setting 'num-server-rounds' = 1000000000 is not accepted; expected a whole number of at least 1 and at "
             "most 10000"),
    ("unknown-task", lambda t: "task='counting'",
     START + "setting 'task' = 'counting' is not accepted; expected object_counting, word_sorting, "
             "multistep_arithmetic_two, gsm8k"),
    ("unknown-backend", lambda t: "llm-backend='vllm'",
     START + "setting 'llm-backend' = 'vllm' is not accepted; expected sim, openai"),
    ("openai-without-url", lambda t: "llm-backend='openai'",
     START + "setting 'llm-base-url' = '' is not accepted; expected the URL of an OpenAI-compatible endpoint"),
    ("not-a-url", lambda t: "llm-backend='openai' llm-base-url='ftp://example'",
     START + "setting 'llm-base-url' = 'ftp://example' is not accepted; expected an http:// or https:// URL"),
    ("key-pasted", lambda t: "server-api-key-env='sk-proj-123 secret'",
     START + "setting 'server-api-key-env' = '<not shown>' is not accepted; expected the NAME of an environment "
             "variable"),
    ("results-dir-pseudo-fs", lambda t: "results-dir='/proc/fedtextgrad-results'",
     START + "setting 'results-dir' = '/proc/fedtextgrad-results' is not accepted; expected a folder this process "
             "can create and write in"),
    ("run-name-too-long", lambda t: f"run-name='{'x' * 300}'",
     START + "setting 'run-name' = 'xxxxxxxx"),
    ("resume-nothing", lambda t: f"resume-from='{t / 'nowhere'}'",
     START + f"setting 'resume-from' = '{'{}'}' is not accepted; expected the results folder of an earlier run"),
    ("more-clients-than-nodes", lambda t: "min-train-clients=5",
     "setting 'min-train-clients' = 5 is not accepted; expected at most 3, the simulated SuperNodes of this "
     "federation"),
    ("sim-gsm8k", lambda t: "task='gsm8k'",
     START + "setting 'llm-backend' = 'sim' is not accepted; expected openai for gsm8k: the simulated LLM answers "
             "object counting, word sorting and multistep arithmetic only"),
    ("parser-for-words", lambda t: "task='word_sorting' answer-parser='last-number'",
     START + "setting 'answer-parser' = 'last-number' is not accepted; expected answer-line for word_sorting"),
    ("budget-too-small", lambda t: "merge-token-budget=10",
     START + "setting 'merge-token-budget' = 10 is not accepted; expected a whole number of tokens, at least"),
    ("fraction", lambda t: "fraction-train=1.5",
     START + "setting 'fraction-train' = 1.5 is not accepted; expected a number in (0, 1]"),
]

CLIENT_SIDE = [
    ("data-source-missing", lambda t: "data-source='/nonexistent/data'",
     STOPPED + "round 0 evaluation: only 0 client(s) succeeded, at least 2 required (min-train-clients). Errors: "
               "clients 0, 1, 2: data-source path '/nonexistent/data' does not exist"),
    ("data-file-broken", lambda t: f"data-source='{broken_json(t)}'", "is not valid JSON"),
    ("data-targets-unscorable", lambda t: f"data-source='{bad_bbh_file(t)}'",
     "has the target 'many', which object_counting cannot score; expected a number"),
    ("batch-beyond-training-data", lambda t: "batch-size=5000",
     "setting 'batch-size' = 5000 is not accepted; expected at most 17, the training examples this client holds"),
    ("llm-server-down", lambda t: f"llm-backend='openai' llm-base-url='http://127.0.0.1:{closed_port()}/v1' "
                                  "llm-model='m' server-backend='sim' llm-startup-wait=0.0",
     "is unreachable"),
]


# one case of each way a run fails at start, under `flwr run`; every setting case is also run in-process
UNDER_FLWR_RUN = ("unknown-merge", "key-pasted", "results-dir-pseudo-fs", "resume-nothing", "more-clients-than-nodes",
                  "sim-gsm8k")
CASES = [case for case in SETTINGS if case[0] in UNDER_FLWR_RUN] + CLIENT_SIDE
CONCURRENT_RUNS = 2  # each case mostly waits on Ray starting and stopping; more at once beside other modules and
# Ray misses its fixed 30 s start-up deadline on 2 cores


def run_config_text(case: tuple, folder: Path) -> str:
    """The case's run config, its results in ``folder`` unless the case sets its own results-dir."""
    text = case[1](folder)
    return text if "results-dir" in text else f"results-dir='{folder / 'results'}' {text}"


def expected_line(case: tuple, folder: Path) -> str:
    return case[2].replace("{}", str(folder / "nowhere"))


@dataclass(frozen=True)
class CaseRun:
    folder: Path
    output: str


@pytest.fixture(scope="module")
def case_runs(flwr_home, tmp_path_factory) -> dict[str, CaseRun]:
    """Every case's `flwr run`, two at a time on the module's SuperLink: the first alone (it starts
    the SuperLink), then the rest in parallel. Each is still its own run with its own output."""
    folders = {name: tmp_path_factory.mktemp(name) for name, _, _ in CASES}

    def run(case: tuple) -> str:
        return flwr_run(flwr_home, run_config_text(case, folders[case[0]]))

    outputs = {CASES[0][0]: run(CASES[0])}
    with ThreadPoolExecutor(CONCURRENT_RUNS) as pool:
        outputs.update(zip([c[0] for c in CASES[1:]], pool.map(run, CASES[1:])))
    return {name: CaseRun(folders[name], outputs[name]) for name in folders}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_under_flwr_run_is_one_line_without_a_traceback(case_runs, case) -> None:
    folder, output = case_runs[case[0]].folder, case_runs[case[0]].output
    expected = expected_line(case, folder)
    lines = [line for line in output.splitlines() if expected in line]
    assert len(lines) == 1, output[-4000:]
    no_traceback(output)
    for summary in (folder / "results").glob("*/summary.json"):  # a run that opened its folder says the same there
        assert expected.removeprefix(STOPPED) in json.loads(summary.read_text())["error"] or \
            expected in json.loads(summary.read_text())["error"]


# refused before the ServerApp asks the grid anything (the federation's size and whether the clients'
# LLM can answer the task are checked against the connected nodes: under `flwr run` above)
AT_START = [case for case in SETTINGS if case[0] not in ("more-clients-than-nodes", "sim-gsm8k")]


class UnusedGrid:
    """A grid the ServerApp must not reach: a refused setting stops the run before any message."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the ServerApp used the grid ({name}) although its settings were refused")


@pytest.mark.parametrize("case", AT_START, ids=[c[0] for c in AT_START])
def test_a_refused_setting_is_one_line_from_the_serverapp(case, tmp_path, capsys) -> None:
    run_config = get_fused_config_from_dir(ROOT, parse_config_args([run_config_text(case, tmp_path)]))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(ConfigError):
        server_main(UnusedGrid(), context)
    printed = capsys.readouterr()
    expected = expected_line(case, tmp_path)
    lines = [line for line in printed.out.splitlines() if line.strip()]
    # at most the run header (printed once the settings parse), then the one line saying why
    assert len(lines) <= 2 and expected in lines[-1] and lines[-1].startswith(START), printed.out
    assert [line for line in lines if "cannot start" in line] == lines[-1:] and printed.err == "", printed
    no_traceback(printed.out)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedtextgrad_core.tools.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def busy_port() -> tuple[socket.socket, int]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    return holder, holder.getsockname()[1]


@pytest.mark.slow  # a dozen fresh `fedtextgrad` processes
def test_bad_input_on_the_command_line_is_one_line_without_a_traceback(tmp_path: Path) -> None:
    binary = tmp_path / "prompt.bin"
    binary.write_bytes(b"\x00\xff\xfe binary")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 prompt".encode("latin-1"))
    grid = tmp_path / "grid.toml"
    grid.write_text("[axes]\nmerge = ['mean']\n")
    holder, port = busy_port()
    cases = [
        (("eval", "--task", "object_counting", "--prompt-file", str(binary)),
         f"fedtextgrad eval: --prompt-file '{binary}' is a binary file, not a text file holding a prompt"),
        (("eval", "--task", "object_counting", "--prompt-file", str(latin)),
         f"fedtextgrad eval: --prompt-file '{latin}' is not UTF-8 text (byte 3 cannot be read)"),
        (("eval", "--task", "object_counting", "--prompt-file", str(tmp_path)),
         f"fedtextgrad eval: --prompt-file '{tmp_path}' is a folder, not a text file"),
        (("analyze", str(tmp_path / "missing.txt")),
         f"fedtextgrad analyze: '{tmp_path / 'missing.txt'}' cannot be read: No such file or directory"),
        (("compare", str(tmp_path)),
         f"fedtextgrad compare: '{tmp_path}' is not a run folder: it has no summary.json and no rounds.jsonl"),
        (("sim-server", "--port", str(port)),
         f"fedtextgrad sim-server: cannot serve on 127.0.0.1:{port}: Address already in use"),
        (("experiment", str(grid), "--out", str(tmp_path / "out")),
         "fedtextgrad experiment: cell 1 (merge=mean): setting 'merge' = 'mean' is not accepted"),
        (("serve", "--model", str(tmp_path / "none.gguf")),
         f"--model '{tmp_path / 'none.gguf'}' does not exist"),
        (("serve", "--model", str(binary)), "is not a GGUF file"),
    ]
    try:
        for args, expected in cases:
            done = cli(*args)
            assert done.returncode == 2, (args, done.stdout, done.stderr)
            assert expected in done.stderr, (args, done.stderr)
            assert len(done.stderr.strip().splitlines()) == 1, (args, done.stderr)
            no_traceback(done.stderr + done.stdout)
    finally:
        holder.close()
