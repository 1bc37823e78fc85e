"""The deployment walk-through of docs/deploy.md, run as written, on 127.0.0.1.

The walk-through's commands are read from the page's section "## Across machines (TLS and node
authentication)", which carries the marker line ``<!-- deploy-walkthrough -->`` (the test fails when
the page or the marker is missing: a walk-through that is not run may have gone stale). Every
```bash block of the section whose first line says where it runs (``# on the server machine``,
``# on site N``, ``# on the submitting machine``) is one step, run in document order by ``bash`` with ``set -euo pipefail``:

* each machine is a folder of its own holding a copy of the checkout (the files ``git ls-files``
  lists, as they are in the working tree), in which its commands run, with its own ``FLWR_HOME``;
* what the text says to send from one machine to another is copied between their folders
  (``TRANSFERS``), just before the receiving machine's next step;
* the placeholders of the text are filled in by ``substitutions`` (below): host names become
  127.0.0.1, ports become free ports, ``/data/fedtextgrad`` a folder with a generated
  ``object_counting.json``, the results folder a temporary one, ``vllm serve ...`` the project's
  counting sim server (``python -m tests.support.deployment_helpers sim-server --port P``), the run is made
  short, and ``pip install .`` is skipped (this Python has the checkout installed).

A first run must finish with both sites, each labelled by the name its key was registered under,
with requests on every site's LLM server and on the server's. A second run loses site 1 mid-run
(its SuperNode stopped by PID with ``deploy/stop.sh supernode-1``, as the text says) and must go
on and finish, as the text promises for ``min-train-clients=1``; a third, with the default
``min-train-clients=2``, must stop with the one line the text shows. Also: start-supernode.sh's
refusals (an unregistered key, against the walk-through's SuperLink; a --data-source path that
does not exist), add-connection.sh keeping Flower's ``local`` connection, .gitignore covering the
generated folders, and the facts the text states.

Everything is stopped by PID at the end, also on failure: the text's own ``deploy/stop.sh`` lines
first, then stop.sh by state folder and SIGKILL by PID for anything left (tests/deployment_helpers).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomli

from tests.support.deployment_helpers import (
    DEPLOYMENT_MARKS,
    QUIET_ENV,
    ROOT,
    SERVED,
    Deployment,
    Started,
    alive,
    descendants,
    free_ports,
    kill_pids,
    own_deployment,
    read_results,
    serves_models,
    wait_until,
)

pytestmark = DEPLOYMENT_MARKS

PAGE = ROOT / "docs" / "deploy.md"
SECTION = "## Across machines (TLS and node authentication)"
MARKER = "<!-- deploy-walkthrough -->"

SITES = ("site-0", "site-1")
MACHINES = ("server", *SITES, "submit")
CONNECT_TIMEOUT = 120
RUN_TIMEOUT = 600
# the short run of tests/integration/test_deployment.py; the sites read a data file of 250 examples (the BBH
# reference split), so validation and test are cut to a few examples as well
SHORT_RUN = "num-server-rounds=2 local-steps=1 batch-size=2 max-val-examples=12 max-test-examples=12"

# What the text says to send, as (from machine, file there, to machine, file there, make the folder).
# The sites make their certs/ folder themselves (the text's `mkdir -p certs`); the test makes the
# server's received/ and the submitter's certs/, which the text only names.
TRANSFERS = (
    ("server", "certs/ca.crt", "site-0", "certs/ca.crt", False),
    ("server", "certs/ca.crt", "site-1", "certs/ca.crt", False),
    ("server", "certs/ca.crt", "submit", "certs/ca.crt", True),
    ("site-0", "keys/site-0.pub", "server", "received/site-0.pub", True),
    ("site-1", "keys/site-1.pub", "server", "received/site-1.pub", True),
)


# --- the text ------------------------------------------------------------------------------------

def _section(markdown: str) -> str:
    """The walk-through's section of a markdown text ('' if it has none)."""
    lines = markdown.splitlines()
    try:
        start = lines.index(SECTION)
    except ValueError:
        return ""
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


def walkthrough_text() -> str:
    """The section of the page, which must carry the marker."""
    section = _section(PAGE.read_text(encoding="utf-8"))
    assert MARKER in section, f"{PAGE.relative_to(ROOT)} has no section '{SECTION}' carrying {MARKER}"
    return section


@dataclass(frozen=True)
class Step:
    machine: str  # server, site-N, submit
    script: str


def steps_of(section: str) -> list[Step]:
    """The bash blocks that say on which machine they run, in document order."""
    steps = []
    for block in re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M):
        first = block.splitlines()[0] if block.strip() else ""
        where = re.match(r"# on (the server machine|site (\d+)|the submitting machine)\b", first)
        if not where:
            continue  # e.g. the local SuperLink's or the compose demo's commands
        machine = ("server" if where.group(1) == "the server machine"
                   else "submit" if where.group(1) == "the submitting machine" else f"site-{where.group(2)}")
        steps.append(Step(machine, block))
    return steps


@pytest.fixture(scope="module")
def text():
    return walkthrough_text()


# --- the machines ----------------------------------------------------------------------------------

def checkout_files() -> list[str]:
    """The checkout's files: tracked or new, not ignored (no caches, wheels, results, keys)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return [name for name in listed if name and (ROOT / name).is_file()]


def bbh_file(path: Path, size: int = 250) -> None:
    """object_counting.json in BIG-Bench Hard's format, generated (250: the reference split's size)."""
    from fedtextgrad_core.data.synthetic import generate

    path.parent.mkdir(parents=True, exist_ok=True)
    examples = [{"input": e.question, "target": e.answer} for e in generate("object_counting", size, 0)]
    path.write_text(json.dumps({"examples": examples}), encoding="utf-8")


@dataclass
class Machine:
    name: str
    folder: Path
    llm_port: int = 0
    node_port: int = 0

    @property
    def checkout(self) -> Path:
        return self.folder / "checkout"

    @property
    def flwr_home(self) -> Path:
        return self.folder / "flwr-home"

    @property
    def data(self) -> Path:
        return self.folder / "data" / "fedtextgrad"

    @property
    def llm_url(self) -> str:
        return f"http://127.0.0.1:{self.llm_port}/v1"

    def served(self) -> int:
        log = self.checkout / "llm-server.log"
        return log.read_text(errors="replace").count(SERVED) if log.exists() else 0

    def state(self, name: str) -> Path:
        return self.checkout / "deploy-state" / name

    def log(self, name: str) -> str:
        try:
            return (self.state(name) / "log").read_text(errors="replace")
        except OSError:
            return ""

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("FLWR_HOME", "FEDTEXTGRAD_DEPLOY_STATE")}
        env.update(QUIET_ENV, FLWR_HOME=str(self.flwr_home), PYTHONUNBUFFERED="1")
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def bash(self, script: str, timeout: float = 300, background: bool = False):
        """Run commands in this machine's checkout, with its FLWR_HOME, as `bash` with set -euo pipefail."""
        command = ["bash", "-c", "set -euo pipefail\n" + script]
        if background:
            return subprocess.Popen(command, cwd=self.checkout, env=self.env(), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return subprocess.run(command, cwd=self.checkout, env=self.env(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, check=False)


def substitutions(machine: Machine, server: Machine, link_port: int, results: Path, run_name: str
                  ) -> list[tuple[str, str]]:
    """The placeholders of the text and what they become on ``machine`` (regex, replacement):

    - ``pip install .``: skipped, this Python has the checkout installed;
    - ``superlink.example.org`` and ``203.0.113.7``: 127.0.0.1; ``--host 0.0.0.0``: ``--host 127.0.0.1``;
    - port 9093 (the SuperLink): a free port; port 9094 (a SuperNode's local port): a free port per site;
    - ``vllm serve MODEL --host 127.0.0.1 --port 8000``: the counting sim server, on a free port per machine;
    - port 8000 (an LLM server): that machine's sim server port; in the submit step the server
      machine's, since its run config names the server's LLM (the ServerApp runs there);
    - ``/data/fedtextgrad``: that site's folder with a generated ``object_counting.json``;
    - ``/srv/fedtextgrad/results``: a temporary results folder; ``num-server-rounds=3``: ``SHORT_RUN``
      and a ``run-name``;
    - a line ending in `` &`` (a process left in the background): the same, with its PID appended
      to ``walkthrough-pids`` so that it is stopped by PID at the end.
    """
    llm = server if machine.name == "submit" else machine
    sim = f"{sys.executable} -m tests.support.deployment_helpers sim-server --port {llm.llm_port}"
    return [
        (r"(?m)^pip install \.$", ": pip install . skipped"),
        (r"superlink\.example\.org", "127.0.0.1"),
        (r"203\.0\.113\.7", "127.0.0.1"),
        (r"--host 0\.0\.0\.0", "--host 127.0.0.1"),
        (r"\b9093\b", str(link_port)),
        (r"\b9094\b", str(machine.node_port)),
        (r"vllm serve Qwen/Qwen2\.5-7B-Instruct --host 127\.0\.0\.1 --port 8000", sim),
        (r"\b8000\b", str(llm.llm_port)),
        (r"/data/fedtextgrad", str(machine.data)),
        (r"/srv/fedtextgrad/results", str(results)),
        (r"num-server-rounds=3", f"{SHORT_RUN} run-name='{run_name}'"),
        (r"(?m)\s&\s*(#.*)?$", " & echo $! >>walkthrough-pids"),
    ]


def fill(script: str, table: list[tuple[str, str]]) -> str:
    for pattern, replacement in table:
        script = re.sub(pattern, lambda _m, r=replacement: r, script)
    return script


@dataclass
class Walkthrough:
    root: Path
    steps: list[Step]
    machines: dict[str, Machine]
    link_port: int
    results: Path
    deployment: Deployment
    outputs: list[str] = field(default_factory=list)
    popens: list[subprocess.Popen] = field(default_factory=list)
    done: set[tuple] = field(default_factory=set)

    @property
    def server(self) -> Machine:
        return self.machines["server"]

    def transfer_to(self, machine: Machine) -> None:
        """Copy what the text says to send to ``machine``, once the sender has made it."""
        for transfer in TRANSFERS:
            source, path, target, dest, make_folder = transfer
            src = self.machines[source].checkout / path
            dst = self.machines[target].checkout / dest
            if target != machine.name or transfer in self.done or not src.exists():
                continue
            if not dst.parent.is_dir():
                if not make_folder:
                    continue  # the text has the receiver make it; copied before its next step
                dst.parent.mkdir(parents=True)
            shutil.copyfile(src, dst)
            self.done.add(transfer)

    def table(self, machine: Machine, run_name: str = "walkthrough") -> list[tuple[str, str]]:
        return substitutions(machine, self.server, self.link_port, self.results, run_name)

    def run(self, step: Step, timeout: float = 300) -> str:
        machine = self.machines[step.machine]
        self.transfer_to(machine)
        done = machine.bash(fill(step.script, self.table(machine)), timeout=timeout)
        output = done.stdout + done.stderr
        self.note(f"{step.machine}:\n{step.script}", output)
        self.record(machine)
        assert done.returncode == 0, f"step on {step.machine} exited {done.returncode}:\n{step.script}\n{output}"
        return output

    def note(self, what: str, output: str) -> None:
        """Keep a step's output, in memory and in <root>/walkthrough-output.log (to read after a failure)."""
        self.outputs.append(f"--- {what}\n{output}")
        with (self.root / "walkthrough-output.log").open("a", encoding="utf-8") as log:
            log.write(f"--- {what}\n{output}\n")

    def record(self, machine: Machine) -> None:
        """Note every PID the machine's commands started (the scripts' pid files, the background LLM
        servers), so they can be stopped by PID whatever happens."""
        known = {s.pid for s in self.deployment.started} | set(self.deployment.extra_pids)
        for pid_file in sorted((machine.checkout / "deploy-state").glob("*/pid")):
            pid = int(pid_file.read_text())
            if pid not in known:
                self.deployment.started.append(Started(pid_file.parent.name, pid, pid_file.parent, ""))
        pids = machine.checkout / "walkthrough-pids"
        if pids.exists():
            for pid in map(int, pids.read_text().split()):
                if pid not in known:
                    self.deployment.extra_pids.append(pid)

    def submit(self, run_name: str, extra: tuple[tuple[str, str], ...] = (), background: bool = False):
        """The text's submit step (filled in), with ``extra`` substitutions on top."""
        submit = self.machines["submit"]
        (step,) = [s for s in self.steps if s.machine == "submit"]
        self.transfer_to(submit)
        script = fill(fill(step.script, self.table(submit, run_name)), list(extra))
        if background:
            process = submit.bash(script, background=True)
            self.popens.append(process)
            self.deployment.extra_pids.append(process.pid)
            return process
        began = time.monotonic()
        done = submit.bash(script, timeout=RUN_TIMEOUT)
        self.note(f"submit {run_name}: exit {done.returncode}", done.stdout + done.stderr)
        return done.returncode, done.stdout + done.stderr, time.monotonic() - began

    def stop(self) -> None:
        """The text's stop commands in each machine's checkout, then everything left, by PID."""
        pids = [s.pid for s in self.deployment.started] + list(self.deployment.extra_pids)
        tree = pids + [child for pid in pids if alive(pid) for child in descendants(pid)]
        for process in self.popens:
            if process.poll() is None:
                kill_pids([process.pid, *descendants(process.pid)])
        for name, machine in self.machines.items():
            states = ["superlink"] if name == "server" else [f"supernode-{name.split('-')[1]}"] if name in SITES else []
            for state in states:
                if (machine.state(state) / "pid").exists():
                    machine.bash(f"deploy/stop.sh {state} --timeout 10", timeout=120)
        self.deployment.stop_all()
        leftovers = [pid for pid in tree if alive(pid)]
        if leftovers:
            wait_until(lambda: not any(alive(pid) for pid in leftovers), 10)
            kill_pids([pid for pid in leftovers if alive(pid)])


@pytest.fixture(scope="module")
def walkthrough(text, tmp_path_factory):
    """Steps 1-4 of the text on four "machines" (server, site-0, site-1, submitter): certificates,
    SuperLink, keys, LLM servers, registration, SuperNodes. The submit step is the tests' own."""
    root = tmp_path_factory.mktemp("walkthrough")
    steps = steps_of(text)
    assert [s.machine for s in steps] == ["server", "site-0", "site-1", "server", "site-0", "site-1", "submit"], \
        [s.machine for s in steps]
    link_port, *ports = free_ports(1 + 2 * len(MACHINES))
    machines = {name: Machine(name, root / name, llm_port=ports[2 * i], node_port=ports[2 * i + 1])
                for i, name in enumerate(MACHINES)}
    files = checkout_files()
    for machine in machines.values():
        for name in files:  # the checkout, as a copy of its own (flwr run ignores symlinked files)
            (machine.checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, machine.checkout / name)
        machine.flwr_home.mkdir(parents=True)
    for site in SITES:
        bbh_file(machines[site].data / "object_counting.json")
    deployment = Deployment(root / "test-side")  # stops by PID, and runs the extra nodes of the tests
    walk = Walkthrough(root, steps, machines, link_port, root / "results", deployment)
    began = time.monotonic()
    try:
        # every placeholder of the substitution table is in the text (so the table follows the text)
        whole = "\n".join(s.script for s in steps)
        for pattern, _ in walk.table(machines["server"]):
            if pattern != r"\b9094\b":
                assert re.search(pattern, whole), f"the text no longer has {pattern!r}: update substitutions()"
        for index, step in enumerate(steps[:-1]):
            if index == 4:  # before the SuperNodes: the LLM servers the text started answer
                for machine in (machines["server"], *(machines[s] for s in SITES)):
                    assert wait_until(lambda m=machine: serves_models(m.llm_url), 60), machine.name
            walk.run(step)
        seconds = time.monotonic() - began
        print(f"\nwalkthrough: steps 1-4 (certificates to connected SuperNodes) took {seconds:.1f} s")
        yield walk
    finally:
        walk.stop()
        assert not [pid for pid in walk.deployment.all_pids() if alive(pid)]


def _check_finished(run_dir: Path, output: str) -> tuple[dict, list[dict]]:
    assert (run_dir / "summary.json").exists(), output[-5000:]
    summary, rounds = read_results(run_dir)
    assert summary["finished"] is True, (summary.get("error"), output[-5000:])
    assert summary["rounds"] == 2 and len(rounds) == 2
    assert summary["test_accuracy"] is not None
    return summary, rounds


class TestWalkthrough:
    """The text's commands, as written, on four folders that stand for four machines."""

    def test_the_walkthrough_runs_a_federation_with_named_sites(self, walkthrough):
        walk, server = walkthrough, walkthrough.server
        sites = [walk.machines[s] for s in SITES]
        # step 1-4 as the text says: TLS, node authentication, the keys registered under their names
        link_command = (server.state("superlink") / "command").read_text()
        assert "--enable-supernode-auth" in link_command and "--insecure" not in link_command
        for index, site in enumerate(sites):
            command = (site.state(f"supernode-{index}") / "command").read_text()
            assert "--auth-supernode-private-key" in command and f"keys/site-{index}" in command
            assert str(site.data) in command and "llm-startup-wait=600" in command
            assert "SuperNode ID:" in site.log(f"supernode-{index}")
        registered = "\n".join(o for o in walk.outputs if "register-node.sh" in o)
        assert "as 'site-0'" in registered and "as 'site-1'" in registered

        before = [m.served() for m in (server, *sites)]
        code, output, seconds = walk.submit("walkthrough")
        print(f"\nwalkthrough: the submitted 2-round run took {seconds:.1f} s")
        assert code == 0, output[-5000:]
        assert output.count("online") >= 2, output[-5000:]  # `flwr supernode list fed` showed both sites online
        _, rounds = _check_finished(walk.results / "walkthrough", output)
        for record in rounds:  # both sites, each labelled by the name its key was registered under
            assert {c["label"] for c in record["uploads"]} == {"0 (site-0)", "1 (site-1)"}, record["failures"]
            assert record["failures"] == []
        served = [m.served() - b for m, b in zip((server, *sites), before)]
        assert all(count > 0 for count in served), served  # every site's LLM server, and the server's

    def test_a_site_whose_key_is_not_registered_is_told_what_to_do(self, walkthrough, tmp_path):
        """A third SuperNode, with a key nobody registered, against the walk-through's SuperLink."""
        deployment = walkthrough.deployment
        deployment.script("gen-node-keys.sh", "--name", "site-2", "--out", str(tmp_path / "keys"))
        (port,) = free_ports(1)
        began = time.monotonic()
        node = deployment.start(
            "start-supernode.sh", "site-2", "--superlink", f"127.0.0.1:{walkthrough.link_port}",
            "--ca", str(walkthrough.server.checkout / "certs" / "ca.crt"), "--auth-key", str(tmp_path / "keys" / "site-2"),
            "--partition-id", "0", "--num-partitions", "2", "--port", str(port), "--wait-connected", "90", check=False)
        assert node.returncode != 0
        assert time.monotonic() - began < 120
        assert not alive(node.pid) and "SuperNode ID:" not in node.log
        lines = node.output.splitlines()
        stopped = [i for i, line in enumerate(lines)
                   if f"'{node.name}' (PID {node.pid}) stopped before the SuperLink accepted it" in line
                   or f"the SuperNode (PID {node.pid}) exited during start" in line]
        assert stopped, node.output
        reason = " ".join(lines[stopped[0]:stopped[0] + 2])  # on the same or the next line
        assert "it is not registered" in reason, node.output
        assert f"{tmp_path / 'keys' / 'site-2'}.pub" in reason and "register-node.sh" in reason, node.output
        assert "received/site-2.pub" in reason
        assert "No SuperNode found with the given public key" in (walkthrough.server.state("superlink") / "log").read_text()

    def test_a_lost_site_does_not_end_the_run(self, walkthrough):
        """Site 1's SuperNode is stopped by PID (deploy/stop.sh, as the text says) during round 1: with
        the text's min-train-clients=1 the run goes on with site 0 and finishes."""
        walk = walkthrough
        site = walk.machines["site-1"]
        trains_before = site.log("supernode-1").count("Receiving: train message")
        pid = int((site.state("supernode-1") / "pid").read_text())
        began = time.monotonic()
        run = walk.submit("lost-site", background=True)
        try:
            assert wait_until(lambda: site.log("supernode-1").count("Receiving: train message") > trains_before
                              or run.poll() is not None, RUN_TIMEOUT), site.log("supernode-1")[-3000:]
            assert run.poll() is None, run.communicate()[0][-3000:]
            stopped = site.bash("deploy/stop.sh supernode-1", timeout=120)
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr
            assert not alive(pid)
            output, _ = run.communicate(timeout=RUN_TIMEOUT)
            walk.note("submit lost-site", output)
        finally:
            if run.poll() is None:
                kill_pids([run.pid, *descendants(run.pid)])
                run.wait()
        print(f"\nwalkthrough: the run that lost site 1 took {time.monotonic() - began:.1f} s")
        assert run.returncode == 0, output[-5000:]
        assert "fedtextgrad: the run stopped" not in output, output[-5000:]
        _, (first, second) = _check_finished(walk.results / "lost-site", output)
        assert {c["label"] for c in second["uploads"]} == {"0 (site-0)"}, second
        lost = [f for record in (first, second) for f in record["failures"]]
        # reported as site 1: by its registered name ("site-1" when it was lost before its first reply,
        # which says its partition: "1 (site-1)")
        assert lost and all(f["label"] in ("site-1", "1 (site-1)") for f in lost), lost
        assert {c["label"] for c in first["uploads"]} <= {"0 (site-0)", "1 (site-1)"}

    def test_with_the_default_min_train_clients_a_lost_site_stops_the_run_with_one_line(self, walkthrough):
        """Site 1 is gone (previous test); min-train-clients=2 cannot be met, and the run says so."""
        walk = walkthrough
        assert not (walk.machines["site-1"].state("supernode-1") / "pid").exists()  # stopped by the previous test
        two = ((r"min-train-clients=1", "min-train-clients=2 wait-for-clients=3"),)
        code, output, seconds = walk.submit("needs-two", extra=two)
        print(f"\nwalkthrough: the run that needed two sites stopped after {seconds:.1f} s")
        assert code == 0  # flwr run reports the submission, not the run (the text says so)
        stops = [line for line in output.splitlines() if "fedtextgrad: the run stopped:" in line]
        assert len(stops) == 1 and "min-train-clients" in stops[0], output[-5000:]
        print(f"walkthrough: {stops[0].strip()}")
        summary, _ = read_results(walk.results / "needs-two")
        assert summary["finished"] is False and "min-train-clients" in summary["error"]


# --- checks without a deployment --------------------------------------------------------------------

@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    yield from own_deployment(tmp_path_factory, "walkthrough-offline")


class TestScriptChecks:
    def test_a_data_source_path_that_does_not_exist_is_refused_before_anything_starts(self, offline, tmp_path):
        (port,) = free_ports(1)
        missing = tmp_path / "no-such-folder"
        began = time.monotonic()
        done = offline.script("start-supernode.sh", "--insecure", "--superlink", f"127.0.0.1:{port}", "--partition-id", "0",
                              "--num-partitions", "2", "--data-source", str(missing), "--name", "no-data", check=False,
                              timeout=60)
        assert done.returncode != 0
        assert done.stderr.strip().splitlines() == [
            f"start-supernode.sh: error: --data-source '{missing}' does not exist on this machine: give the file or "
            "folder holding this site's data (e.g. a folder with object_counting.json), or synthetic / hub"]
        assert time.monotonic() - began < 30
        assert not (offline.state_root / "no-data" / "pid").exists()

    @pytest.mark.parametrize("source", ["synthetic", "hub", "file", "folder"])
    def test_synthetic_hub_and_existing_paths_pass_the_data_source_check(self, offline, tmp_path, source):
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "object_counting.json").write_text("{}")
        value = {"file": str(tmp_path / "data" / "object_counting.json"), "folder": str(tmp_path / "data")}.get(source, source)
        with socket.socket() as busy:  # a port in use: the script stops there, after the data check
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            done = offline.script("start-supernode.sh", "--insecure", "--superlink", "127.0.0.1:9", "--partition-id", "0",
                                  "--num-partitions", "2", "--data-source", value, "--port", str(busy.getsockname()[1]),
                                  "--name", f"data-{source}", check=False, timeout=60)
        assert done.returncode != 0
        assert "--data-source" not in done.stderr and "is in use" in done.stderr, done.stderr
        assert not (offline.state_root / f"data-{source}" / "pid").exists()

    def test_add_connection_keeps_flowers_local_connection(self, offline, tmp_path):
        ca = tmp_path / "ca.crt"
        ca.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
        fresh, old = tmp_path / "fresh", tmp_path / "old"
        old.mkdir()
        (old / "config.toml").write_text(
            '[superlink]\ndefault = "x"\n\n[superlink.x]\naddress = "127.0.0.1:1"\ninsecure = true\n')
        for home in (fresh, old):
            offline.script("add-connection.sh", "--name", "fed", "--superlink", "127.0.0.1:9093", "--ca", str(ca),
                           "--flwr-home", str(home), timeout=60)
            # Flower reads both connections back; nothing is started by reading
            read = subprocess.run(
                [sys.executable, "-c", "from flwr.cli.flower_config import read_superlink_connection as read\n"
                 "for name in ('local', 'fed'):\n    c = read(name)\n    print(name, c.address, c.root_certificates)"],
                env=dict(os.environ, FLWR_HOME=str(home)), capture_output=True, text=True, timeout=60, check=False)
            assert read.returncode == 0, read.stdout + read.stderr
            assert f"local :local: None\nfed 127.0.0.1:9093 {ca}" in read.stdout, read.stdout
        from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

        written = tomli.loads((fresh / "config.toml").read_text())
        flowers = tomli.loads(DEFAULT_FLOWER_CONFIG_TOML)
        assert {k: v for k, v in written["superlink"].items() if k != "fed"} == flowers["superlink"]  # as Flower writes it
        kept = tomli.loads((old / "config.toml").read_text())["superlink"]
        assert kept["default"] == "x" and kept["x"] == {"address": "127.0.0.1:1", "insecure": True}

    def test_gitignore_covers_what_the_deployment_makes(self):
        for path in ("certs/ca.key", "certs/server.key", "certs/ca.crt", "keys/site-0", "keys/site-0.pub",
                     "received/site-0.pub", "deploy-state/superlink/pid", "llm-server.log"):
            done = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT, check=False)
            assert done.returncode == 0, f"{path} is not ignored by .gitignore"


class TestTheText:
    """What the issue asked the text to say, said, and consistent with the project."""

    def test_the_text_states_the_versions_the_project_pins(self, text):
        project = tomli.loads((ROOT / "pyproject.toml").read_text())["project"]
        (pin,) = [d for d in project["dependencies"] if d.startswith("flwr")]
        assert pin == "flwr==1.42.0" and f"`{pin}`" in text  # a site's Flower: no simulation extra
        assert project["requires-python"] == ">=3.11" and "Python 3.11 or newer" in text

    @pytest.mark.parametrize("said", [
        "min-train-clients=1", "fedtextgrad: the run stopped:", "llm-startup-wait", "--node-config \"llm-startup-wait=600\"",
        "0 (site-0)", "cannot pose as another", "received/site-0.pub", "mkdir -p certs", "--auth-key keys/site-1",
        "deploy/stop.sh supernode-1", "deploy/stop.sh superlink", "runs in the checkout", "`.gitignore`",
        "`local` connection", "--data-source", "flwr run` exits 0",
    ])
    def test_the_text_says_it(self, text, said):
        assert said in text

    @pytest.mark.parametrize("said", [
        "pgrep -af", "ss -ltnp", "39091", "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "deploy/stop.sh superlink",
    ])
    def test_the_troubleshooting_page_says_how_to_find_the_local_superlink(self, said):
        """`flwr run . local`'s background SuperLink is not part of a deployment: its page is troubleshooting."""
        assert said in (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")

    def test_the_scripts_help_names_the_node_config_pass_through(self):
        done = subprocess.run(["bash", str(ROOT / "deploy" / "start-supernode.sh"), "--help"], capture_output=True,
                              text=True, timeout=60, check=True)
        assert "llm-startup-wait=600" in done.stdout and "--data-source" in done.stdout
