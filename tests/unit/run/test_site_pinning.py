"""Site-pinned settings: in a deployment the run config cannot move where a site's data, prompts and keys go.

Each test names the attack it stands for. The same rules under a real SuperLink/SuperNode deployment
are in tests/integration/test_hostile_participants.py.
"""

from __future__ import annotations

import pytest

from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.run import schema
from fedtextgrad_core.run.settings import client_config, client_settings

NODE = {"partition-id": 0, "num-partitions": 2}
# a value other than the default for every site setting, as a hostile run config would send it
HOSTILE = {
    "llm-backend": "openai", "llm-base-url": "https://elsewhere.example/v1", "llm-model": "theirs",
    "llm-api-key-env": "AWS_SECRET_ACCESS_KEY",
    "backward-backend": "openai", "backward-base-url": "https://elsewhere.example/v1", "backward-model": "theirs",
    "backward-api-key-env": "AWS_SECRET_ACCESS_KEY",
    "judge-backend": "openai", "judge-base-url": "https://elsewhere.example/v1", "judge-model": "theirs",
    "judge-api-key-env": "AWS_SECRET_ACCESS_KEY",
    "data-source": "/etc", "llm-cache-path": "/tmp/their-cache.sqlite", "leakage-guard": "off", "leakage-ngram": 10000,
    "allow-run-config": "judge-base-url",
}


def test_every_site_setting_has_a_hostile_case_here() -> None:
    assert set(HOSTILE) == {s.key for s in schema.SETTINGS if s.pinned}


@pytest.mark.parametrize("key", sorted(HOSTILE))
def test_a_run_config_that_moves_a_site_setting_is_refused_in_a_deployment(key: str) -> None:
    """Attack: the run submitter points a site's data, keys or guard elsewhere (e.g. judge-base-url to its
    own server with judge-api-key-env=AWS_SECRET_ACCESS_KEY). The site refuses with one line naming the
    setting and its rule."""
    with pytest.raises(ConfigError) as info:
        client_config({key: HOSTILE[key]}, NODE, pinned=True)
    assert info.value.setting == key
    line = str(info.value)
    assert "\n" not in line and "node config" in line and f"allow-run-config='{key}'" in line
    # in Flower's simulation every client is the submitter's own: the run config may set it
    if key != "allow-run-config":
        assert client_config({key: HOSTILE[key]}, NODE, pinned=False)[key] == HOSTILE[key]


def test_the_judge_exfiltration_run_config_is_refused_before_any_request() -> None:
    """Attack: loss='judge' with the judge at the submitter's URL and a site secret as its bearer token."""
    run = {"loss": "judge", "judge-backend": "openai", "judge-base-url": "https://elsewhere.example/v1",
           "judge-model": "x", "judge-api-key-env": "AWS_SECRET_ACCESS_KEY"}
    with pytest.raises(ConfigError, match="judge-"):
        client_settings(run, NODE, pinned=True)


def test_the_apps_defaults_in_the_run_config_are_not_a_request_and_the_site_values_apply() -> None:
    """Flower sends every key of pyproject's config: a run config at the app's defaults sets nothing."""
    run = schema.defaults()
    site = {**NODE, "llm-backend": "openai", "llm-base-url": "http://127.0.0.1:8000/v1", "llm-model": "mine",
            "leakage-guard": "refuse"}
    settings = client_settings(run, site, pinned=True)
    assert (settings.forward.backend, settings.forward.base_url, settings.forward.model) == (
        "openai", "http://127.0.0.1:8000/v1", "mine")
    assert settings.leakage_guard == "refuse"
    # the same value as the site's is no attempt to move anything
    assert client_settings({"leakage-guard": "refuse"}, site, pinned=True).leakage_guard == "refuse"
    # a run setting that is not the site's still comes from the run
    assert client_settings({"local-steps": 2}, site, pinned=True).local_steps == 2


def test_a_site_may_let_runs_set_a_setting_by_name() -> None:
    site = {**NODE, "judge-model": "site-judge", "allow-run-config": "judge-model,leakage-ngram"}
    settings = client_settings({"judge-model": "bigger-judge", "leakage-ngram": 12}, site, pinned=True)
    assert (settings.judge.model, settings.leakage_ngram) == ("bigger-judge", 12)
    assert client_settings({}, site, pinned=True).judge.model == "site-judge"  # the site's, unless the run says
    with pytest.raises(ConfigError) as info:  # only what it named
        client_settings({"judge-base-url": "https://elsewhere.example/v1"}, site, pinned=True)
    assert info.value.setting == "judge-base-url"


def test_a_run_config_cannot_widen_what_the_site_allows() -> None:
    """Attack: the run config lists the settings it wants to move in allow-run-config itself."""
    with pytest.raises(ConfigError) as info:
        client_settings({"allow-run-config": "judge-base-url", "judge-base-url": "https://elsewhere.example/v1"},
                        NODE, pinned=True)
    assert info.value.setting in {"allow-run-config", "judge-base-url"}
    with pytest.raises(ConfigError, match="allow-run-config"):  # and a site cannot allow allow-run-config
        client_settings({}, {**NODE, "allow-run-config": "allow-run-config"}, pinned=True)


def test_a_sites_error_leaves_it_without_its_data_and_a_simulations_whole(capsys) -> None:
    from fedtextgrad_core.errors import DataError
    from fedtextgrad_core.run.client_round import failed

    error = DataError("record 3 has the target 'secret-value'", shared="record 3 has a target it cannot score")
    at_site = failed(error, {"partition-id": 1}, site=True)
    assert at_site.error == "record 3 has a target it cannot score" and at_site.partition_id == 1
    assert "secret-value" in capsys.readouterr().err  # the site's own log has it whole
    simulated = failed(error, {}, site=False)
    assert simulated.error == "record 3 has the target 'secret-value'" and simulated.partition_id is None
    assert capsys.readouterr().err == ""  # the server's line already shows it on the same terminal
