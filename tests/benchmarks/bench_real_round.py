"""Real-model rounds: TextGrad's one-at-a-time feedback calls against the concurrent backward pass.

Two ``fedtextgrad serve`` servers, as a client node would have them: one answering the task
("forward", ``--model``) and one writing feedback and rewrites ("backward", ``--backward-model``;
it also merges, as the server's summariser). Two paths are compared:

- ``before``: TextGrad's own ``Variable.backward``, one feedback call after another
  (``LocalSettings.sequential_feedback``);
- ``after``: the concurrent backward pass (``local_training.backpropagate``).

Two phases: one centralized local phase (one client holding all training examples, ``--steps``
steps of ``--batch-size``) and one homogeneous round (``--clients`` clients at once, each its
local steps and the validation of its prompt, then the merge). Per repeat, every phase runs on
each path, each time on freshly started servers (no path inherits the other's prompt cache), the
two paths of a phase one after the other in alternating order. Printed per phase and path:
wall time, seconds per local step, LLM calls, prompt/completion tokens, each server's busy
slots (``GET /slots`` sampled every ``--sample-every`` s: mean over the phase, mean while busy,
peak) and prompt-cache reuse (llama.cpp's own counters ``prompt_tokens_cached_total`` and
``prompt_tokens_total`` from ``/metrics``: the share of prompt tokens the server did not
recompute), the CPU time each server process used (the work it did, whatever else competed for
the cores) and the machine's load. Then medians over the repeats, after/before ratios, and the
feedback server's own throughput at 1, ``--batch-size`` and ``--parallel`` requests in flight,
measured in the same run by bench_llama_server (same model, threads, slots, context, max tokens;
its prompt is a real feedback request of this run), and the step time the issue asks for:
before / that gain. Last, the feedback calls' own wall time per step against before's divided by
the gain, and the best step that side by side feedback calls can give (``whole_step_reach``).

``--one-server`` points the answering engine at the feedback server too, as a site with one server
has it (its figures then appear under both names). ``--backward-server vllm`` makes the feedback
server a real vLLM (``deploy/vllm-cpu.sh``, SmolLM2 converted for it, float32 on this CPU): a server
whose throughput grows with requests in flight, which a one-thread llama.cpp server on this CPU does
not. Its busy requests come from ``vllm:num_requests_running`` and its cache reuse from
``vllm:prefix_cache_hits`` over ``vllm:prefix_cache_queries`` (tokens), both in its ``/metrics``.

Clients run as threads of this process, so they share the per-endpoint limit
``llm-concurrency`` (set to ``--parallel``, the servers' slots); simulated ClientApps would each
have their own. The reply cache is off. Not a timed test: a shared machine moves these figures.

    python -m tests.benchmarks.bench_real_round                                 # SmolLM2-135M on both servers
    python -m tests.benchmarks.bench_real_round --phases local --backward-server vllm   # vLLM writes feedback
    python -m tests.benchmarks.bench_real_round --model qwen0.5b.gguf --backward-model qwen1.5b.gguf --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from fedtextgrad_core.data.partitioning import client_data
from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.llm.engine import ChatEngine, Usage, make_engine
from fedtextgrad_core.llm.textgrad_adapter import tg
from fedtextgrad_core.method.evaluation import evaluate_prompt
from fedtextgrad_core.method.local_training import LocalResult, train_prompt
from fedtextgrad_core.method.merging import merge_prompts
from fedtextgrad_core.run.settings import RunSettings
from fedtextgrad_core.tools.serve import ServedModel, start_server
from tests.benchmarks.bench_llama_server import bench_levels, bench_one_server
from tests.support.llama_server import missing_requirement
from tests.support.vllm_server import missing_requirement as vllm_missing
from tests.support.vllm_server import start_vllm_server

HERE = Path(__file__).resolve().parent
SHARED_BBH = HERE.parents[2] / "shared" / "data" / "bbh"
BACKWARD_SYSTEM = tg.autograd.llm_backward_prompts.BACKWARD_SYSTEM_PROMPT
OPTIMIZER_MARK = "improves text (i.e., variable)"
PATHS = ("before", "after")


# --------------------------------------------------------------------------- the servers' own counters


@dataclass
class BenchServer:
    """One server of a cell, whichever program serves it: ``serve`` (llama.cpp) or ``vllm``."""

    base_url: str
    kind: str
    pids: Callable[[], list[int]]  # the processes doing its work (vLLM's engine core is a child process)
    stop: Callable[[], object]

    @property
    def origin(self) -> str:
        return self.base_url.rsplit("/v1", 1)[0]


def llama_server(model: str, alias: str, args: argparse.Namespace) -> BenchServer:
    extra = [arg for param in ["endpoint_metrics=true", *args.llama_param] for arg in ("--llama-param", param)]
    served: ServedModel = start_server(model, parallel=args.parallel, threads=args.threads, ctx=args.ctx,
                                       alias=alias, quiet=True, extra_args=extra)
    return BenchServer(served.base_url, "serve", lambda: [served.pid], served.stop)


def vllm_server(alias: str, folder: Path) -> BenchServer:
    served = start_vllm_server(folder, name=alias)
    return BenchServer(served.base_url, "vllm", served.pids, served.stop)


def metric_sums(text: str, prefix: str) -> dict[str, float]:
    """Prometheus lines under ``prefix``, summed over their labels, by name without the prefix."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, _, value = line.rpartition(" ")
            key = name.split("{", 1)[0].removeprefix(prefix)
            values[key] = values.get(key, 0.0) + float(value)
    return values


def busy_now(client: httpx.Client, server: BenchServer) -> int:
    if server.kind == "vllm":
        return round(metric_sums(client.get(f"{server.origin}/metrics").text, "vllm:")["num_requests_running"])
    return sum(bool(slot.get("is_processing")) for slot in client.get(f"{server.origin}/slots").json())


class SlotSampler:
    """Samples how many requests each server is processing, every ``every`` seconds, in a thread."""

    def __init__(self, servers: dict[str, BenchServer], every: float):
        self.servers, self.every = servers, every
        self.samples: dict[str, list[tuple[float, int]]] = {name: [] for name in servers}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slot-sampler", daemon=True)
        self._client = httpx.Client(timeout=5.0)

    def __enter__(self) -> SlotSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, server in self.servers.items():
                try:
                    busy = busy_now(self._client, server)
                except (httpx.HTTPError, ValueError, KeyError):
                    continue
                self.samples[name].append((time.monotonic(), busy))
            self._stop.wait(self.every)

    def busy(self, name: str, start: float, end: float) -> dict[str, float]:
        counts = [n for t, n in self.samples[name] if start <= t <= end]
        busy = [n for n in counts if n]
        return {"mean": statistics.fmean(counts) if counts else 0.0,
                "mean_when_busy": statistics.fmean(busy) if busy else 0.0,
                "peak": max(counts, default=0), "share_2_or_more": sum(n >= 2 for n in counts) / len(counts)
                if counts else 0.0, "samples": len(counts)}

    def busy_during(self, name: str, spans: list[tuple[float, float]]) -> float:
        """Mean busy requests over the samples taken while one of ``spans`` was open."""
        counts = [n for t, n in self.samples[name] if any(s <= t <= e for s, e in spans)]
        return statistics.fmean(counts) if counts else 0.0


def counters(server: BenchServer) -> dict[str, float]:
    """Prompt tokens the server computed and took from its cache so far, from its ``/metrics``
    (llama.cpp runs with ``endpoint_metrics=true``; vLLM counts cache queries and hits in tokens)."""
    text = httpx.get(f"{server.origin}/metrics", timeout=10.0).text
    if server.kind == "vllm":
        values = metric_sums(text, "vllm:")
        hits = values["prefix_cache_hits_total"]
        return {"computed": values["prefix_cache_queries_total"] - hits, "cached": hits}
    values = metric_sums(text, "llamacpp:")
    return {"computed": values["prompt_tokens_total"], "cached": values["prompt_tokens_cached_total"]}


def cache_reuse(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    computed, cached = after["computed"] - before["computed"], after["cached"] - before["cached"]
    return {"prompt_tokens_computed": computed, "prompt_tokens_cached": cached,
            "cached_share": cached / (computed + cached) if computed + cached else 0.0}


# --------------------------------------------------------------------------- what the client sent


@dataclass
class Sent:
    """Every request an engine sent: kind, start, end (for the feedback prompt of the server bench)."""

    calls: list[tuple[str, float, float]] = field(default_factory=list)
    feedback_request: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def watch(self, engine: ChatEngine) -> ChatEngine:
        engine._chat = _Watched(engine._chat, self)  # the backend's chat function, seen at each request
        return engine

    def saw(self, messages: list[dict[str, str]], start: float) -> None:
        system = messages[0]["content"]
        kind = "feedback" if system == BACKWARD_SYSTEM else "rewrite" if OPTIMIZER_MARK in system else "other"
        with self.lock:
            self.calls.append((kind, start, time.monotonic()))
            if kind == "feedback" and not self.feedback_request:
                self.feedback_request = f"{system}\n\n{messages[1]['content']}"


class _Watched:
    """A chat function that tells ``sent`` about each request; anything else (its server ``kind``,
    which decides the optimizer's constraint) is the wrapped function's."""

    def __init__(self, chat: Any, sent: Sent):
        self._inner, self._sent = chat, sent

    def __call__(self, messages: list[dict[str, str]], *args: Any) -> tuple[str, int, int]:
        start = time.monotonic()
        try:
            return self._inner(messages, *args)
        finally:
            self._sent.saw(messages, start)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def spans_of(calls: list[tuple[str, float, float]], kind: str) -> list[tuple[float, float]]:
    return sorted((s, e) for k, s, e in calls if k == kind)


def covered(spans: list[tuple[float, float]]) -> float:
    """Seconds during which at least one of ``spans`` was open: the wall time a phase of calls took."""
    total, reach = 0.0, float("-inf")
    for s, e in sorted(spans):
        lo = max(s, reach)
        if e > lo:
            total += e - lo
        reach = max(reach, e)
    return total


def in_flight(spans: list[tuple[float, float]]) -> float:
    """Mean calls in flight while at least one of ``spans`` was (client side)."""
    wall = covered(spans)
    return sum(e - s for s, e in spans) / wall if wall else 0.0


def whole_step_reach(before_feedback: float, rest: float, gain: float, within: float = 1.1) -> dict[str, float]:
    """What running the feedback calls side by side can and cannot give a step.

    Only the feedback calls overlap; the rest of a step (the answers, already sent side by side on
    both paths, the one rewrite, the rescoring) takes as long on both paths. So the concurrent step
    is at least ``rest + before_feedback / gain``, while the goal "within ``within`` of the
    sequential step / gain" asks for ``within * (rest + before_feedback) / gain``: it can be met
    only while ``rest`` is at most ``(within - 1) * before_feedback / (gain - within)``.
    """
    bound = rest + before_feedback / gain
    goal = (rest + before_feedback) / gain
    most_rest = (within - 1) * before_feedback / (gain - within) if gain > within else float("inf")
    return {"bound": bound, "goal": goal, "bound_over_goal": bound / goal, "most_rest": most_rest}


def mean_seconds(calls: list[tuple[str, float, float]]) -> dict[str, float]:
    kinds = sorted({k for k, _, _ in calls})
    return {k: statistics.fmean(e - s for kind, s, e in calls if kind == k) for k in kinds}


# --------------------------------------------------------------------------- one phase


@dataclass
class PhaseResult:
    phase: str
    path: str
    repeat: int
    seconds: float
    steps: int
    step_seconds: float  # local phase: its seconds over its steps; round: the slowest client's
    calls: int
    prompt_tokens: int
    completion_tokens: int
    accepted: int
    reverted: int
    busy: dict[str, dict[str, float]]
    cache: dict[str, dict[str, float]]
    feedback_in_flight: float  # client side: mean feedback calls in flight while any was
    prompts: list[str]
    call_seconds: dict[str, float] = field(default_factory=dict)  # client side: mean seconds per call, by kind
    load_1min: tuple[float, float] = (0.0, 0.0)  # the machine's load average at the start and the end
    server_cpu_seconds: dict[str, float] = field(default_factory=dict)  # CPU time each server process used
    feedback_seconds: float = 0.0  # client side: wall time while at least one feedback call was in flight
    feedback_busy: float = 0.0  # the feedback server's busy requests, mean over samples while feedback was asked


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of a server's processes so far (Linux /proc): the work it did, whatever
    else competed for the cores meanwhile."""
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _usage_of(result: LocalResult) -> Usage:
    m = result.metrics
    return Usage(calls=m.llm_calls, prompt_tokens=m.prompt_tokens, completion_tokens=m.completion_tokens)


@contextmanager
def measured(phase: str, path: str, repeat: int, servers: dict[str, BenchServer], sampler: SlotSampler,
             sent: Sent, out: list[PhaseResult]) -> Iterator[dict[str, Any]]:
    """Time a phase and read the servers' counters around it; the body fills ``acc``."""
    before = {name: counters(server) for name, server in servers.items()}
    first_call = len(sent.calls)
    acc: dict[str, Any] = {"usage": Usage(), "steps": 0, "step_seconds": 0.0, "accepted": 0, "reverted": 0,
                           "prompts": []}
    load = os.getloadavg()[0]
    pids = {name: server.pids() for name, server in servers.items()}
    cpu = {name: cpu_seconds(pids[name]) for name in servers}
    start = time.monotonic()
    yield acc
    end = time.monotonic()
    cpu = {name: cpu_seconds(pids[name]) - cpu[name] for name in servers}
    time.sleep(sampler.every)  # one more sample past the end
    usage: Usage = acc["usage"]
    feedback = spans_of(sent.calls[first_call:], "feedback")
    result = PhaseResult(
        phase=phase, path=path, repeat=repeat, seconds=end - start, steps=acc["steps"],
        step_seconds=acc["step_seconds"], calls=usage.calls, prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens, accepted=acc["accepted"], reverted=acc["reverted"],
        busy={name: sampler.busy(name, start, end) for name in servers},
        cache={name: cache_reuse(before[name], counters(server)) for name, server in servers.items()},
        feedback_in_flight=in_flight(feedback), prompts=acc["prompts"],
        call_seconds=mean_seconds(sent.calls[first_call:]), load_1min=(load, os.getloadavg()[0]),
        server_cpu_seconds=cpu, feedback_seconds=covered(feedback),
        feedback_busy=sampler.busy_during("backward", feedback))
    out.append(result)
    print("  " + row(result), flush=True)


PHASES = ("local", "round")


def phase_name(phase: str, args: argparse.Namespace) -> str:
    return "centralized local phase" if phase == "local" else f"homogeneous round ({args.clients} clients)"


def run_cell(args: argparse.Namespace, phase: str, path: str, repeat: int, out: list[PhaseResult]) -> str:
    """One phase of one path on freshly started servers; returns a feedback request it sent (for the
    server bench)."""
    servers: dict[str, BenchServer] = {}
    state = tempfile.TemporaryDirectory(prefix="bench-real-round-")
    try:
        servers["backward"] = (vllm_server("backward", Path(state.name)) if args.backward_server == "vllm"
                               else llama_server(args.backward_model, "backward", args))
        servers["forward"] = servers["backward"] if args.one_server else llama_server(args.model, "forward", args)
        config = {"task": args.task, "data-source": args.data_source, "seed": args.seed,
                  "local-steps": args.steps, "batch-size": args.batch_size, "max-val-examples": args.val_examples,
                  "llm-backend": "openai", "llm-base-url": servers["forward"].base_url,
                  "llm-model": "backward" if args.one_server else "forward",
                  "backward-base-url": servers["backward"].base_url, "backward-model": "backward",
                  "llm-concurrency": args.parallel, "llm-max-tokens": args.max_tokens,
                  "llm-temperature": 0.0, "server-backend": "openai",
                  "server-base-url": servers["backward"].base_url, "server-model": "backward"}
        settings = RunSettings.from_config(config)
        local = replace(settings.local, sequential_feedback=path == "before")
        task = get_task(args.task)
        sent = Sent()

        def engines() -> tuple[ChatEngine, ChatEngine]:
            return (sent.watch(make_engine(settings.forward)),
                    sent.watch(make_engine(settings.backward, "backward-api-key-env")))

        def train(data: Any, stream: str) -> LocalResult:
            forward, backward = engines()
            return train_prompt(settings.start_prompt, task, data.train, forward, backward, local, stream=stream,
                                format_instruction=settings.format_instruction)

        def add(acc: dict[str, Any], result: LocalResult) -> None:
            acc["usage"].add(_usage_of(result))
            acc["steps"] += result.metrics.steps
            acc["step_seconds"] = max(acc["step_seconds"], result.metrics.seconds / result.metrics.steps)
            acc["accepted"] += result.metrics.steps_accepted
            acc["reverted"] += result.metrics.steps_reverted
            acc["prompts"].append(result.prompt)

        source = {"source": args.data_source, "seed": args.seed, "val_limit": args.val_examples}
        with SlotSampler(servers, args.sample_every) as sampler:
            if phase == "local":
                central = client_data("centralized", [args.task], 0, 1, **source)
                with measured(phase_name(phase, args), path, repeat, servers, sampler, sent, out) as acc:
                    add(acc, train(central, "bench:centralized"))
                return sent.feedback_request

            with measured(phase_name(phase, args), path, repeat, servers, sampler, sent, out) as acc:
                results: dict[int, tuple[LocalResult, Usage]] = {}
                failures: list[BaseException] = []

                def client(i: int) -> None:
                    try:
                        data = client_data("homogeneous", [args.task], i, args.clients, **source)
                        result = train(data, f"round1:client{i}")
                        scorer = make_engine(settings.forward)
                        evaluate_prompt(scorer, task, result.prompt, data.val, local.parser)
                        results[i] = (result, scorer.take_usage())
                    except BaseException as exc:  # reported below, with the others' results
                        failures.append(exc)

                threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                if failures:
                    raise failures[0]
                for i in sorted(results):
                    result, val_usage = results[i]
                    add(acc, result)
                    acc["usage"].add(val_usage)
                merger = make_engine(settings.server, "server-api-key-env")
                merged = merge_prompts([results[i][0].prompt for i in sorted(results)], settings.merge,
                                       settings.format_instruction, engine=merger,
                                       token_budget=settings.merge_token_budget)
                acc["usage"].add(merger.take_usage())
                acc["prompts"].append(merged.prompt)
        return sent.feedback_request
    finally:
        for server in {id(server): server for server in servers.values()}.values():
            server.stop()
        state.cleanup()


# --------------------------------------------------------------------------- report


def row(r: PhaseResult) -> str:
    f, b = r.busy["forward"], r.busy["backward"]
    return (f"{r.phase:<28} {r.path:<6} #{r.repeat}  {r.seconds:7.1f} s  {r.step_seconds:6.1f} s/step  "
            f"{r.calls:4d} calls  {r.prompt_tokens:7d}/{r.completion_tokens:6d} tok  "
            f"busy slots fwd {f['mean']:.2f} ({f['mean_when_busy']:.2f} busy, peak {f['peak']})  "
            f"bwd {b['mean']:.2f} ({b['mean_when_busy']:.2f} busy, peak {b['peak']})  "
            f"feedback in flight {r.feedback_in_flight:.2f} for {r.feedback_seconds:.1f} s "
            f"(feedback server busy {r.feedback_busy:.2f} meanwhile)  "
            f"cached prompt tokens fwd {r.cache['forward']['cached_share']:.0%} "
            f"bwd {r.cache['backward']['cached_share']:.0%}  kept {r.accepted} reverted {r.reverted}  s/call "
            + " ".join(f"{kind} {seconds:.1f}" for kind, seconds in r.call_seconds.items())
            + f"  server CPU s fwd {r.server_cpu_seconds.get('forward', 0):.0f} bwd "
            f"{r.server_cpu_seconds.get('backward', 0):.0f}  load {r.load_1min[0]:.1f}>{r.load_1min[1]:.1f}")


def medians(results: list[PhaseResult]) -> list[dict[str, Any]]:
    summary = []
    for phase in dict.fromkeys(r.phase for r in results):
        line: dict[str, Any] = {"phase": phase}
        for path in PATHS:
            mine = [r for r in results if r.phase == phase and r.path == path]
            if not mine:
                continue
            line[path] = {
                "seconds": statistics.median(r.seconds for r in mine),
                "step_seconds": statistics.median(r.step_seconds for r in mine),
                "calls": statistics.median(r.calls for r in mine),
                "prompt_tokens": statistics.median(r.prompt_tokens for r in mine),
                "completion_tokens": statistics.median(r.completion_tokens for r in mine),
                "backward_busy": statistics.median(r.busy["backward"]["mean"] for r in mine),
                "backward_busy_when_busy": statistics.median(r.busy["backward"]["mean_when_busy"] for r in mine),
                "forward_busy": statistics.median(r.busy["forward"]["mean"] for r in mine),
                "feedback_in_flight": statistics.median(r.feedback_in_flight for r in mine),
                # a local phase's feedback wall time per step, and what is left of its step
                "feedback_step_seconds": statistics.median(r.feedback_seconds / max(r.steps, 1) for r in mine),
                "rest_step_seconds": statistics.median(r.step_seconds - r.feedback_seconds / max(r.steps, 1)
                                                       for r in mine),
                "feedback_busy": statistics.median(r.feedback_busy for r in mine),
                "backward_cached_share": statistics.median(r.cache["backward"]["cached_share"] for r in mine),
                "forward_cached_share": statistics.median(r.cache["forward"]["cached_share"] for r in mine),
                "backward_cpu_seconds": statistics.median(r.server_cpu_seconds["backward"] for r in mine),
                "forward_cpu_seconds": statistics.median(r.server_cpu_seconds["forward"] for r in mine),
                "feedback_call_seconds": statistics.median(r.call_seconds.get("feedback", 0.0) for r in mine),
                "load_1min": statistics.median(statistics.fmean(r.load_1min) for r in mine),
                "repeats": len(mine)}
        if "before" in line and "after" in line:
            line["seconds_after_over_before"] = line["after"]["seconds"] / line["before"]["seconds"]
            line["step_after_over_before"] = line["after"]["step_seconds"] / line["before"]["step_seconds"]
        summary.append(line)
    return summary


def server_gain(args: argparse.Namespace, prompt: str) -> dict[str, Any]:
    """The feedback server's own tokens/s at 1, batch and parallel requests in flight (bench_llama_server)."""
    levels = sorted({1, args.batch_size, args.parallel})
    # a first, discarded level at full concurrency puts the prompt in every slot's cache, so no level
    # pays for its first requests' prompts and the others' not
    if args.backward_server == "vllm":
        with tempfile.TemporaryDirectory(prefix="bench-real-round-") as folder, \
                start_vllm_server(Path(folder), name="backward") as vllm:
            rows = bench_levels(vllm.base_url, "backward", args.parallel, [args.parallel, *levels],
                                args.bench_requests, args.max_tokens, prompt)[1:]
    else:
        rows = bench_one_server(args.backward_model, args.parallel, args.threads, args.ctx, [args.parallel, *levels],
                                args.bench_requests, args.max_tokens, prompt, args.llama_param)[1:]
    by_level = {r["concurrency"]: r["completion_tokens_per_s"] for r in rows}
    one = by_level.get(1) or 0.0
    return {"rows": rows, "tokens_per_s": by_level,
            "gain": {level: (value / one if one and value else None) for level, value in by_level.items()}}


def report(args: argparse.Namespace, results: list[PhaseResult], gain: dict[str, Any] | None) -> dict[str, Any]:
    summary = medians(results)
    print(f"\nmedians over {args.repeats} repeat(s); forward {args.model}, backward {args.backward_model}, "
          f"{args.parallel} slots x {args.ctx} ctx, {args.threads} thread(s) per server, max_tokens {args.max_tokens}, "
          f"task {args.task} ({args.data_source}), batch {args.batch_size}, {args.steps} steps, {os.cpu_count()} CPUs, "
          f"llama params {args.llama_param or 'default'}")
    for line in summary:
        print(f"{line['phase']}:")
        for path in PATHS:
            if path in line:
                m = line[path]
                print(f"  {path:<6} {m['seconds']:7.1f} s, {m['step_seconds']:6.1f} s/step, {m['calls']:.0f} calls, "
                      f"{m['prompt_tokens']:.0f}/{m['completion_tokens']:.0f} tok, feedback server busy slots "
                      f"{m['backward_busy']:.2f} ({m['backward_busy_when_busy']:.2f} while busy), answering server "
                      f"{m['forward_busy']:.2f}, feedback calls in flight {m['feedback_in_flight']:.2f}, cached prompt "
                      f"tokens: feedback server {m['backward_cached_share']:.0%}, answering server "
                      f"{m['forward_cached_share']:.0%}; server CPU s feedback {m['backward_cpu_seconds']:.0f}, "
                      f"answering {m['forward_cpu_seconds']:.0f}; s per feedback call {m['feedback_call_seconds']:.1f}; "
                      f"load {m['load_1min']:.1f}")
                if line["phase"] == "centralized local phase":
                    print(f"         per step: feedback calls {m['feedback_step_seconds']:.1f} s (feedback server busy "
                          f"{m['feedback_busy']:.2f} meanwhile), the rest {m['rest_step_seconds']:.1f} s")
        if "seconds_after_over_before" in line:
            print(f"  after/before: wall {line['seconds_after_over_before']:.2f}x, "
                  f"step {line['step_after_over_before']:.2f}x")
    target = feedback_target = reach = realised = None
    if gain is not None:
        print(f"feedback server alone ({args.backward_server}, same settings, a feedback request of this run as prompt): "
              + ", ".join(f"{level} in flight {tps:.1f} tok/s" for level, tps in gain["tokens_per_s"].items() if tps))
        batch_gain = gain["gain"].get(args.batch_size)
        local = next((line for line in summary if line["phase"] == "centralized local phase"), None)
        if batch_gain and local and "before" in local and "after" in local:
            target = local["before"]["step_seconds"] / batch_gain
            before, after = local["before"], local["after"]
            print(f"gain at {args.batch_size} in flight: {batch_gain:.2f}x; target step (before / gain) {target:.1f} s; "
                  f"after {after['step_seconds']:.1f} s = {after['step_seconds'] / target:.2f}x target")
            feedback_target = before["feedback_step_seconds"] / batch_gain
            reach = whole_step_reach(before["feedback_step_seconds"], after["rest_step_seconds"], batch_gain)
            print(f"feedback calls per step: before {before['feedback_step_seconds']:.1f} s / gain = "
                  f"{feedback_target:.1f} s; after {after['feedback_step_seconds']:.1f} s = "
                  f"{after['feedback_step_seconds'] / feedback_target:.2f}x that")
            if after["feedback_call_seconds"]:
                realised = after["feedback_in_flight"] * before["feedback_call_seconds"] / after["feedback_call_seconds"]
                print(f"the feedback server's gain on this run's own feedback calls: {after['feedback_in_flight']:.2f} "
                      f"in flight x {before['feedback_call_seconds']:.1f} s per call one at a time / "
                      f"{after['feedback_call_seconds']:.1f} s side by side = {realised:.2f}x")
            print(f"side by side feedback can at best give a step of {reach['bound']:.1f} s (after's rest + before's "
                  f"feedback / gain) = {reach['bound_over_goal']:.2f}x target; within 1.1x needs the rest at most "
                  f"{reach['most_rest']:.1f} s, after's is {after['rest_step_seconds']:.1f} s")
    return {"benchmark": "real_round", "args": vars(args), "cpus": os.cpu_count(), "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": [asdict(r) for r in results],
            "medians": summary, "server_gain": gain, "target_step_seconds": target,
            "feedback_target_step_seconds": feedback_target, "whole_step_reach": reach,
            "feedback_gain_on_own_calls": realised}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="the answering model: a GGUF file, or smollm2 (default)")
    parser.add_argument("--backward-model", default="", help="the feedback model (default: --model)")
    parser.add_argument("--backward-server", choices=("serve", "vllm"), default="serve",
                        help="what serves the feedback model: serve (llama.cpp, --backward-model; the default) or vllm "
                             "(a real vLLM on SmolLM2, deploy/vllm-cpu.sh; installed and converted beforehand)")
    parser.add_argument("--one-server", action="store_true",
                        help="the feedback server answers the task too, as at a site with one server (--model unused)")
    parser.add_argument("--threads", type=int, default=1, help="threads per server (default 1: two servers, 2 cores)")
    parser.add_argument("--parallel", type=int, default=4, help="slots per server, and llm-concurrency (default 4)")
    parser.add_argument("--ctx", type=int, default=4096, help="context per slot (default 4096)")
    parser.add_argument("--max-tokens", type=int, default=192, help="llm-max-tokens (default 192)")
    parser.add_argument("--task", default="word_sorting")
    parser.add_argument("--data-source", default=str(SHARED_BBH) if SHARED_BBH.is_dir() else "synthetic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--val-examples", type=int, default=12, help="max-val-examples (default 12: 4 per client)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paths", default="before,after", help="which paths to run (default before,after)")
    parser.add_argument("--phases", default="local,round", help="which phases to run (default local,round)")
    parser.add_argument("--sample-every", type=float, default=0.5, help="seconds between /slots samples")
    parser.add_argument("--bench-requests", type=int, default=12, help="requests per level of the server bench; 0: none")
    parser.add_argument("--llama-param", action="append", default=[], metavar="NAME=VALUE",
                        help="passed to both servers and the server bench, e.g. n_batch=256 (repeatable)")
    parser.add_argument("--out", default=str(HERE / "bench_real_round.json"), help="JSON results ('' for none)")
    args = parser.parse_args(argv)
    args.backward_model = args.backward_model or args.model
    reason = missing_requirement() or (vllm_missing() if args.backward_server == "vllm" else "")
    if reason:
        raise SystemExit(f"cannot run real models here: {reason}")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    paths = [p for p in args.paths.split(",") if p]
    results: list[PhaseResult] = []
    feedback_prompt = ""
    phases = [p for p in args.phases.split(",") if p]
    flip = False
    for repeat in range(1, args.repeats + 1):
        for phase in phases:
            # the two paths of a phase one after the other, their order alternating: the machine's load
            # drifts (other people's work), and so compared cells are minutes apart, not an hour
            for path in (paths[::-1] if flip else paths):
                print(f"repeat {repeat}, {phase_name(phase, args)}, {path} ...", flush=True)
                feedback_prompt = run_cell(args, phase, path, repeat, results) or feedback_prompt
            flip = not flip
    gain = server_gain(args, feedback_prompt) if args.bench_requests and feedback_prompt else None
    result = report(args, results, gain)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"written: {args.out}")
    return result


if __name__ == "__main__":
    main()
