"""``fedtextgrad bench endpoint`` against real HTTP servers on loopback.

The sim server with a fixed latency per call shows that more requests in flight really
raise requests/s; the misbehaving server shows that failures are counted, named and
never turned into a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtextgrad_core.tools.cli import main
from fedtextgrad_core.tools.endpoint_bench import (
    EndpointBench,
    LevelResult,
    format_table,
    percentile,
    summarise,
)
from tests import ROOT
from tests.support.faulty_llm_server import FaultyLLMServer, closed_port
from tests.support.sim_http import serving_sim

LATENCY_MS = 100.0


@pytest.fixture(scope="module")
def slow_sim() -> Iterator[str]:
    """The sim served over HTTP, sleeping LATENCY_MS per chat call (as a busy model server would)."""
    with serving_sim(LATENCY_MS) as url:
        yield url


@pytest.fixture()
def faulty() -> Iterator[FaultyLLMServer]:
    with FaultyLLMServer("ok", models=("m",)) as server:
        yield server


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real command line, in its own process, as a site would run it."""
    return subprocess.run([sys.executable, "-m", "fedtextgrad_core.tools.cli", "bench", "endpoint", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def one_line_error(capsys: pytest.CaptureFixture) -> str:
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fedtextgrad bench endpoint: ")
    return lines[0]


@pytest.mark.slow  # a benchmark against a server with latency
def test_more_requests_in_flight_raise_requests_per_second(slow_sim: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = run_cli("--base-url", slow_sim, "--model", "sim", "--concurrency", "1,8", "--requests", "16",
                   "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    one, eight = report["levels"]
    assert (one["concurrency"], eight["concurrency"]) == (1, 8)
    assert one["requests"] == eight["requests"] == 16 and one["errors"] == eight["errors"] == 0
    # one at a time cannot beat the server's latency; eight in flight overlap their waits
    assert one["requests_per_s"] <= 1000 / LATENCY_MS
    # (8 in flight would reach 8x on an idle machine; 2x is safe on 2 busy cores and still impossible
    # for requests sent one after another)
    assert eight["requests_per_s"] > 2 * one["requests_per_s"]
    assert one["wall_seconds"] >= 16 * LATENCY_MS / 1000
    for level in (one, eight):
        assert LATENCY_MS <= level["latency_p50_ms"] <= level["latency_p90_ms"] <= level["latency_p99_ms"]
        assert level["completion_tokens"] > 0  # from the API's usage field
        assert level["completion_tokens_per_s"] == pytest.approx(level["completion_tokens"] / level["wall_seconds"])
    # progress while it runs, then the table, then where the JSON went
    assert "concurrency 1: sending 16 requests" in done.stdout and "concurrency 8: sending 16 requests" in done.stdout
    table = done.stdout[done.stdout.index("req/s"):].splitlines()
    assert [row.split()[0] for row in table[1:3]] == ["1", "8"]
    assert f"wrote {out}" in done.stdout
    assert "Authorization" not in out.read_text() and report["model"] == "sim"


def test_the_requested_concurrency_is_what_the_server_sees(faulty: FaultyLLMServer) -> None:
    faulty.delay = 0.2
    bench = EndpointBench(faulty.url, "m", "EMPTY", max_tokens=8)
    bench.check()
    faulty.reset_counts()
    result = bench.measure(6, 12)
    assert faulty.chat_requests == 12
    assert faulty.max_in_flight == 6
    assert result.errors == 0 and result.completion_tokens == 12 * 7  # the faulty server's usage field


def test_failing_requests_are_counted_and_named(faulty: FaultyLLMServer) -> None:
    bench = EndpointBench(faulty.url, "m", "EMPTY")
    bench.check()
    faulty.mode = "http500"
    result = bench.measure(4, 8)
    assert (result.requests, result.errors, result.requests_per_s) == (8, 8, 0.0)
    assert result.latency_p50_ms is None and result.completion_tokens_per_s is None  # unknown, not 0
    assert "HTTP 500" in result.first_error and faulty.url in result.first_error


@pytest.mark.parametrize("levels", ["0,abc", "0", "4,,8", "2000", "", "-1", "1.5"])
def test_bad_concurrency_exits_2_with_one_line(levels: str, faulty: FaultyLLMServer,
                                               capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "endpoint", "--base-url", faulty.url, "--model", "m", "--concurrency", levels,
                 "--out", ""]) == 2
    line = one_line_error(capsys)
    assert "'--concurrency'" in line and "1,4,16,64" in line
    assert faulty.chat_requests == 0 and faulty.models_requests == 0  # refused before any request


def test_unreachable_url_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    out = tmp_path / "bench.json"
    done = run_cli("--base-url", url, "--model", "m", "--out", str(out))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[0].startswith("fedtextgrad bench endpoint: ") and url in lines[0] and "unreachable" in lines[0]
    assert not out.exists()


def test_a_model_the_server_refuses_stops_before_the_table(faulty: FaultyLLMServer,
                                                          capsys: pytest.CaptureFixture) -> None:
    faulty.mode = "http404"
    assert main(["bench", "endpoint", "--base-url", faulty.url, "--model", "m", "--out", ""]) == 2
    line = one_line_error(capsys)
    assert "first request failed" in line and "HTTP 404" in line
    assert faulty.chat_requests == 1  # the untimed first request only


def test_api_key_env_must_name_a_set_variable(faulty: FaultyLLMServer, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    args = ["bench", "endpoint", "--base-url", faulty.url, "--model", "m", "--out", ""]
    monkeypatch.delenv("FEDTEXTGRAD_BENCH_UNSET_KEY", raising=False)
    assert main([*args, "--api-key-env", "FEDTEXTGRAD_BENCH_UNSET_KEY"]) == 2
    assert "FEDTEXTGRAD_BENCH_UNSET_KEY" in one_line_error(capsys)
    pasted_key = "sk-proj-Zx81-not-a-variable-name"
    assert main([*args, "--api-key-env", pasted_key]) == 2
    line = one_line_error(capsys)
    assert "'--api-key-env'" in line and pasted_key not in line


@pytest.mark.parametrize("extra, needle", [
    (["--requests", "0"], "'--requests'"),
    (["--max-tokens", "0"], "'--max-tokens'"),
    (["--out", "/no/such/folder/bench.json"], "/no/such/folder"),
])
def test_other_bad_options_exit_2(extra: list[str], needle: str, faulty: FaultyLLMServer,
                                  capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "endpoint", "--base-url", faulty.url, "--model", "m", *extra]) == 2
    assert needle in one_line_error(capsys)
    assert faulty.chat_requests == 0


def test_percentiles_interpolate_between_ranks() -> None:
    assert percentile([], 0.5) is None
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.9) == pytest.approx(90.1)
    assert percentile(values, 0.99) == pytest.approx(99.01)


def test_a_server_without_usage_gives_n_a_tokens_not_zero() -> None:
    from fedtextgrad_core.tools.endpoint_bench import EndpointBenchReport, _Outcome

    result = summarise(2, [_Outcome(0.1), _Outcome(0.2, completion_tokens=5)], wall=0.2)
    assert result.completion_tokens is None and result.completion_tokens_per_s is None
    assert result.requests_per_s == pytest.approx(10.0)
    report = EndpointBenchReport("http://x/v1", "m", 2, 64, "p", [result])
    row = format_table(report).splitlines()[-1]
    assert row.split()[5] == "n/a"
    assert isinstance(result, LevelResult)
