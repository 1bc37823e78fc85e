"""The ``fedtextgrad`` command: what users do around a federated run.

    fedtextgrad eval --task object_counting --prompt-file best.txt --split test [--repeats 2] [--backend openai ...]
    fedtextgrad sim-server --port 8765 [--latency-ms 200]
    fedtextgrad analyze PROMPT_FILE... [--base-url URL --model M]   information-density metrics
    fedtextgrad compare RUN_DIR... [--out comparison.png]            runs side by side
    fedtextgrad report RUN_DIR [--out FILE]                          one run as a self-contained HTML page
    fedtextgrad bench endpoint --base-url URL --model M --concurrency 1,4,16,64   load-test your LLM server
    fedtextgrad serve --model smollm2|PATH.gguf [--port 8080 --parallel 4]       a local llama.cpp server
    fedtextgrad experiment GRID.toml --out DIR [--data-source PATH]  a grid of federations, resumable
    fedtextgrad settings [--format markdown|pyproject]               every run setting
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from fedtextgrad_core.data.tasks import ANSWER_PARSERS, TASKS
from fedtextgrad_core.errors import ConfigError, FedTextGradError
from fedtextgrad_core.method.evaluation import Scores
from fedtextgrad_core.stats import paired, wilson
from fedtextgrad_core.tools.endpoint_bench import DEFAULT_PROMPT


def _eval(args: argparse.Namespace) -> int:
    from fedtextgrad_core.data.loaders import load_splits
    from fedtextgrad_core.data.tasks import check_parser, get_task
    from fedtextgrad_core.llm.endpoint import EndpointSettings
    from fedtextgrad_core.llm.engine import make_engine
    from fedtextgrad_core.method.evaluation import evaluate_prompt
    from fedtextgrad_core.run.settings import endpoint_settings

    task = get_task(args.task)
    if args.limit < 0:
        raise ConfigError("--limit", args.limit, "0 (score every example) or a positive number")
    if not 1 <= args.repeats <= 100:
        raise ConfigError("--repeats", args.repeats, "a whole number from 1 to 100")
    prompt = read_text_file(args.prompt_file, "--prompt-file").strip()
    config = {
        "llm-backend": args.backend, "llm-base-url": args.base_url, "llm-model": args.model,
        "llm-api-key-env": args.api_key_env, "llm-concurrency": args.concurrency,
        "llm-max-tokens": args.max_tokens, "llm-timeout": args.timeout,
    }
    settings: EndpointSettings = endpoint_settings(config, "llm")
    check_parser(args.answer_parser, [task.name])
    splits = load_splits(task.name, args.data_dir, seed=args.seed, gsm8k_split=args.gsm8k_split)
    examples = getattr(splits, args.split)
    if args.limit:
        examples = examples[: args.limit]
    engine = make_engine(settings)
    sim = " (simulated LLM)" if settings.simulated else ""
    runs: list[Scores] = []
    for repeat in range(args.repeats):
        again = f" (repeat {repeat + 1} of {args.repeats})" if args.repeats > 1 else ""
        print(f"scoring {len(examples)} {args.split} examples of {task.name} with {settings.describe()}{again} ...",
              flush=True)
        scores = evaluate_prompt(engine, task, prompt, examples, args.answer_parser)
        usage = engine.take_usage()
        runs.append(scores)
        interval = wilson(scores.correct, scores.total)
        print(f"accuracy {100 * scores.accuracy:.1f}% ({scores.correct}/{scores.total}, 95% interval "
              f"{100 * interval.low:.1f}-{100 * interval.high:.1f}%){sim}, "
              f"malformed replies {scores.malformed}, scored otherwise by the other answer parser "
              f"{scores.parser_disagreements}, LLM calls {usage.calls}, "
              f"tokens {usage.prompt_tokens + usage.completion_tokens}, {scores.seconds:.1f}s", flush=True)
    if len(runs) > 1:
        print(noise_line(runs) + sim)
    if args.outcomes:
        write_outcomes(Path(args.outcomes), runs)
        print(f"per-example outcomes: {args.outcomes}")
    return 0


def noise_line(runs: Sequence[Scores]) -> str:
    """How far repeated scorings of one prompt differed: the range of the accuracies, and the examples
    whose outcome changed, with the pairwise comparison of the first and the last."""
    accuracies = [100 * scores.accuracy for scores in runs]
    first = runs[0].outcomes()
    changed = sum(1 for example, right in first.items() if any(s.outcomes().get(example, right) != right for s in runs))
    spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    return (f"spread over {len(runs)} scorings: accuracy {min(accuracies):.1f}% to {max(accuracies):.1f}% "
            f"(sd {spread:.1f} points); {changed} of {len(first)} examples scored differently at least once; "
            f"last against first: {paired(runs[-1].outcomes(), first).shown()}")


def write_outcomes(path: Path, runs: Sequence[Scores]) -> None:
    """One JSON line per example: its id, and right / unreadable in each scoring."""
    try:
        with path.open("w", encoding="utf-8") as out:
            for position, example in enumerate(runs[0].example_ids):
                out.write(json.dumps({"id": example, "correct": [s.example_correct[position] for s in runs],
                                      "malformed": [s.example_malformed[position] for s in runs]}) + "\n")
    except OSError as exc:
        raise FedTextGradError(f"--outcomes '{path}' cannot be written: {exc.strerror or exc}") from None


def read_text_file(name: str, option: str = "") -> str:
    """A prompt file's text, or one line saying why it cannot be one (missing, a folder, unreadable,
    binary, not UTF-8, empty). prompts/*.txt end with one added newline, which is not the prompt's."""
    label = f"{option} '{name}'" if option else f"'{name}'"
    path = Path(name)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise FedTextGradError(f"{label} is a folder, not a text file") from None
    except OSError as exc:
        raise FedTextGradError(f"{label} cannot be read: {exc.strerror or exc}") from None
    if b"\0" in data:
        raise FedTextGradError(f"{label} is a binary file, not a text file holding a prompt")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FedTextGradError(f"{label} is not UTF-8 text (byte {exc.start} cannot be read)") from None
    text = text.removesuffix("\n")
    if not text.strip():
        raise FedTextGradError(f"{label} is empty")
    return text


def _analyze(args: argparse.Namespace) -> int:
    from fedtextgrad_core.llm.surprisal import SurprisalClient
    from fedtextgrad_core.method.prompt_metrics import analyze, format_metrics_table

    prompts = [(name, read_text_file(name)) for name in args.prompt_files]
    client = None
    if args.base_url:
        if not args.model:
            raise ConfigError("--model", "", "the name of the model served at --base-url")
        client = SurprisalClient(args.base_url, args.model, args.api_key_env, timeout=args.timeout,
                                 bos_text=args.bos_text, key_setting="--api-key-env")
    print(format_metrics_table([(name, analyze(text, client)) for name, text in prompts]))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedtextgrad_core.tools.compare import compare_runs, format_table, load_run, plot_comparison

    runs = [load_run(folder) for folder in args.run_dirs]
    rows = compare_runs(runs)
    print(format_table(rows))
    if args.out:
        try:
            path = plot_comparison(rows, {row["run"]: run.rounds for row, run in zip(rows, runs)}, args.out)
        except OSError as exc:
            raise FedTextGradError(f"--out '{args.out}' cannot be written: {exc.strerror or exc}") from None
        print(f"plot: {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedtextgrad_core.run import html_report
    from fedtextgrad_core.tools.compare import load_run

    run = load_run(args.run_dir)
    out = Path(args.out) if args.out else None
    if out is not None and not out.parent.is_dir():
        raise FedTextGradError(f"--out '{out}': the folder '{out.parent}' does not exist")
    try:
        path = html_report.write(Path(run.path), run.summary, run.rounds, out)
    except OSError as exc:
        where = out if out is not None else Path(run.path) / html_report.REPORT_FILE
        raise FedTextGradError(f"'{where}' cannot be written: {exc.strerror or exc}") from None
    print(f"report: {path}")
    return 0


def _sim_server(args: argparse.Namespace) -> int:
    from fedtextgrad_core.sim.server import serve_forever

    try:
        serve_forever(port=args.port, latency_ms=args.latency_ms, host=args.host, call_log=args.call_log or None)
    except OSError as exc:
        raise FedTextGradError(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc} "
                               "(is another server on that port? choose another with --port)") from None
    return 0


def _bench_endpoint(args: argparse.Namespace) -> int:
    import json

    from fedtextgrad_core.llm.openai_transport import api_key_for
    from fedtextgrad_core.tools.endpoint_bench import EndpointBench, format_table, parse_concurrency

    levels = parse_concurrency(args.concurrency)
    out = Path(args.out) if args.out else None
    if out is not None and not out.parent.is_dir():
        raise FedTextGradError(f"--out '{out}': the folder '{out.parent}' does not exist")
    bench = EndpointBench(args.base_url, args.model, api_key_for(args.api_key_env, "--api-key-env"),
                          max_tokens=args.max_tokens, prompt=args.prompt, timeout=args.timeout)
    report = bench.run(levels, args.requests, progress=lambda line: print(line, flush=True))
    print(format_table(report))
    if out is not None:
        out.write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    return 0


def _settings(args: argparse.Namespace) -> int:
    from fedtextgrad_core.run import schema

    print(schema.markdown_table() if args.format == "markdown" else schema.pyproject_block())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtextgrad", description="FedTextGrad tools around a federated run.")
    commands = parser.add_subparsers(dest="command", required=True)
    # every option's help ends with its default
    plain_add_parser = commands.add_parser
    commands.add_parser = functools.partial(  # type: ignore[method-assign]
        plain_add_parser, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    ev = commands.add_parser("eval", help="print the accuracy of a prompt on a task split")
    ev.add_argument("--task", required=True, help="the task: " + ", ".join(TASKS))
    ev.add_argument("--prompt-file", required=True, help="a text file holding the system prompt")
    ev.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split to score")
    ev.add_argument("--backend", default="sim", choices=["sim", "openai"],
                    help="sim (the simulated LLM, a test double) or openai (any OpenAI-compatible server)")
    ev.add_argument("--base-url", default="", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    ev.add_argument("--model", default="sim", help="the model name the server knows")
    ev.add_argument("--api-key-env", default="", help="NAME of the environment variable holding the API key")
    ev.add_argument("--data-dir", default="synthetic", help="'synthetic', 'hub', or a data file or folder")
    ev.add_argument("--gsm8k-split", default="textgrad", choices=["textgrad", "fedtextgrad"],
                    help="GSM8K's split (see the settings table)")
    ev.add_argument("--answer-parser", default="answer-line", choices=ANSWER_PARSERS,
                    help="how an answer is read from a reply (see the settings table)")
    ev.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    ev.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply")
    ev.add_argument("--timeout", type=float, default=0.0, help="seconds per call; 0: by the kind of server")
    ev.add_argument("--limit", type=int, default=0, help="score only the first N examples (0: all)")
    ev.add_argument("--seed", type=int, default=0, help="the seed of the synthetic data")
    ev.add_argument("--repeats", type=int, default=1,
                    help="score the prompt this many times and report the spread: the LLM server's own noise "
                         "(a server that batches requests does not answer the same way twice, even at temperature 0)")
    ev.add_argument("--outcomes", default="", help="write each example's id and outcome(s) to this JSON-lines file")
    ev.set_defaults(run=_eval)

    sim = commands.add_parser("sim-server", help="serve the simulated LLM as an OpenAI-compatible endpoint")
    sim.add_argument("--port", type=int, default=8765, help="TCP port")
    sim.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only by default)")
    sim.add_argument("--latency-ms", type=float, default=0.0, help="added delay per call, for benchmarks")
    sim.add_argument("--call-log", default="", help="append one JSON line per chat call (kind, start, end) to this file")
    sim.set_defaults(run=_sim_server)

    an = commands.add_parser("analyze", help="print information-density metrics of prompt files")
    an.add_argument("prompt_files", nargs="+", metavar="PROMPT_FILE", help="text files holding one prompt each")
    an.add_argument("--base-url", default="", help="an OpenAI-compatible completions endpoint that returns prompt "
                    "token log-probabilities (vLLM, llama.cpp) for surprisal; without it: text metrics only")
    an.add_argument("--model", default="", help="the model name at --base-url")
    an.add_argument("--api-key-env", default="", help="NAME of the environment variable holding the API key")
    an.add_argument("--timeout", type=float, default=120.0)
    an.add_argument("--bos-text", default=None, help="text of the model's BOS token to put before each prompt "
                    "(default: detect whether the server needs one)")
    an.set_defaults(run=_analyze)

    cmp_ = commands.add_parser("compare", help="compare run folders: a table and a PNG")
    cmp_.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (holding summary.json)")
    cmp_.add_argument("--out", default="comparison.png", help="where to write the PNG ('' for none)")
    cmp_.set_defaults(run=_compare)

    rep = commands.add_parser("report", help="write one run folder as a self-contained HTML page (report.html)")
    rep.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (holding summary.json)")
    rep.add_argument("--out", default="", help="where to write the page ('': RUN_DIR/report.html)")
    rep.set_defaults(run=_report)

    from fedtextgrad_core.tools import experiment, serve

    sv = commands.add_parser("serve", help="serve a GGUF model with llama.cpp's OpenAI-compatible server (no GPU)")
    serve.add_arguments(sv)
    sv.set_defaults(run=serve.run)

    ex = commands.add_parser("experiment", help="run a grid of federations (one flwr run per cell), resumably, "
                             "and write the results table")
    experiment.add_arguments(ex)
    ex.set_defaults(run=experiment.run)

    st = commands.add_parser("settings", help="print every run setting: the configuration reference or pyproject's block")
    st.add_argument("--format", default="markdown", choices=["markdown", "pyproject"],
                    help="markdown: the tables of docs/settings.md (default); pyproject: [tool.flwr.app.config]")
    st.set_defaults(run=_settings)

    bench = commands.add_parser("bench", help="measure an LLM server")
    benches = bench.add_subparsers(dest="bench", required=True)
    be = benches.add_parser("endpoint", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                            help="requests/s, tokens/s and latency of an OpenAI-compatible endpoint "
                            "at several concurrency levels, to choose llm-concurrency")
    be.add_argument("--base-url", required=True, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    be.add_argument("--model", required=True, help="the model name the server serves")
    be.add_argument("--api-key-env", default="", help="NAME of the environment variable holding the API key")
    be.add_argument("--concurrency", default="1,4,16,64", help="requests in flight, one level after another ")
    be.add_argument("--requests", type=int, default=32, help="requests per level")
    be.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    be.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message sent")
    be.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    be.add_argument("--out", default="endpoint-bench.json", help="where to write the JSON results ('' for none)")
    be.set_defaults(run=_bench_endpoint, command_name="bench endpoint")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except FedTextGradError as exc:
        print(f"fedtextgrad {getattr(args, 'command_name', args.command)}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
