"""The ``sim`` backend: the simulated LLM as a chat function, registered in pyproject.toml.

The engine finds it through the ``fedtextgrad.backends`` entry point group, so nothing in
the core's stack imports the simulator.
"""

from __future__ import annotations

from fedtextgrad_core.llm.endpoint import EndpointSettings
from fedtextgrad_core.llm.engine import ChatFn
from fedtextgrad_core.sim.model import SimLLM, approx_tokens


def sim_chat(settings: EndpointSettings, key_setting: str = "") -> ChatFn:
    """``messages -> (reply, prompt tokens, completion tokens)`` answered by the simulator."""
    sim = SimLLM(latency_ms=settings.sim_latency_ms)

    def chat(messages: list[dict[str, str]], constraint: object = None) -> tuple[str, int, int]:
        # a constraint asks for the <IMPROVED_VARIABLE> shape, which the simulator writes anyway
        reply = sim.complete(messages)
        prompt_tokens = sum(approx_tokens(m["content"]) for m in messages)
        return reply, prompt_tokens, approx_tokens(reply)

    return chat
