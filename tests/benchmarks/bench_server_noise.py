"""How far an LLM server's own answers move at temperature 0, and what a deterministic set-up buys.

A server that batches the requests of several slots computes each reply in a batch whose make-up
depends on timing, and floating-point sums in another order give other logits: the same prompt on
the same examples scores differently from one run to the next. This script scores one prompt
``--repeats`` times on the same examples (the evaluation's own calls) in two set-ups of
``fedtextgrad serve`` (llama.cpp) on the same model file:

- ``batched``: ``--parallel`` slots and as many requests in flight (how a site serves a run);
- ``one slot``: one slot and one request at a time (llama.cpp's deterministic mode for evaluation).

Printed per set-up: each scoring's accuracy with its 95% interval, the examples whose reply text
and whose outcome changed at least once, the last scoring against the first (McNemar), and the
wall time. Not a timed test; the figures are docs/statistics.md's.

    python -m tests.benchmarks.bench_server_noise                       # SmolLM2-135M, 40 examples, 3 repeats
    python -m tests.benchmarks.bench_server_noise --model qwen1.5b.gguf --examples 60
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass

from fedtextgrad_core.data.synthetic import generate
from fedtextgrad_core.data.tasks import ANSWER_PARSERS, get_task
from fedtextgrad_core.llm.engine import make_engine
from fedtextgrad_core.method.evaluation import answer_all, score_replies
from fedtextgrad_core.stats import paired, wilson
from fedtextgrad_core.tools.serve import SMOLLM2, serving
from tests.support.settings_helpers import endpoint


@dataclass(frozen=True)
class Scoring:
    """One scoring's replies kept beside its outcomes: the reply text can change where the outcome does not."""

    ids: list[str]
    replies: list[str]
    correct: list[bool]

    def outcomes(self) -> dict[str, bool]:
        return dict(zip(self.ids, self.correct))


def score_repeatedly(base_url: str, alias: str, in_flight: int, args: argparse.Namespace
                     ) -> tuple[list[Scoring], float]:
    task = get_task(args.task)
    examples = generate(args.task, args.examples, seed=args.seed)
    engine = make_engine(endpoint(backend="openai", base_url=base_url, model=alias, concurrency=in_flight,
                                  max_tokens=args.max_tokens, timeout=600.0, max_retries=1))
    started = time.perf_counter()
    runs = []
    for _ in range(args.repeats):
        replies = answer_all(engine, task.start_prompt, [e.question for e in examples])
        correct = [right for right, _ in score_replies(task, replies, examples, args.parser)]
        runs.append(Scoring([e.id for e in examples], replies, correct))
    return runs, time.perf_counter() - started


def report(name: str, runs: list[Scoring], seconds: float) -> None:
    first = runs[0]
    n = len(first.replies)
    text_changed = sum(1 for i in range(n) if any(r.replies[i] != first.replies[i] for r in runs[1:]))
    outcome_changed = sum(1 for i in range(n) if any(r.correct[i] != first.correct[i] for r in runs[1:]))
    print(f"\n{name}: {len(runs)} scorings of {n} examples in {seconds:.0f} s")
    for number, scoring in enumerate(runs, 1):
        print(f"  scoring {number}: {wilson(sum(scoring.correct), n).shown()}")
    print(f"  examples whose reply text changed at least once: {text_changed} of {n}")
    print(f"  examples scored differently at least once: {outcome_changed} of {n}")
    print(f"  last against first: {paired(runs[-1].outcomes(), first.outcomes()).shown()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=SMOLLM2, help="a GGUF file, or smollm2 (default)")
    parser.add_argument("--task", default="object_counting")
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=4, help="slots (and requests in flight) of the batched set-up")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parser", default="last-number", choices=ANSWER_PARSERS,
                        help="how an answer is read (last-number: a small model rarely writes the answer line)")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()}")
    print(f"model {args.model}, task {args.task}, temperature 0, max tokens {args.max_tokens}")
    for name, slots in ((f"batched ({args.parallel} slots, {args.parallel} in flight)", args.parallel),
                        ("one slot (1 in flight)", 1)):
        with serving(args.model, parallel=slots, quiet=True) as served:
            runs, seconds = score_repeatedly(served.base_url, served.alias, slots, args)
        report(name, runs, seconds)
    print(f"\nload at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
