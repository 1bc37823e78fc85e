"""A real multi-process deployment on 127.0.0.1, driven by the deploy/ scripts as an operator runs them.

Two deployments, each started once for its test class and stopped by PID afterwards:

* ``plain`` (TestPlainDeployment): an insecure SuperLink and three SuperNodes (``--insecure``,
  loopback only), the nodes started *before* the SuperLink (they must retry and connect when it
  comes up). One 2-round run with ``min-train-clients=2`` in which SuperNode 2 is killed by PID
  (SIGKILL, with its app processes) during round 1's training: two clients answer every round,
  the round reports the missing one, the run goes on. Then a run whose ServerApp process is killed
  in round 2 is resumed with ``resume-from`` and ends like an uninterrupted run.
* ``secure`` (TestSecureDeployment): TLS and node authentication, certificates and keys made by
  gen-certs.sh and gen-node-keys.sh, keys registered with register-node.sh, and the process
  isolation of the docker compose demo: SuperLink + ServerApp runner, two SuperNodes + their
  ClientApp runners (deploy/compose/compose.yaml has the same processes with the same flags).
  A node with an unregistered key, a node and a ``flwr run`` without the CA are refused.

Every SuperNode has its own FLWR_HOME (its state folder) and its own LLM server: a separate sim
server process per node (``python -m tests.support.deployment_helpers sim-server``, which counts the
requests it answers), named in that node's ``--node-config`` only; the run config keeps
``llm-backend='sim'`` (in-process). So requests reaching every node's server prove each node's
own config was used. Runs are submitted with ``flwr run . <connection>`` from a separate
FLWR_HOME and checked by the results folder, since ``flwr run`` may exit 0 when the run failed.
TestStartChecks covers what the scripts refuse before starting anything.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.deployment_helpers import (
    DEPLOY,
    DEPLOYMENT_MARKS,
    ROOT,
    Deployment,
    alive,
    cmdline,
    descendants,
    free_ports,
    kill_pids,
    own_deployment,
    read_results,
    wait_until,
)
from tests.support.flower_loopback import LoopbackGrid, default_run_config
from tests.support.resume_helpers import outcome, run_server

pytestmark = DEPLOYMENT_MARKS

CONNECT_TIMEOUT = 120  # a SuperNode retries with backoff (up to 20 s between tries)
RUN_TIMEOUT = 540
# Short runs: 2 rounds, one local step, small synthetic splits.
# the sites' clients use their own (sim-over-HTTP) servers; the server merges with the simulator on purpose
RUN_CONFIG = ("num-server-rounds=2 min-train-clients=2 local-steps=1 batch-size=2 synthetic-size=60 "
              "server-backend='sim'")


def _settings(line: str) -> dict[str, object]:
    """``key=value`` pairs of a --run-config line (numbers, or text in single quotes) as a dict."""
    pairs = (pair.split("=") for pair in line.split())
    return {key: value.strip("'") if value.startswith("'") else int(value) for key, value in pairs}


def _connected(started) -> bool:
    return "SuperNode ID:" in started.log


def _said_it_stopped(started) -> bool:
    """The start script's line for a SuperNode that the SuperLink refused (early or late in its start)."""
    return (f"'{started.name}' (PID {started.pid}) stopped before the SuperLink accepted it" in started.output
            or f"the SuperNode (PID {started.pid}) exited during start" in started.output)


def _run(deployment: Deployment, flwr_home: Path, connection: str, results: Path, name: str, extra: str = ""):
    """``flwr run . CONNECTION`` with a short config; returns (output, seconds)."""
    began = time.monotonic()
    done = deployment.flwr(flwr_home, "run", ".", connection, "--stream", "--run-config",
                           f"{RUN_CONFIG} results-dir='{results}' run-name='{name}' {extra}".strip(),
                           timeout=RUN_TIMEOUT)
    return done.stdout + done.stderr, time.monotonic() - began


def _refused_supernode(secure: dict, name: str, ca: Path, key: Path, partition: int):
    """start-supernode.sh for a node the secure SuperLink must refuse: the script fails and says
    so within two minutes, the node never got an id, and nothing of it is left running."""
    (port,) = free_ports(1)
    began = time.monotonic()
    node = secure["deployment"].start("start-supernode.sh", name, "--superlink", secure["address"],
                                      "--ca", str(ca), "--auth-key", str(key), "--partition-id", str(partition),
                                      "--num-partitions", "2", "--port", str(port), "--wait-connected", "90",
                                      check=False)
    assert node.returncode != 0
    assert _said_it_stopped(node), node.output
    assert "SuperNode ID:" not in node.log
    assert not alive(node.pid)
    assert time.monotonic() - began < 120
    return node


def _check_complete_run(run_dir: Path, output: str, clients: set[str]) -> tuple[dict, list[dict]]:
    assert (run_dir / "summary.json").exists(), output[-4000:]
    summary, rounds = read_results(run_dir)
    assert summary["finished"] is True, (summary.get("error"), output[-4000:])
    assert summary["rounds"] == 2
    assert len(rounds) == 2
    for record in rounds:
        assert {c["label"] for c in record["uploads"]} == clients, record["failures"]
        assert record["failures"] == []
    assert summary["test_accuracy"] is not None
    return summary, rounds


# --- the plain deployment -----------------------------------------------------------------

@pytest.fixture(scope="class")
def plain(tmp_path_factory):
    """An insecure SuperLink and three SuperNodes, each node with its own sim server; the nodes start first."""
    deployment = Deployment(tmp_path_factory.mktemp("plain"))
    try:
        sims = [deployment.sim_server(f"sim-{i}") for i in range(3)]
        link_port, *node_ports = free_ports(4)
        superlink = f"127.0.0.1:{link_port}"
        # the SuperNodes first: nothing answers yet, they must keep retrying
        nodes = deployment.start_many(*[
            ("start-supernode.sh", f"supernode-{i}", "--insecure", "--superlink", superlink,
             "--partition-id", str(i), "--num-partitions", "3", "--llm-base-url", sims[i].url, "--llm-model", "sim",
             "--port", str(node_ports[i]))
            for i in range(3)
        ])
        link = deployment.start("start-superlink.sh", "superlink", "--insecure", "--port", str(link_port))
        for node in nodes:
            assert wait_until(lambda node=node: _connected(node), CONNECT_TIMEOUT), node.log[-3000:]
        home = deployment.root / "submitter"
        deployment.script("add-connection.sh", "--name", "plain", "--superlink", superlink, "--insecure",
                          "--flwr-home", str(home))
        yield {"deployment": deployment, "sims": sims, "nodes": nodes, "superlink": link,
               "address": superlink, "home": home}
    finally:
        deployment.stop_all()
        assert not [pid for pid in deployment.all_pids() if alive(pid)]


@pytest.fixture(scope="class")
def plain_run(plain, tmp_path_factory):
    """One 2-round run (min-train-clients=2) in which SuperNode 2 is killed by PID during round 1's training."""
    deployment, victim = plain["deployment"], plain["nodes"][2]
    results = tmp_path_factory.mktemp("plain-results")
    before = [sim.served() for sim in plain["sims"]]
    env = dict(deployment.env, FLWR_HOME=str(plain["home"]))
    began = time.monotonic()
    run = subprocess.Popen(
        ["flwr", "run", ".", "plain", "--stream", "--run-config",
         f"{RUN_CONFIG} results-dir='{results}' run-name='plain'"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deployment.extra_pids.append(run.pid)
    killed = []
    try:
        # the victim has received its first message (the start prompt's evaluation with round 1's
        # training); it dies before it can reply, most likely while its ClientApp process still starts
        assert wait_until(lambda: "Receiving: train message" in victim.log, RUN_TIMEOUT), victim.log[-3000:]
        killed = [victim.pid, *descendants(victim.pid)]
        kill_pids(killed, signal.SIGKILL)  # a site that crashes mid-round: no goodbye to the SuperLink
        assert wait_until(lambda: not any(alive(pid) for pid in killed), 10)
        output, _ = run.communicate(timeout=RUN_TIMEOUT)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    seconds = time.monotonic() - began
    print(f"\nplain deployment: 2-round run with one SuperNode killed took {seconds:.1f} s")
    served = [sim.served() - b for sim, b in zip(plain["sims"], before)]
    return {"dir": results / "plain", "output": output, "served": served, "killed": killed}


class TestPlainDeployment:
    """Insecure SuperLink and SuperNodes on loopback; the nodes start first; one node dies mid-round."""

    def test_scripts_report_pid_log_and_state_and_warn_about_insecure_mode(self, plain):
        for started in [plain["superlink"], *plain["nodes"]]:
            assert f"PID {started.pid}" in started.output
            assert f"log:       {started.state}/log" in started.output
            assert f"state:     {started.state}" in started.output
            assert "runs WITHOUT TLS and WITHOUT node authentication" in started.output
            assert alive(started.pid)
            assert (started.state / "flwr-home").is_dir()  # every process has its own FLWR_HOME
        # runtime dependency installation is off: the machines have the app installed
        assert "--disable-runtime-dependency-installation" in (plain["superlink"].state / "command").read_text()

    def test_supernodes_started_before_the_superlink_retry_and_connect_when_it_comes_up(self, plain):
        for node in plain["nodes"]:
            assert f"nothing answers on {plain['address']} yet" in node.output
            log = node.log
            assert "Connection attempt failed, retrying" in log
            assert log.index("Connection attempt failed") < log.index("SuperNode ID:")

    def test_plain_deployment_runs_two_rounds_with_each_node_on_its_own_llm_server(self, plain_run):
        output = plain_run["output"]
        assert (plain_run["dir"] / "summary.json").exists(), output[-4000:]
        summary, rounds = read_results(plain_run["dir"])
        assert summary["finished"] is True, (summary.get("error"), output[-4000:])
        assert summary["rounds"] == 2 and len(rounds) == 2
        for record in rounds:  # two clients answered every round
            assert {c["label"] for c in record["uploads"]} == {"0", "1"}, record["failures"]
            assert all(c["reply"]["local"]["llm_calls"] > 0 for c in record["uploads"])
        assert summary["test_accuracy"] is not None
        # each node's requests went to its own server, named only in that node's --node-config (the
        # killed node's server may have been asked or not, depending on when it died)
        assert all(count > 0 for count in plain_run["served"][:2]), plain_run["served"]

    def test_a_supernode_killed_during_a_round_is_reported_and_the_run_goes_on(self, plain, plain_run):
        summary, (first, second) = read_results(plain_run["dir"])
        missing = [f for f in first["failures"] if f["stage"] == "train"]
        assert len(missing) == 1, first["failures"]
        assert "Node Unavailable" in missing[0]["reason"]
        # the SuperLink answers for a vanished node with its own id; the strategy still names the victim,
        # by its node id: it died before its first reply, which would have said its partition
        victim_id = int(re.search(r"SuperNode ID: (\d+)", plain["nodes"][2].log).group(1))
        assert missing[0]["node_id"] == victim_id and missing[0]["label"] == f"node {victim_id}", missing
        assert "FAILED" in plain_run["output"]  # the round table showed it
        assert second["failures"] == []  # the run went on with the nodes that were left
        assert summary["finished"] is True
        assert not any(alive(pid) for pid in plain_run["killed"])

    def test_a_killed_serverapp_resumes_and_ends_like_an_uninterrupted_run(self, plain, tmp_path):
        """The ServerApp process the SuperLink started is killed (SIGKILL, by PID) in round 2; a new
        `flwr run` with resume-from continues the run in its folder, with the same SuperNodes."""
        deployment, run_dir = plain["deployment"], tmp_path / "resumed"
        run = subprocess.Popen(
            ["flwr", "run", ".", "plain", "--stream", "--run-config",
             f"{RUN_CONFIG} results-dir='{tmp_path}' run-name='resumed'"],
            cwd=ROOT, env=dict(deployment.env, FLWR_HOME=str(plain["home"])),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deployment.extra_pids.append(run.pid)
        try:
            assert wait_until(lambda: (run_dir / "rounds.jsonl").exists()
                              and (run_dir / "rounds.jsonl").read_text().count("\n") >= 1, RUN_TIMEOUT, 0.2)
            servers = [pid for pid in descendants(plain["superlink"].pid) if "flwr-serverapp" in cmdline(pid)]
            assert len(servers) == 1, [cmdline(pid) for pid in descendants(plain["superlink"].pid)]
            victims = [servers[0], *descendants(servers[0])]
            kill_pids(victims, signal.SIGKILL)
            assert wait_until(lambda: not any(alive(pid) for pid in victims), 10)
        finally:
            if run.poll() is None:  # `flwr run --stream` keeps waiting for a run whose server is gone
                run.kill()
            run.communicate(timeout=30)
        summary, rounds = read_results(run_dir)
        assert summary["finished"] is False and summary["rounds"] == 1 == len(rounds)
        first_round = (run_dir / "rounds.jsonl").read_text()

        output, seconds = _run(deployment, plain["home"], "plain", tmp_path, "resumed", f"resume-from='{run_dir}'")
        print(f"\nplain deployment: resumed run took {seconds:.1f} s")
        assert f"resuming {run_dir} after round 1" in output, output[-4000:]
        assert (run_dir / "rounds.jsonl").read_text().startswith(first_round)  # round 1 kept, not redone
        assert read_results(run_dir)[0]["resumed_after_rounds"] == [1]
        # an uninterrupted run of the same seed, in process, with the partitions whose nodes are up
        partitions = sorted(c["client"]["partition_id"] for c in rounds[0]["uploads"])
        config = default_run_config(**_settings(RUN_CONFIG), **{"results-dir": str(tmp_path / "reference"),
                                                                "run-name": "run"})
        grid = LoopbackGrid(config, num_nodes=3)
        grid.nodes = {node: cfg for node, cfg in grid.nodes.items() if cfg["partition-id"] in partitions}
        run_server(config, grid)
        assert outcome(run_dir) == outcome(tmp_path / "reference" / "run")


# --- two SuperNodes configured alike ----------------------------------------------------------

class TestNodesClaimingTheSamePartition:
    """Two real SuperNodes started with the same --partition-id: the server tells them apart by node id."""

    def test_both_uploads_are_kept_and_reported(self, tmp_path_factory):
        deployment = Deployment(tmp_path_factory.mktemp("alike"))
        results = tmp_path_factory.mktemp("alike-results")
        try:
            link_port, *node_ports = free_ports(3)
            superlink = f"127.0.0.1:{link_port}"
            deployment.start("start-superlink.sh", "superlink", "--insecure", "--port", str(link_port))
            nodes = deployment.start_many(*[
                ("start-supernode.sh", f"twin-{i}", "--insecure", "--superlink", superlink, "--partition-id", "0",
                 "--num-partitions", "2", "--port", str(node_ports[i]))
                for i in range(2)
            ])
            for node in nodes:
                assert wait_until(lambda node=node: _connected(node), CONNECT_TIMEOUT), node.log[-3000:]
            home = deployment.root / "submitter"
            deployment.script("add-connection.sh", "--name", "alike", "--superlink", superlink, "--insecure",
                              "--flwr-home", str(home))
            done = deployment.flwr(home, "run", ".", "alike", "--stream", "--run-config",
                                   f"{RUN_CONFIG.replace('num-server-rounds=2', 'num-server-rounds=1')} "
                                   f"results-dir='{results}' run-name='alike'",
                                   timeout=RUN_TIMEOUT)
            output = done.stdout + done.stderr
        finally:
            deployment.stop_all()
        summary, (record,) = read_results(results / "alike")
        assert summary["finished"] is True, (summary.get("error"), output[-3000:])
        uploads = record["uploads"]
        node_ids = {u["client"]["node_id"] for u in uploads}
        assert len(uploads) == 2 and len(node_ids) == 2, uploads  # neither upload overwrote the other
        assert {u["client"]["partition_id"] for u in uploads} == {0}
        assert {u["label"] for u in uploads} == {f"0 (node {n})" for n in node_ids}
        assert "all report partition 0" in output, output[-3000:]
        saved = [json.loads(line) for line in
                 (results / "alike" / "prompts" / "round-001-clients.jsonl").read_text().splitlines()]
        assert {entry["node_id"] for entry in saved} == node_ids
        assert record["failures"] == [] and record["merge"]["method"] == "summarize-uid"


# --- checks the scripts make before anything starts -----------------------------------------

@pytest.fixture(scope="class")
def offline(tmp_path_factory):
    yield from own_deployment(tmp_path_factory, "offline")


class TestStartChecks:
    """What the scripts refuse before anything starts."""

    def test_every_script_explains_itself(self, offline):
        scripts = sorted(DEPLOY.glob("*.sh"))
        assert {p.name for p in scripts} >= {"start-superlink.sh", "start-supernode.sh", "start-superexec.sh",
                                             "gen-certs.sh", "gen-node-keys.sh", "register-node.sh",
                                             "add-connection.sh", "stop.sh"}
        for script in scripts:
            if script.name == "lib.sh":
                continue
            text = script.read_text()
            assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text, script.name
            assert script.stat().st_mode & 0o111, f"{script.name} is not executable"
            done = offline.script(script.name, "--help", timeout=60)
            assert done.stdout.startswith("Usage: "), script.name
            done = offline.script(script.name, "--no-such-flag", check=False, timeout=60)
            assert done.returncode != 0 and "unknown argument '--no-such-flag'" in done.stderr, script.name

    @pytest.mark.parametrize("address, says", [
        ("127.0.0.1", "is not HOST:PORT"),
        ("http://127.0.0.1:9093", "without a scheme"),
        ("127.0.0.1:99999", "is not a port number"),
        (":9093", "is not HOST:PORT"),
    ])
    def test_a_wrong_superlink_address_fails_at_start_with_a_clear_line(self, offline, address, says):
        began = time.monotonic()
        done = offline.script("start-supernode.sh", "--insecure", "--superlink", address, "--partition-id", "0",
                              "--num-partitions", "2", "--name", "bad-address", check=False, timeout=60)
        assert done.returncode != 0
        assert says in done.stderr and "--superlink" in done.stderr, done.stderr
        assert time.monotonic() - began < 30
        assert not (offline.state_root / "bad-address" / "pid").exists()  # nothing was started


    def test_a_missing_certificate_or_key_file_fails_at_start_with_a_clear_line(self, offline, tmp_path):
        certs = tmp_path / "certs"
        offline.script("gen-certs.sh", "--out", str(certs))
        offline.script("gen-node-keys.sh", "--name", "site", "--out", str(tmp_path / "keys"))
        (port,) = free_ports(1)
        cases = [
            (("start-superlink.sh", "--certs", str(tmp_path / "nowhere"), "--port", str(port)),
             f"certificate folder '{tmp_path / 'nowhere'}' does not exist"),
            (("start-superlink.sh", "--certs", str(tmp_path / "partial"), "--port", str(port)),
             f"certificate file '{tmp_path / 'partial'}/server.pem' does not exist"),
            (("start-supernode.sh", "--superlink", f"127.0.0.1:{port}", "--ca", str(tmp_path / "missing.crt"),
              "--auth-key", str(tmp_path / "keys" / "site"), "--partition-id", "0", "--num-partitions", "1"),
             f"--ca certificate '{tmp_path / 'missing.crt'}' does not exist"),
            (("start-supernode.sh", "--superlink", f"127.0.0.1:{port}", "--ca", str(certs / "ca.crt"),
              "--auth-key", str(tmp_path / "keys" / "gone"), "--partition-id", "0", "--num-partitions", "1"),
             f"--auth-key private key '{tmp_path / 'keys' / 'gone'}' does not exist"),
            (("start-supernode.sh", "--superlink", f"127.0.0.1:{port}", "--auth-key", str(tmp_path / "keys" / "site"),
              "--partition-id", "0", "--num-partitions", "1"),
             "--ca CA_CRT is required"),
            (("start-supernode.sh", "--superlink", f"127.0.0.1:{port}", "--ca", str(certs / "ca.crt"),
              "--auth-key", str(tmp_path / "keys" / "site.pub"), "--partition-id", "0", "--num-partitions", "1"),
             "is not an OpenSSH private key"),
        ]
        (tmp_path / "partial").mkdir()
        shutil.copy(certs / "ca.crt", tmp_path / "partial" / "ca.crt")
        for args, says in cases:
            done = offline.script(*args, "--name", "bad-file", check=False, timeout=60)
            assert done.returncode != 0, args
            assert says in done.stderr, (args, done.stderr)
            assert not (offline.state_root / "bad-file" / "pid").exists()


    def test_insecure_mode_needs_the_explicit_flag_and_says_so(self, offline, tmp_path):
        (port,) = free_ports(1)
        # no flag, no certificates: refused, naming both ways out
        done = offline.script("start-superlink.sh", "--port", str(port), "--name", "no-certs", check=False, timeout=60)
        assert done.returncode != 0
        assert "gen-certs.sh" in done.stderr and "--insecure" in done.stderr
        done = offline.script("add-connection.sh", "--name", "x", "--superlink", f"127.0.0.1:{port}", "--insecure",
                              "--flwr-home", str(tmp_path), timeout=60)
        assert "WITHOUT TLS" in done.stderr
        assert 'insecure = true' in (tmp_path / "config.toml").read_text()


# --- the secure deployment: TLS and node authentication ----------------------------------------

@pytest.fixture(scope="class")
def secure(tmp_path_factory):
    deployment = Deployment(tmp_path_factory.mktemp("secure"))
    root = deployment.root
    try:
        certs, keys = root / "certs", root / "keys"
        deployment.script("gen-certs.sh", "--out", str(certs), "--host", "localhost")
        for name in ("site-0", "site-1", "stranger"):
            deployment.script("gen-node-keys.sh", "--name", name, "--out", str(keys))
        sims = [deployment.sim_server(f"sim-{i}") for i in range(2)]
        link_port, *node_ports = free_ports(3)
        superlink = f"127.0.0.1:{link_port}"
        link = deployment.start("start-superlink.sh", "superlink", "--certs", str(certs), "--port", str(link_port),
                                "--isolation", "process")
        runner = deployment.start("start-superexec.sh", "serverapp-runner", "--runtime", superlink,
                                  "--ca", str(certs / "ca.crt"))
        registered = deployment.script("register-node.sh", "--superlink", superlink, "--ca", str(certs / "ca.crt"),
                                       str(keys / "site-0.pub"), str(keys / "site-1.pub"))
        nodes = deployment.start_many(*[
            ("start-supernode.sh", f"supernode-{i}", "--superlink", superlink, "--ca", str(certs / "ca.crt"),
             "--auth-key", str(keys / f"site-{i}"), "--partition-id", str(i), "--num-partitions", "2",
             "--llm-base-url", sims[i].url, "--llm-model", "sim",
             "--port", str(node_ports[i]), "--isolation", "process")
            for i in range(2)
        ])
        node_runners = deployment.start_many(*[
            ("start-superexec.sh", f"supernode-{i}-runner", "--runtime", f"127.0.0.1:{node_ports[i]}", "--insecure")
            for i in range(2)
        ])
        for node in nodes:
            assert wait_until(lambda node=node: _connected(node), CONNECT_TIMEOUT), node.log[-3000:]
        home = root / "submitter"
        deployment.script("add-connection.sh", "--name", "secure", "--superlink", superlink,
                          "--ca", str(certs / "ca.crt"), "--flwr-home", str(home))
        yield {"deployment": deployment, "sims": sims, "superlink": link, "runner": runner, "nodes": nodes,
               "node_runners": node_runners, "address": superlink, "home": home, "certs": certs, "keys": keys,
               "registered": registered.stdout}
    finally:
        deployment.stop_all()
        assert not [pid for pid in deployment.all_pids() if alive(pid)]


class TestSecureDeployment:
    """TLS and node authentication, with the process isolation of the compose demo."""

    def test_secure_processes_run_with_tls_and_node_authentication(self, secure):
        link_command = (secure["superlink"].state / "command").read_text()
        for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"):
            assert flag in link_command
        assert "--insecure" not in link_command
        assert len(re.findall(r"SuperNode ID \d+", secure["registered"])) == 2
        for node in secure["nodes"]:
            command = (node.state / "command").read_text()
            assert "--root-certificates" in command and "--auth-supernode-private-key" in command
            assert "--insecure" not in command
            assert "WITHOUT TLS" not in node.output
        assert "Activated node_id" in secure["superlink"].log


    def test_a_supernode_with_an_unregistered_key_is_refused(self, secure):
        stranger = _refused_supernode(secure, "stranger", secure["certs"] / "ca.crt", secure["keys"] / "stranger", 0)
        assert "Failed to activate SuperNode" in stranger.log

    def test_a_supernode_without_the_superlinks_ca_is_refused(self, secure, tmp_path):
        other = tmp_path / "other-ca"
        secure["deployment"].script("gen-certs.sh", "--out", str(other))
        # a CA that did not sign the SuperLink's certificate: the TLS handshake fails, the node gives up
        wrong = _refused_supernode(secure, "wrong-ca", other / "ca.crt", secure["keys"] / "site-1", 1)
        assert "CERTIFICATE_VERIFY_FAILED" in wrong.log

    def test_flwr_run_without_the_ca_is_refused(self, secure, tmp_path):
        deployment = secure["deployment"]
        home = tmp_path / "no-ca"
        home.mkdir()
        # TLS on, but no root-certificates: the system's CAs do not know the SuperLink's private CA
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "secure"\n\n[superlink.secure]\naddress = "{secure["address"]}"\n')
        started_before = secure["superlink"].log.count("ControlServicer.StartRun")
        began = time.monotonic()
        done = deployment.flwr(home, "run", ".", "secure", "--run-config", f"results-dir='{tmp_path}'", timeout=120)
        assert done.returncode != 0
        assert "Connection to the SuperLink is unavailable" in done.stdout + done.stderr
        assert time.monotonic() - began < 90
        assert secure["superlink"].log.count("ControlServicer.StartRun") == started_before
        assert not list(tmp_path.glob("*/summary.json"))


    def test_secure_deployment_runs_two_rounds_with_each_node_on_its_own_llm_server(self, secure, tmp_path):
        before = [sim.served() for sim in secure["sims"]]
        output, seconds = _run(secure["deployment"], secure["home"], "secure", tmp_path, "secure")
        # with node authentication a client is named by the key it was registered with
        _, rounds = _check_complete_run(tmp_path / "secure", output, {"0 (site-0)", "1 (site-1)"})
        assert {c["client"]["name"] for c in rounds[0]["uploads"]} == {"site-0", "site-1"}
        print(f"\nsecure deployment: 2-round run took {seconds:.1f} s")
        served = [sim.served() - b for sim, b in zip(secure["sims"], before)]
        assert all(count > 0 for count in served), served
        # process isolation: the SuperLink and SuperNodes start no runner of their own; the separate
        # runners did the work (the ClientApp runners log each app process they start)
        for parent in [secure["superlink"], *secure["nodes"]]:
            assert not [pid for pid in descendants(parent.pid) if "flower-superexec" in cmdline(pid)]
        assert alive(secure["runner"].pid)
        for runner in secure["node_runners"]:
            assert "Start `flwr-clientapp` process" in runner.log
