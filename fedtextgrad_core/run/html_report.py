"""``report.html``: one self-contained page to look at a run folder.

The settings and LLMs (a run on the simulated LLM says so at the top: its numbers prove the machinery,
never the method), the round table, the accuracy figure (inline SVG), the final test table with its
intervals and paired comparisons, and each round's prompts: the merged prompt with a word diff against
the previous one, each client's upload with a diff against the prompt it received, and what each of its
local steps did (kept or reverted: counts as the client reported them; each step with its feedback text
only where a site-local step log exists, ``site_steps.py``: in a simulation).

Everything comes from the typed records (``RunSummary``, ``RoundRecord``) and is escaped: prompts and
client text come from other parties. The page loads nothing (no script, no network: its
Content-Security-Policy forbids both), so it opens the same offline, years later.
"""

from __future__ import annotations

import difflib
import html
import json
import math
import re
import time
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedtextgrad_core.method.local_training import LocalStep
from fedtextgrad_core.run import site_steps
from fedtextgrad_core.run.figures import merged_interval_band
from fedtextgrad_core.run.records import ClientUpload, RoundRecord, RunSummary
from fedtextgrad_core.run.run_folder import CONFIG_FILE, ROUNDS_FILE, SUMMARY_FILE, atomic_write
from fedtextgrad_core.stats import Interval, PairedComparison

REPORT_FILE = "report.html"
SIMULATED_NOTE = ("Simulated LLM: the numbers of this run come from the simulated LLM, a test double whose mistakes "
                  "and fixes are scripted. They prove that the machinery works, never that the method does.")
FEEDBACK_AT_SITES = ("No site-local step log in this folder: feedback text quotes a site's private training data, so "
                     "in a deployment it stays at each site and never reaches the server. Shown here: the keep/revert "
                     "counts each client reported.")
MAX_UPLOADS_SHOWN = 50  # uploads of a round shown with their prompt and diff; the rest in the round's table only
MAX_DIFF_TOKENS = 6000  # longer texts are shown side by side instead of diffed word by word
TEST_ORDER = ("best", "last", "initial")
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#1d1d1f;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:left;vertical-align:top}
th{background:#f2f2f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.simulated{background:#fff4ce;border:2px solid #d9a400;padding:.6em 1em;font-weight:600}
.status-error{color:#a00000;font-weight:600}.muted{color:#666;font-size:.9em}
.prompt{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.88em;
background:#fafafa;border:1px solid #ddd;padding:.5em .7em;overflow-wrap:anywhere}
ins{background:#d4f7d4;text-decoration:none}del{background:#ffd6d6;color:#700}
.ctl{background:#ffe08a;color:#000;border-radius:2px;font-size:.8em}
details{margin:.4em 0}summary{cursor:pointer}.round{border-left:4px solid #8ab4f8;padding-left:1em;margin:1.2em 0}
.better{color:#0a6b0a;font-weight:600}.worse{color:#a00000;font-weight:600}.same{color:#555}
.kept{color:#0a6b0a}.reverted{color:#a00000}.left-out{color:#a00000;font-weight:600}
svg text{font-family:system-ui,sans-serif}
"""


# --- text ---------------------------------------------------------------------------------------------

_URL_USER = re.compile(r"(?<=//)[^/@\s]+@")
_SHOWN_CONTROLS = frozenset("\n\t")


def _is_hidden(char: str) -> bool:
    """Characters a reader would not see: controls (escape sequences among them) and format characters
    (bidirectional overrides, zero-width ones)."""
    return char not in _SHOWN_CONTROLS and unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn")


def esc(text: object) -> str:
    """``text`` safe in HTML text and attribute values; hidden characters shown as a visible code."""
    out = []
    for char in str(text):
        if _is_hidden(char):
            out.append(f'<span class="ctl">U+{ord(char):04X}</span>')
        else:
            out.append(html.escape(char, quote=True))
    return "".join(out)


def _plain_url(value: str) -> str:
    """A URL without the user and password it may carry."""
    return _URL_USER.sub("…@", value)


def _tokens(text: str) -> list[str]:
    """Words, punctuation and runs of white space: a word diff keeps the layout."""
    return re.findall(r"\s+|\w+|[^\w\s]", text)


def diff_html(before: str, after: str) -> str:
    """``after`` with the words added since ``before`` in <ins> and the words gone in <del>."""
    if before == after:
        return f'<p class="muted">unchanged</p><div class="prompt">{esc(after)}</div>'
    old, new = _tokens(before), _tokens(after)
    if len(old) + len(new) > MAX_DIFF_TOKENS:
        return (f'<p class="muted">too long to diff word by word: before, then after</p><div class="prompt">'
                f'<del>{esc(before)}</del></div><div class="prompt"><ins>{esc(after)}</ins></div>')
    opcodes = difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes()
    parts: list[str] = []
    gone: list[str] = []  # a change still open: what went, what came
    came: list[str] = []

    def close() -> None:
        if gone:
            parts.append(f"<del>{esc(''.join(gone))}</del>")
        if came:
            parts.append(f"<ins>{esc(''.join(came))}</ins>")
        gone.clear()
        came.clear()

    for position, (op, i1, i2, j1, j2) in enumerate(opcodes):
        same = "".join(new[j1:j2])
        if op == "equal":
            # white space between two changes joins them: 'the items' -> 'every item' reads as one change
            if (gone or came) and not same.strip() and position + 1 < len(opcodes):
                gone.append(same)
                came.append(same)
                continue
            close()
            parts.append(esc(same))
            continue
        gone.extend(old[i1:i2])
        came.extend(new[j1:j2])
    close()
    return f'<div class="prompt diff">{"".join(parts)}</div>'


def pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def shown(interval: Interval | None) -> str:
    return "-" if interval is None else interval.shown()


def _verdict(comparison: PairedComparison | None) -> str:
    if comparison is None or not comparison.n:
        return "-"
    css = {"better": "better", "worse": "worse"}.get(comparison.verdict, "same")
    return f'<span class="{css}">{esc(comparison.verdict)}</span>'


def _difference(comparison: PairedComparison) -> str:
    return (f"{100 * comparison.difference:+.1f} points [{100 * comparison.low:+.1f}, {100 * comparison.high:+.1f}], "
            f"p = {comparison.p_value:.3g}, n = {comparison.n}")


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], table_id: str = "", numeric: Iterable[int] = ()
           ) -> str:
    """A table of cells already escaped; ``numeric``: columns aligned right."""
    right = set(numeric)
    head = "".join(f"<th>{esc(h)}</th>" for h in headers) if any(headers) else ""
    body = "".join("<tr>" + "".join(f'<td class="num">{cell}</td>' if i in right else f"<td>{cell}</td>"
                                    for i, cell in enumerate(row)) + "</tr>" for row in rows)
    ident = f' id="{esc(table_id)}"' if table_id else ""
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table{ident}>{thead}<tbody>{body}</tbody></table>"


# --- the parts of the page ------------------------------------------------------------------------------


def is_simulated(summary: RunSummary, rounds: Sequence[RoundRecord], config: Mapping[str, Any]) -> bool:
    """Whether any number comes from the simulated LLM: as the summary and the clients said, or (older
    folders) as the run config's backends say."""
    if summary.simulated or any(u.reply.simulated for r in rounds for u in r.uploads):
        return True
    if any(llm.startswith("sim") for llm in summary.client_llms.values()):
        return True
    run_config = config.get("run_config")
    if not summary.client_llms and isinstance(run_config, Mapping):
        return str(run_config.get("llm-backend", "sim")) == "sim"
    return False


def _flat(settings: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += _flat(value, f"{name}.")
        else:
            text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
            rows.append((name, _plain_url(text)))
    return rows


def _settings_section(summary: RunSummary, config: Mapping[str, Any]) -> str:
    settings = config.get("settings") if isinstance(config.get("settings"), Mapping) else {}
    assert isinstance(settings, Mapping)
    main = [
        ("task", ", ".join(summary.task)), ("partitioning", summary.partitioning), ("merge", summary.merge),
        ("best rule", summary.best_rule), ("rounds", f"{summary.rounds} of {summary.rounds_planned}"),
    ]
    for key, label in (("local_steps", "local steps"), ("batch_size", "batch size"), ("keep_rule", "keep rule"),
                       ("loss", "loss"), ("seed", "seed"), ("leakage_guard", "leakage guard"),
                       ("robust_merge", "robust merge")):
        if key in settings:
            main.append((label, str(settings[key])))
    rows = [(esc(k), esc(v)) for k, v in main]
    llm_rows = [(esc(f"client {label}"), esc(_plain_url(llm))) for label, llm in summary.client_llms.items()]
    llm_rows.append(("server (merging)", esc(_plain_url(summary.server_llm) or "-")))
    out = ["<h2 id=\"settings\">Settings and LLMs</h2>", _table(("setting", "value"), rows, "main-settings"),
           _table(("who", "LLM (as reported)"), llm_rows, "llms")]
    if settings:
        out.append("<details><summary>every setting (config.json)</summary>"
                   + _table(("setting", "value"), [(esc(k), esc(v)) for k, v in _flat(settings)]) + "</details>")
    return "\n".join(out)


def _round_rows(summary: RunSummary, rounds: Sequence[RoundRecord]) -> list[list[str]]:
    initial = summary.initial_val_interval
    rows = [["0 (start)", esc(shown(initial) if initial else pct(summary.initial_val_accuracy)), "-", "-", "-", "-",
             "-", "-", str(len(summary.initial_prompt)), "-", "-"]]
    for record in rounds:
        uploads = record.uploads
        steps = sum(u.reply.local.steps for u in uploads)
        kept = sum(u.reply.local.steps_accepted for u in uploads)
        left_out = sum(1 for u in uploads if u.left_out)
        calls = sum(u.reply.local.llm_calls for u in uploads) + sum(e.reply.usage.calls for e in record.evaluations)
        val = shown(record.val_interval) if record.val_interval is not None else \
            f"{pct(record.val_accuracy)} ({record.val_examples})"
        best = f"{pct(record.best_val_accuracy)} (round {record.best_round})"
        rows.append([
            f'<a href="#round-{record.round}">{record.round}</a>', esc(val), _verdict(record.best_comparison),
            esc(best), f"{len(uploads)}" + (f' <span class="left-out">({left_out} left out)</span>' if left_out else ""),
            str(len(record.failures)), f"{kept}/{steps}", esc(record.merge.method), str(len(record.merged_prompt)),
            str(calls), f"{record.seconds:.1f}",
        ])
    return rows


def _rounds_section(summary: RunSummary, rounds: Sequence[RoundRecord]) -> str:
    headers = ("round", "merged prompt: validation (95% interval, n)", "against the best before", "best so far",
               "uploads", "failures", "steps kept", "merge", "prompt chars", "LLM calls", "seconds")
    return ("<h2 id=\"round-table\">Rounds</h2>"
            + _table(headers, _round_rows(summary, rounds), "rounds", numeric=(5, 6, 8, 9, 10)))


def accuracy_svg(summary: RunSummary, rounds: Sequence[RoundRecord], simulated: bool) -> str:
    """Validation accuracy per round: the merged prompt (round 0: the start prompt) with its 95% band,
    each client's own new prompt as a dot, the best round ringed."""
    width, height, left, right, top, bottom = 760, 320, 56, 20, 20, 48
    last = max([r.round for r in rounds] + [1])
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(server_round: float) -> float:
        return left + plot_w * server_round / last

    def y(accuracy: float) -> float:
        return top + plot_h * (1 - accuracy)

    parts = [f'<svg id="accuracy-figure" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="validation accuracy per round">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#999"/>']
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" font-size="11" text-anchor="end">{tick:.0%}</text>')
    step = max(1, math.ceil(last / 12))
    for server_round in range(0, last + 1, step):
        parts.append(f'<text x="{x(server_round):.1f}" y="{top + plot_h + 16}" font-size="11" '
                     f'text-anchor="middle">{server_round}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 18}" font-size="12" text-anchor="middle">round</text>')
    band = merged_interval_band(rounds, summary.initial_val_interval)
    if band["round"]:
        upper = [f"{x(r):.1f},{y(h):.1f}" for r, h in zip(band["round"], band["high"])]
        lower = [f"{x(r):.1f},{y(lo):.1f}" for r, lo in zip(reversed(band["round"]), reversed(band["low"]))]
        parts.append(f'<polygon points="{" ".join(upper + lower)}" fill="#8ab4f8" fill-opacity="0.3" stroke="none"/>')
    for record in rounds:
        for upload in record.uploads:
            val = upload.reply.val
            if val is not None and val.total:
                parts.append(f'<circle cx="{x(record.round):.1f}" cy="{y(val.correct / val.total):.1f}" r="3" '
                             f'fill="#f29900" fill-opacity="0.7"><title>client {esc(upload.label)}</title></circle>')
    points = [(0, summary.initial_val_accuracy)] + [(r.round, r.val_accuracy) for r in rounds]
    known = [(r, a) for r, a in points if a is not None]
    if known:
        parts.append('<polyline fill="none" stroke="#1a56db" stroke-width="2" points="'
                     + " ".join(f"{x(r):.1f},{y(a):.1f}" for r, a in known) + '"/>')
        parts += [f'<circle cx="{x(r):.1f}" cy="{y(a):.1f}" r="3.5" fill="#1a56db"><title>round {r}: '
                  f'{pct(a)}</title></circle>' for r, a in known]
    if summary.best_val_accuracy is not None:
        parts.append(f'<circle cx="{x(summary.best_round):.1f}" cy="{y(summary.best_val_accuracy):.1f}" r="8" '
                     'fill="none" stroke="#0a6b0a" stroke-width="2"><title>best</title></circle>')
    legend = ("merged prompt (validation, 95% band)", "#1a56db"), ("each client's new prompt", "#f29900"), \
        ("best", "#0a6b0a")
    for i, (name, colour) in enumerate(legend):
        parts.append(f'<circle cx="{left + 10 + 240 * i}" cy="{height - 5}" r="4" fill="{colour}"/>'
                     f'<text x="{left + 18 + 240 * i}" y="{height - 1}" font-size="11">{esc(name)}</text>')
    if simulated:
        parts.append(f'<text x="{left + 8}" y="{top + 14}" font-size="11" fill="#8a6d00">simulated LLM: the '
                     'machinery, not the method</text>')
    parts.append("</svg>")
    return "".join(parts)


def _tests_section(summary: RunSummary) -> str:
    out = ["<h2 id=\"final-tests\">Final tests</h2>"]
    rows = []
    if summary.test_intervals:
        names = sorted(summary.test_intervals, key=lambda n: (TEST_ORDER.index(n) if n in TEST_ORDER else 9, n))
        for name in names:
            interval = summary.test_intervals[name]
            rows.append([esc(f"{name} prompt"), pct(interval.accuracy), esc(f"{100 * interval.low:.1f}-"
                         f"{100 * interval.high:.1f}%" if interval.n else "-"), str(interval.n)])
    else:  # folders written before the intervals
        for name, accuracy, n in (("best", summary.test_accuracy, str(summary.test_examples or "-")),
                                  ("last", summary.last_test_accuracy, "-"),
                                  ("initial", summary.initial_test_accuracy, "-")):
            if accuracy is not None:
                rows.append([esc(f"{name} prompt"), pct(accuracy), "-", n])
    if rows:
        out.append(_table(("prompt", "test accuracy", "95% interval", "n"), rows, "tests", numeric=(1, 3)))
    else:
        out.append('<p id="tests" class="muted">no test scores recorded (the run did not reach its tests)</p>')
    if summary.comparisons:
        out.append(_table(("paired on the same test examples", "verdict", "difference [95% interval], McNemar p, n"),
                          [[esc(name), _verdict(c), esc(_difference(c)) if c.n else "no examples in common"]
                           for name, c in summary.comparisons.items()], "comparisons"))
    if summary.test_by_task:
        tasks = sorted({task for per in summary.test_by_task.values() for task in per})
        out.append(_table(["prompt", *tasks], [[esc(name), *(esc(shown(per.get(task))) for task in tasks)]
                                               for name, per in summary.test_by_task.items()], "tests-by-task"))
    if summary.test_failures:
        out.append(_table(("client", "stage", "why"), [[esc(f.label), esc(f.stage), esc(f.reason)]
                                                       for f in summary.test_failures], "test-failures"))
    return "\n".join(out)


def _steps_html(steps: Sequence[LocalStep], received: str) -> str:
    """Each step: its batch, the decision of the keep rule, its feedback and its rewrite (against the
    prompt the step started from)."""
    rows, prompt = [], received
    for step in steps:
        css = "kept" if step.decision == "kept" else "reverted" if step.decision == "reverted" else "muted"
        feedback = "".join(f'<div class="prompt">{esc(text)}</div>' for text in step.feedback)
        detail = (f"<details><summary>{len(step.feedback)} feedback text(s)</summary>{feedback}</details>"
                  if step.feedback else '<span class="muted">none</span>')
        rewrite = (f"<details><summary>rewrite</summary>{diff_html(prompt, step.candidate)}</details>"
                   if step.candidate else '<span class="muted">none</span>')
        if step.decision == "kept" and step.candidate:
            prompt = step.candidate
        rows.append([str(step.step), str(step.batch), pct(step.before), pct(step.after),
                     f'<span class="{css}">{esc(step.decision)}</span>', detail, rewrite])
    return _table(("step", "batch", "batch accuracy before", "rewrite on the batch", "decision", "feedback",
                   "rewrite, against the step's prompt"), rows, numeric=(0, 1, 2, 3))


def _upload_html(upload: ClientUpload, received: str, steps: Sequence[LocalStep] | None) -> str:
    reply, local = upload.reply, upload.reply.local
    val = f"{pct(reply.val.accuracy)} ({reply.val.total})" if reply.val is not None else "-"
    flags = ' <span class="left-out">left out of the merge</span>' if upload.left_out else ""
    head = (f"client {esc(upload.label)} (partition {esc(upload.client.partition_id)}, node "
            f"{esc(upload.client.node_id)}): steps kept {local.steps_accepted} of {local.steps}, reverted "
            f"{local.steps_reverted}, malformed rewrites {local.malformed_updates}; batch accuracy "
            f"{pct(local.batch_accuracy_before)} &rarr; {pct(local.batch_accuracy_after)}; own validation {esc(val)}"
            f"{flags}")
    extra = []
    if upload.holdout_accuracy is not None:
        extra.append(f"robust merge: held-out accuracy {pct(upload.holdout_accuracy)}")
    if reply.leaks.redactions:
        extra.append(f"leakage guard redacted {reply.leaks.redactions} passage(s)")
    body = [f'<p class="muted">{esc("; ".join(extra))}</p>' if extra else "",
            "<p>upload, against the prompt it received:</p>", diff_html(received, reply.prompt)]
    if steps is not None:
        body.append(f"<p>local steps (the client's own log{', with feedback' if any(s.feedback for s in steps) else ''})"
                    ":</p>" + _steps_html(steps, received))
    return f'<details class="upload"><summary>{head}</summary>{"".join(body)}</details>'


def _prompts_section(summary: RunSummary, rounds: Sequence[RoundRecord],
                     steps: Mapping[tuple[int, int], Sequence[LocalStep]]) -> str:
    out = ["<h2 id=\"prompts\">Prompts, round by round</h2>",
           f"<details><summary>start prompt ({len(summary.initial_prompt)} chars)</summary>"
           f'<div class="prompt">{esc(summary.initial_prompt)}</div></details>']
    if not steps:
        out.append(f'<p class="muted" id="feedback-note">{esc(FEEDBACK_AT_SITES)}</p>')
    previous = summary.initial_prompt
    for record in rounds:
        merge = record.merge
        notes = [f"merge: {merge.method}"]
        if merge.fallback_reason:
            notes.append(f"fell back to concatenation: {merge.fallback_reason}")
        if merge.dropped_sentences:
            notes.append(f"{len(merge.dropped_sentences)} sentence(s) left out for the token budget")
        section = [f'<section class="round" id="round-{record.round}"><h3>Round {record.round}</h3>',
                   f'<p class="muted">{esc("; ".join(notes))}</p>',
                   f"<p>merged prompt ({len(record.merged_prompt)} chars), against the previous round's:</p>",
                   diff_html(previous, record.merged_prompt)]
        for upload in record.uploads[:MAX_UPLOADS_SHOWN]:
            found = steps.get((upload.client.partition_id, record.round)) \
                if upload.client.partition_id is not None else None
            section.append(_upload_html(upload, previous, found))
        more = len(record.uploads) - MAX_UPLOADS_SHOWN
        if more > 0:
            section.append(f'<p class="muted">and {more} more uploads (in prompts/round-{record.round:03d}-clients.jsonl)'
                           "</p>")
        if record.failures:
            section.append("<p>failures:</p>" + _table(("client", "stage", "why"), [
                [esc(f.label), esc(f.stage), esc(f.reason)] for f in record.failures]))
        section.append("</section>")
        out.append("\n".join(section))
        previous = record.merged_prompt
    return "\n".join(out)


def _cost_section(summary: RunSummary) -> str:
    if not summary.cost:
        return ""
    rows = [[esc(part.replace("_", " ")), str(spent.get("llm_calls", 0)), str(spent.get("tokens", 0))]
            for part, spent in summary.cost.items()]
    return "<h2 id=\"cost\">LLM cost</h2>" + _table(("where", "LLM calls", "tokens"), rows, "cost", numeric=(1, 2))


def render(name: str, summary: RunSummary, rounds: Sequence[RoundRecord], config: Mapping[str, Any] | None = None,
           steps: Mapping[tuple[int, int], Sequence[LocalStep]] | None = None, base: str = "") -> str:
    """The page of one run: ``config`` is config.json's content, ``steps`` the site-local step log
    ((partition, round) -> steps), both optional; ``base``: where the page links to the run's files from
    (empty: the page sits in the run folder)."""
    config = config or {}
    simulated = is_simulated(summary, rounds, config)
    if summary.error:
        status = f'<span class="status-error">stopped: {esc(summary.error)}</span>'
    else:
        status = "finished" if summary.finished else "not finished (still running, or stopped without a summary)"
    best = shown(summary.best_val_interval) if summary.best_val_interval else pct(summary.best_val_accuracy)
    initial = shown(summary.initial_val_interval) if summary.initial_val_interval else pct(summary.initial_val_accuracy)
    overview = _table(("", ""), [
        ["status", status], ["rounds", f"{summary.rounds} of {summary.rounds_planned}"],
        ["start prompt, validation", esc(initial)],
        ["best prompt, validation", esc(f"{best} (round {summary.best_round})")],
        ["wall time", f"{summary.seconds:.1f} s"],
        ["files", " ".join(f'<a href="{esc(base + f)}">{f}</a>' for f in (SUMMARY_FILE, ROUNDS_FILE, CONFIG_FILE))
         + f' <a href="{esc(base)}prompts/">prompts/</a>'],
    ], "overview")
    banner = f'<p class="simulated" id="simulated-note">{esc(SIMULATED_NOTE)}</p>' if simulated else ""
    sections = [
        banner, overview, _settings_section(summary, config), _rounds_section(summary, rounds),
        "<h2 id=\"accuracy\">Accuracy</h2>" + accuracy_svg(summary, rounds, simulated),
        _tests_section(summary), _cost_section(summary), _prompts_section(summary, rounds, steps or {}),
    ]
    made = time.strftime("%Y-%m-%d %H:%M:%S")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>FedTextGrad run {esc(name)}</title><style>{STYLE}</style></head><body>"
            f"<h1>FedTextGrad run <code>{esc(name)}</code></h1>"
            f'<p class="muted">report written {esc(made)} from the run folder'
            f'{" (simulated LLM)" if simulated else ""}</p>'
            + "\n".join(s for s in sections if s) + "</body></html>\n")


def read_config(folder: Path) -> dict[str, Any]:
    """config.json's content, or nothing when it is missing or unreadable (it is optional here)."""
    try:
        value = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write(folder: Path, summary: RunSummary, rounds: Sequence[RoundRecord], out: Path | None = None) -> Path:
    """Write the page of the run in ``folder`` (to ``out``, default ``folder/report.html``); returns where."""
    folder = Path(folder)
    target = Path(out) if out is not None else folder / REPORT_FILE
    base = "" if target.resolve().parent == folder.resolve() else folder.resolve().as_uri() + "/"
    page = render(folder.name, summary, rounds, read_config(folder), site_steps.read_steps(folder), base)
    atomic_write(target, page)
    return target
