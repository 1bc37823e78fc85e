"""The reply cache (``llm-cache-path``): a repeated evaluation costs no requests.

Against a real local HTTP server that numbers its answers, so a reply served from the
cache is told apart from a fresh one; and through the run config, as a client uses it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedtextgrad_core.data.examples import Example
from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.errors import ConfigError, LLMError
from fedtextgrad_core.llm import cache as response_cache
from fedtextgrad_core.llm import openai_transport as openai_backend
from fedtextgrad_core.llm.cache import ResponseCache, cache_key
from fedtextgrad_core.llm.engine import ChatEngine, make_engine
from fedtextgrad_core.method.evaluation import answer_all, evaluate_prompt
from fedtextgrad_core.run.client_round import answer
from fedtextgrad_core.run.messages import EvalReply, Phase, RoundRequest
from fedtextgrad_core.run.settings import endpoint_settings
from tests.support.faulty_llm_server import FaultyLLMServer
from tests.support.flower_loopback import default_run_config
from tests.support.settings_helpers import endpoint

TASK = get_task("object_counting")
EXAMPLES = [Example(f"I have {n} apples and a banana. How many fruits do I have?", str(n + 1)) for n in range(5)]
QUESTIONS = [e.question for e in EXAMPLES]


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """No endpoint check or open cache carried over from another test."""
    monkeypatch.setattr(openai_backend, "_facts", {})
    monkeypatch.setattr(openai_backend, "_down", {})
    monkeypatch.setattr(response_cache, "_open", {})


@pytest.fixture
def server() -> Iterator[FaultyLLMServer]:
    # every fresh answer carries its request number: a cached answer repeats an old number
    with FaultyLLMServer("ok", reply_text="Counting, request {n}.\nAnswer: 6", models=("m", "m2")) as faulty:
        yield faulty


def cached_engine(url: str, cache: Path, **overrides: object) -> ChatEngine:
    settings = {"backend": "openai", "base_url": url, "model": "m", "timeout": 2.0, "max_retries": 0,
                "cache_path": str(cache), **overrides}
    return make_engine(endpoint(**settings))


def test_the_same_evaluation_twice_sends_no_requests_the_second_time(server: FaultyLLMServer,
                                                                     tmp_path: Path) -> None:
    engine = cached_engine(server.url, tmp_path / "replies.sqlite")
    first = answer_all(engine, TASK.start_prompt, QUESTIONS)
    assert server.chat_requests == len(QUESTIONS) and len(set(first)) == len(QUESTIONS)
    spent = engine.take_usage()
    assert (spent.calls, spent.cache_hits) == (len(QUESTIONS), 0)

    second = answer_all(engine, TASK.start_prompt, QUESTIONS)
    assert server.chat_requests == len(QUESTIONS)  # not one more request
    assert second == first  # the very replies, in question order
    spent = engine.take_usage()
    assert (spent.calls, spent.cache_hits, spent.prompt_tokens, spent.completion_tokens) == (0, len(QUESTIONS), 0, 0)

    scores = evaluate_prompt(engine, TASK, TASK.start_prompt, EXAMPLES)  # and scoring reads the same
    assert server.chat_requests == len(QUESTIONS) and scores.total == len(EXAMPLES)
    assert engine.usage.cache_hits == len(EXAMPLES)


@pytest.mark.parametrize("change", ["temperature", "model", "max_tokens", "prompt", "question"])
def test_anything_that_changes_the_reply_misses_the_cache(server: FaultyLLMServer, tmp_path: Path,
                                                          change: str) -> None:
    cache = tmp_path / "replies.sqlite"
    cached_engine(server.url, cache).generate(QUESTIONS[0], system_prompt="prompt A")
    assert server.chat_requests == 1
    overrides = {"temperature": {"temperature": 0.7}, "model": {"model": "m2"},
                 "max_tokens": {"max_tokens": 64}}.get(change, {})
    engine = cached_engine(server.url, cache, **overrides)
    system = "prompt B" if change == "prompt" else "prompt A"
    question = QUESTIONS[1] if change == "question" else QUESTIONS[0]
    reply = engine.generate(question, system_prompt=system)
    assert server.chat_requests == 2 and "request 2" in reply
    assert engine.usage.cache_hits == 0 and engine.usage.calls == 1


def test_the_cache_outlives_the_engine_and_the_process_state(server: FaultyLLMServer, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "nested" / "replies.sqlite"  # missing folders are made
    first = answer_all(cached_engine(server.url, cache), TASK.start_prompt, QUESTIONS)
    assert cache.is_file()
    monkeypatch.setattr(response_cache, "_open", {})  # as in a new process: the file is opened afresh
    engine = cached_engine(server.url, cache)
    assert answer_all(engine, TASK.start_prompt, QUESTIONS) == first
    assert server.chat_requests == len(QUESTIONS)
    assert engine.usage.cache_hits == len(QUESTIONS)
    with sqlite3.connect(cache) as db:  # and it is an ordinary SQLite file with one row per reply
        assert db.execute("SELECT COUNT(*) FROM replies").fetchone()[0] == len(QUESTIONS)


def test_failed_calls_are_not_cached(server: FaultyLLMServer, tmp_path: Path) -> None:
    engine = cached_engine(server.url, tmp_path / "replies.sqlite")
    server.mode = "http400"
    with pytest.raises(LLMError):
        engine.generate("q", system_prompt="p")
    server.mode = "ok"
    assert "request 2" in engine.generate("q", system_prompt="p")
    assert engine.usage.cache_hits == 0 and engine.usage.errors == 1 and engine.usage.calls == 1


def test_without_a_cache_path_every_call_is_sent(server: FaultyLLMServer) -> None:
    engine = make_engine(endpoint(backend="openai", base_url=server.url, model="m", timeout=2.0))
    engine.generate("q", system_prompt="p")
    engine.generate("q", system_prompt="p")
    assert server.chat_requests == 2 and engine.usage.cache_hits == 0


def test_many_threads_share_one_cache_safely(server: FaultyLLMServer, tmp_path: Path) -> None:
    cache = tmp_path / "replies.sqlite"
    engines = [cached_engine(server.url, cache, concurrency=8) for _ in range(2)]
    jobs = [(engines[i % 2], f"question {i % 10}") for i in range(40)]

    def ask(job: tuple[ChatEngine, str]) -> str:
        return job[0].generate(job[1], system_prompt="p")

    with ThreadPoolExecutor(max_workers=16) as pool:
        replies = list(pool.map(ask, jobs))
    # a question asked before its first answer was stored may go out twice, never more often than asked
    assert 10 <= server.chat_requests <= 40
    assert sum(e.usage.calls + e.usage.cache_hits for e in engines) == 40
    before = server.chat_requests
    with ThreadPoolExecutor(max_workers=16) as pool:
        again = list(pool.map(ask, jobs))
    assert server.chat_requests == before  # all answered from the cache now
    stored = {job[1]: reply for job, reply in zip(jobs, again)}
    assert all(stored[job[1]] == reply for job, reply in zip(jobs, again))
    assert len(set(again)) == 10 and set(again) <= set(replies)


def evaluate(run_config: dict, node_config: dict) -> EvalReply:
    """A client's answer to a validation request, as the ClientApp calls it in Flower's simulation (where
    the run config may name the cache; a deployed site names its own)."""
    reply = answer(run_config, node_config,
                   RoundRequest(phase=Phase.EVALUATE.value, server_round=1, prompt=TASK.start_prompt), pinned=False)
    assert isinstance(reply, EvalReply)
    return reply


def test_a_client_evaluation_reads_the_cache_named_in_the_run_config(tmp_path: Path) -> None:
    config = default_run_config(**{"llm-cache-path": str(tmp_path / "sim-replies.sqlite")})
    node = {"partition-id": 0, "num-partitions": 3}
    first = evaluate(config, node)
    second = evaluate(config, node)
    assert first.usage.calls == first.scores.total > 0 and first.usage.cache_hits == 0
    assert second.usage.calls == 0 and second.usage.cache_hits == second.scores.total
    assert (second.scores.correct, second.scores.malformed) == (first.scores.correct, first.scores.malformed)


# --- a cache path that cannot be used is a configuration error naming the setting --------------

def unusable_paths(tmp_path: Path) -> dict[str, Path]:
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("not a folder\n")
    not_sqlite = tmp_path / "notes.sqlite"
    not_sqlite.write_text("these are my notes, not a database\n" * 100)
    a_dir = tmp_path / "a-folder"
    a_dir.mkdir()
    return {"under a file": a_file / "replies.sqlite", "a folder": a_dir, "not SQLite": not_sqlite}


@pytest.mark.parametrize("case", ["under a file", "a folder", "not SQLite"])
def test_an_unusable_cache_path_is_a_config_error_naming_llm_cache_path(tmp_path: Path, case: str) -> None:
    path = unusable_paths(tmp_path)[case]
    settings = endpoint_settings({"llm-cache-path": str(path)}, "llm")
    with pytest.raises(ConfigError) as info:
        make_engine(settings)
    assert info.value.setting == "llm-cache-path"
    assert "'llm-cache-path'" in str(info.value) and str(path) in str(info.value)
    if case == "not SQLite":  # and a user's file is left as it was
        assert path.read_text().startswith("these are my notes")


def test_an_unusable_cache_path_fails_a_client_before_any_request(server: FaultyLLMServer, tmp_path: Path) -> None:
    path = unusable_paths(tmp_path)["under a file"]
    config = default_run_config(**{"llm-cache-path": str(path)})
    node = {"partition-id": 0, "num-partitions": 3, "llm-backend": "openai", "llm-base-url": server.url,
            "llm-model": "m"}
    with pytest.raises(ConfigError, match="'llm-cache-path'"):
        evaluate(config, node)
    assert server.chat_requests == 0


def test_cache_key_covers_every_input() -> None:
    base = ("openai", "http://127.0.0.1:1/v1", "m", 0.0, 512, [{"role": "user", "content": "q"}])
    key = cache_key(*base)
    assert key == cache_key(*base) and len(key) == 64
    variants = [
        ("sim",) + base[1:],
        base[:1] + ("http://127.0.0.1:2/v1",) + base[2:],
        base[:2] + ("m2",) + base[3:],
        base[:3] + (0.5,) + base[4:],
        base[:4] + (256,) + base[5:],
        base[:5] + ([{"role": "user", "content": "q2"}],),
    ]
    assert len({cache_key(*v) for v in variants} | {key}) == len(variants) + 1


def test_response_cache_round_trip(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "c.sqlite")
    assert cache.get("k") is None
    cache.put("k", "Answer: 3", 11, 7)
    assert cache.get("k") == ("Answer: 3", 11, 7)
    assert ResponseCache(tmp_path / "c.sqlite").get("k") == ("Answer: 3", 11, 7)  # another connection sees it
