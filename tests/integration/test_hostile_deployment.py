"""The run submitter against the sites, in a real deployment: a site's data, keys and guards stay its own.

One insecure SuperLink on loopback and three SuperNodes started with deploy/start-supernode.sh, each
with its own sim LLM server named in its node config, and a secret in its environment
(AWS_SECRET_ACCESS_KEY) that a hostile run config would like to use as a bearer token. A recording
HTTP server stands in for the attacker's URL: it must receive nothing. Each hostile run config is
submitted with `flwr run`; the sites refuse it with one line naming the setting and the site's rule,
and the server reports them like any failed client. SuperNode 2 runs only app bundles signed by a
publisher it trusts (--trusted-entities): a bundle sent with `flwr run .` carries no signature (Flower
1.42 signs only Flower Hub's), so it refuses every run, and a run with the other two goes on.
On the code before the site-pinned settings, the sites used the run config's values: the recording
server received the site's training questions and its secret.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fedtextgrad_core.run import schema
from tests.support.deployment_helpers import DEPLOYMENT_MARKS, Deployment, alive, free_ports, read_results, wait_until
from tests.support.recording_server import RecordingServer

pytestmark = DEPLOYMENT_MARKS

CONNECT_TIMEOUT = 120
RUN_TIMEOUT = 540
SECRET = "site-secret-3f9a1c0d7e"
RUN = "num-server-rounds=1 min-train-clients=2 local-steps=1 batch-size=2 synthetic-size=60 server-backend='sim'"


def hostile_values(attacker: str) -> dict[str, str]:
    """A run config's hostile value for every site setting (with what the server needs to accept it)."""
    return {
        "llm-backend": f"llm-backend='openai' llm-base-url='{attacker}' llm-model='theirs'",
        "llm-base-url": f"llm-base-url='{attacker}'",
        "llm-model": "llm-model='theirs'",
        "llm-api-key-env": "llm-api-key-env='AWS_SECRET_ACCESS_KEY'",
        "backward-backend": f"backward-backend='openai' backward-base-url='{attacker}' backward-model='theirs'",
        "backward-base-url": f"backward-base-url='{attacker}'",
        "backward-model": "backward-model='theirs'",
        "backward-api-key-env": "backward-api-key-env='AWS_SECRET_ACCESS_KEY'",
        "judge-backend": f"loss='judge' judge-backend='openai' judge-base-url='{attacker}' judge-model='x'",
        "judge-base-url": f"judge-base-url='{attacker}'",
        "judge-model": "judge-model='theirs'",
        "judge-api-key-env": "judge-api-key-env='AWS_SECRET_ACCESS_KEY'",
        "data-source": "data-source='/etc'",
        "llm-cache-path": "llm-cache-path='/tmp/the-submitters-cache.sqlite'",
        "leakage-guard": "leakage-guard='off'",
        "leakage-ngram": "leakage-ngram=10000",
        "allow-run-config": "allow-run-config='judge-base-url'",
    }


def _trusted_entities(folder: Path) -> Path:
    """Flower's trusted-entities YAML with one publisher key (a fresh ed25519 key pair; its private key
    signs nothing here)."""
    key = folder / "publisher"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    public = (folder / "publisher.pub").read_text().strip()
    path = folder / "trusted-entities.yaml"
    path.write_text(f"fpk_0f0e0d0c-0b0a-4909-8807-060504030201: {public}\n")
    return path


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    deployment = Deployment(tmp_path_factory.mktemp("hostile-sites"))
    deployment.env["AWS_SECRET_ACCESS_KEY"] = SECRET  # a secret every site's environment holds
    attacker = RecordingServer().start()
    try:
        sims = [deployment.sim_server(f"sim-{i}") for i in range(3)]
        link_port, *node_ports = free_ports(4)
        superlink = f"127.0.0.1:{link_port}"
        deployment.start("start-superlink.sh", "superlink", "--insecure", "--port", str(link_port))
        trusted = _trusted_entities(deployment.root)
        nodes = deployment.start_many(*[
            ("start-supernode.sh", f"supernode-{i}", "--insecure", "--superlink", superlink, "--partition-id", str(i),
             "--num-partitions", "3", "--llm-base-url", sims[i].url, "--llm-model", "sim", "--port", str(node_ports[i]),
             *(["--trusted-entities", str(trusted)] if i == 2 else []))
            for i in range(3)
        ])
        for node in nodes:
            assert wait_until(lambda node=node: "SuperNode ID:" in node.log, CONNECT_TIMEOUT), node.log[-3000:]
        home = deployment.root / "submitter"
        deployment.script("add-connection.sh", "--name", "sites", "--superlink", superlink, "--insecure",
                          "--flwr-home", str(home))
        yield {"deployment": deployment, "home": home, "attacker": attacker, "sims": sims, "nodes": nodes}
    finally:
        attacker.stop()
        deployment.stop_all()
        assert not [pid for pid in deployment.all_pids() if alive(pid)]


def submit(sites: dict, results: Path, hostile: str = "") -> str:
    done = sites["deployment"].flwr(sites["home"], "run", ".", "sites", "--stream", "--run-config",
                                    f"{RUN} results-dir='{results}' run-name='run' {hostile}".strip(),
                                    timeout=RUN_TIMEOUT)
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def refused(sites, tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """Every hostile run config, each submitted once: (the output, the results folder)."""
    outputs = {}
    for key, hostile in hostile_values(sites["attacker"].base_url).items():
        results = tmp_path_factory.mktemp(f"refused-{key}")
        outputs[key] = (submit(sites, results, hostile), results / "run")
    return outputs


def test_every_site_setting_is_attacked_here(sites) -> None:
    assert set(hostile_values("http://x/v1")) == {s.key for s in schema.SETTINGS if s.pinned}


# The sites use the openai backend already (their node config names their own server), so a run config
# asking for it moves nothing: what it would move is the URL it gives with it, and that is refused.
REFUSED_AS = {"llm-backend": "llm-base-url"}


@pytest.mark.parametrize("key", sorted(hostile_values("http://x/v1")))
def test_a_run_config_that_moves_a_site_setting_is_refused_by_every_site(refused, key) -> None:
    """Attack: the run submitter sets a site setting (where the site's data, prompts and keys go, or how
    its data is guarded). Each site refuses with one line naming it and its rule; the run stops."""
    output, folder = refused[key]
    summary, _ = read_results(folder)
    assert summary["finished"] is False and summary["rounds"] == 0
    named = REFUSED_AS.get(key, key)
    line = f"setting '{named}' = "
    assert line in output and f"allow-run-config='{named}'" in output, output[-4000:]
    assert "clients 0, 1: " + line in output  # both sites refused it (the third refuses the unsigned bundle)
    assert "SuperNode's node config" in summary["error"]


def test_the_judge_exfiltration_reaches_nothing_and_no_secret_leaves(sites, refused) -> None:
    """Attack: loss='judge' with the judge at the submitter's URL and judge-api-key-env naming a site's
    secret: every training question and answer, with the secret as bearer token, would go there. The
    attacker's server received no request at all, from any of the hostile runs."""
    assert sites["attacker"].requests == []
    for output, folder in refused.values():
        assert SECRET not in output
        assert not [p for p in folder.rglob("*") if p.is_file() and SECRET in p.read_text(errors="replace")]


def test_a_run_that_leaves_the_site_settings_alone_runs_on_the_sites_own_servers(sites, tmp_path) -> None:
    """No attack: the app's defaults in the run config are not a request to move anything; each site
    uses the LLM server its node config names. The site that trusts only signed bundles refuses this
    unsigned one, and the run goes on with the other two."""
    before = [sim.served() for sim in sites["sims"]]
    output = submit(sites, tmp_path)
    summary, rounds = read_results(tmp_path / "run")
    assert summary["finished"] is True, (summary.get("error"), output[-4000:])
    served = [sim.served() - b for sim, b in zip(sites["sims"], before)]
    assert served[0] > 0 and served[1] > 0 and served[2] == 0
    failures = [f for record in rounds for f in record["failures"]]
    assert failures and all("could not be verified" in f["reason"] for f in failures), failures
    assert "verif" in sites["nodes"][2].log.lower()
