"""Merging client prompts: concat, summarize and summarize-uid (with the real sim engine),
and the safety nets when a summariser misbehaves (scripted engines)."""

from __future__ import annotations

import logging

import pytest

from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.llm import ChatEngine, EndpointSettings, make_engine
from fedtextgrad_core.merging import MERGE_METHODS, MERGE_REQUEST, UID_REQUEST, check_method, merge_prompts
from fedtextgrad_core.sim_llm import CATALOGUE, insert_instruction, instructions_in
from fedtextgrad_core.tasks import get_task

TASK = get_task("object_counting")
FORMAT = TASK.format_instruction
LEARNED = CATALOGUE["object_counting"]  # three distinct instructions


def client_prompts() -> list[str]:
    """Three client prompts, each the start prompt plus a different learned instruction."""
    prompts = [insert_instruction(TASK.start_prompt, ins.sentence) for ins in LEARNED]
    assert [instructions_in(p, TASK.name) for p in prompts] == [[ins.id] for ins in LEARNED]
    return prompts


def scripted(reply: str, seen: list[list[dict[str, str]]] | None = None) -> ChatEngine:
    def chat(messages: list[dict[str, str]]) -> tuple[str, int, int]:
        if seen is not None:
            seen.append(messages)
        return reply, 10, 5
    return ChatEngine(EndpointSettings(), chat)


def ends_with_format_once(prompt: str) -> bool:
    return prompt.endswith(FORMAT) and prompt.count(FORMAT) == 1


def test_concat_keeps_every_clients_instructions_in_order() -> None:
    prompts = client_prompts()
    result = merge_prompts(prompts, "concat", FORMAT)
    assert result.method == "concat" and not result.fallback_reason
    assert instructions_in(result.prompt, TASK.name) == [ins.id for ins in LEARNED]
    positions = [result.prompt.index(ins.sentence) for ins in LEARNED]
    assert positions == sorted(positions)
    assert ends_with_format_once(result.prompt)


def test_concat_needs_no_engine_and_deduplicates_the_format_only() -> None:
    prompts = [f"Be careful. {FORMAT}", f"{FORMAT} Be thorough."]
    result = merge_prompts(prompts, "concat", FORMAT)
    assert result.prompt == f"Be careful. Be thorough. {FORMAT}"


def test_summarize_uid_keeps_all_instructions_with_the_sim() -> None:
    engine = make_engine(EndpointSettings())
    result = merge_prompts(client_prompts(), "summarize-uid", FORMAT, engine)
    assert result.method == "summarize-uid"
    assert result.fallback_reason == ""
    assert instructions_in(result.prompt, TASK.name) == [ins.id for ins in LEARNED]
    assert ends_with_format_once(result.prompt)
    # The opening sentence, shared by all three clients, is kept once.
    assert result.prompt.count("Think step by step.") == 1
    assert engine.take_usage().calls == 1


def test_plain_summarize_loses_an_instruction_with_the_sim() -> None:
    engine = make_engine(EndpointSettings())
    result = merge_prompts(client_prompts(), "summarize", FORMAT, engine)
    assert result.fallback_reason == ""
    kept = instructions_in(result.prompt, TASK.name)
    assert kept and len(kept) < len(LEARNED)
    assert ends_with_format_once(result.prompt)


def test_summariser_sees_the_format_and_keeping_it_is_not_a_repair() -> None:
    seen: list[list[dict[str, str]]] = []
    body = "Count carefully."
    engine = scripted(f"<PROMPT>{body} {FORMAT}</PROMPT>", seen)
    result = merge_prompts(client_prompts(), "summarize-uid", FORMAT, engine)
    assert result.prompt == f"{body} {FORMAT}"
    assert result.format_repaired is False
    request = seen[0][-1]["content"]
    assert UID_REQUEST in request
    # Every client prompt is shown ending with the instruction the request says to keep last.
    assert request.count(f"{FORMAT}</PROMPT>") == len(LEARNED)


def test_plain_summarize_request_has_no_uid_instruction() -> None:
    seen: list[list[dict[str, str]]] = []
    merge_prompts(client_prompts(), "summarize", FORMAT, scripted(f"Merged. {FORMAT}", seen))
    assert UID_REQUEST not in seen[0][-1]["content"]


def test_dropped_format_is_repaired() -> None:
    engine = scripted("Count carefully. Double-check the total.")
    result = merge_prompts(client_prompts(), "summarize", FORMAT, engine)
    assert result.format_repaired is True
    assert result.fallback_reason == ""
    assert result.prompt == f"Count carefully. Double-check the total. {FORMAT}"


def test_format_moved_to_the_middle_is_put_last_once() -> None:
    engine = scripted(f"Count carefully. {FORMAT} Double-check the total.")
    result = merge_prompts(client_prompts(), "summarize-uid", FORMAT, engine)
    assert result.prompt == f"Count carefully. Double-check the total. {FORMAT}"
    assert ends_with_format_once(result.prompt)


@pytest.mark.parametrize("reply, reason_word", [
    ("", "empty"), ("   \n ", "empty"), (FORMAT, "format"),
    (MERGE_REQUEST + " Count carefully. " + FORMAT, "echoed the merge request"),  # seen with SmolLM2
], ids=["empty", "blank", "format-only", "echoed-request"])
def test_useless_summary_falls_back_to_concat_with_a_logged_reason(
        reply: str, reason_word: str, caplog: pytest.LogCaptureFixture) -> None:
    prompts = client_prompts()
    with caplog.at_level(logging.WARNING, logger="fedtextgrad_core.merging"):
        result = merge_prompts(prompts, "summarize-uid", FORMAT, scripted(reply))
    assert result.prompt == merge_prompts(prompts, "concat", FORMAT).prompt
    assert reason_word in result.fallback_reason
    assert result.method == "summarize-uid"
    logged = [r for r in caplog.records if r.name == "fedtextgrad_core.merging" and r.levelno == logging.WARNING]
    assert len(logged) == 1 and result.fallback_reason in logged[0].getMessage()


def test_unknown_method_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        merge_prompts(client_prompts(), "average", FORMAT)
    message = str(info.value)
    assert "'merge'" in message and "'average'" in message
    assert all(method in message for method in MERGE_METHODS)
    assert check_method("concat") == "concat"


def test_llm_methods_need_an_engine_and_prompts_are_required() -> None:
    with pytest.raises(ValueError, match="needs an LLM engine"):
        merge_prompts(client_prompts(), "summarize", FORMAT, None)
    with pytest.raises(ValueError, match="no prompts"):
        merge_prompts([], "concat", FORMAT)
