"""The agent configuration: a bad file names the file, the field and what is allowed."""

from __future__ import annotations

import re
import socket
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.conftest import AGENT_BIN, ROOT
from wattops.agents.config import ConfigError, load_config, parse_config
from wattops.agents.reference import render_reference
from wattops.profiles import hardware_profile, site_profile


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


GOOD = """
[agent]
listen = "127.0.0.1:9000"
state_dir = "st"

[[deployments]]
name = "tiny"
engine = "llamacpp"
model = "m.gguf"
precision = "q4_k_m"
replicas = 2
max_replicas = 4
"""


def test_a_good_config_resolves_paths_against_its_folder(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.agent.port == 9000
    assert config.agent.state_dir == (tmp_path / "st").resolve()
    dep = config.deployment("tiny")
    assert dep.settings.model == (tmp_path / "m.gguf").resolve()  # type: ignore[attr-defined]
    assert (dep.replicas, dep.max_replicas, dep.precision) == (2, 4, "q4_k_m")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (('precision = "q4_k_m"', 'precision = "q9"'), ["deployments.0.precision", "q4_k_m"]),
        (("replicas = 2", "replicas = 9"), ["exceeds max_replicas"]),
        (('engine = "llamacpp"', 'engine = "tgi"'), ["deployments.0.engine", "'llamacpp'"]),
        (('listen = "127.0.0.1:9000"', 'listen = "nowhere"'), ["agent.listen", "host:port"]),
        (('name = "tiny"', 'name = "Tiny Model"'), ["deployments.0.name"]),
        (("max_replicas = 4", "max_replica = 4"), ["deployments.0.max_replica", "not permitted"]),
    ],
)
def test_bad_fields_are_named(tmp_path: Path, change: tuple[str, str], expected: list[str]) -> None:
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_the_old_agreement_floor_of_the_policy_is_refused_naming_the_new(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + '\n[policy]\nmode = "act"\nquality_floor = 0.9\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "quality_floor (agreement with the serving precision's wording) is gone" in str(
        info.value
    )
    assert "use max_accuracy_drop" in str(info.value)
    path = write(tmp_path, GOOD + '\n[policy]\nmode = "act"\nmax_accuracy_drop = 3\n')
    assert load_config(path).policy.max_accuracy_drop == 3.0


def test_openai_engine_needs_url_or_command(tmp_path: Path) -> None:
    text = '[[deployments]]\nname = "v"\nengine = "openai"\n'
    with pytest.raises(ConfigError, match="exactly one of `url` or `command`"):
        load_config(write(tmp_path, text))


def test_invalid_toml_is_reported_with_its_position(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not valid TOML.*line 1"):
        load_config(write(tmp_path, "[agent\n"))


def test_the_agent_refuses_a_bad_config_with_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("replicas = 2", "replicas = -1"))
    result = subprocess.run(
        [str(AGENT_BIN), "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "deployments.0.replicas" in result.stderr
    assert str(path) in result.stderr


def test_the_agent_refuses_a_missing_model(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = subprocess.run(
        [str(AGENT_BIN), "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "deployments.tiny.model" in result.stderr
    assert "m.gguf" in result.stderr


def test_a_bad_profile_override_names_the_profile_file_and_field(
    tmp_path: Path, test_model: Path
) -> None:
    text = GOOD.replace('model = "m.gguf"', f'model = "{test_model}"') + (
        "\n[hardware]\nidle_watts = 900.0\n"
    )
    text = text.replace(
        'listen = "127.0.0.1:9000"', 'listen = "127.0.0.1:9000"\nprofile = "a100-80gb"'
    )
    path = write(tmp_path, text)
    result = subprocess.run([str(AGENT_BIN), "--config", str(path)], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "a100-80gb.toml" in result.stderr
    assert "idle_watts" in result.stderr


def test_an_unknown_profile_lists_the_available_ones(tmp_path: Path, test_model: Path) -> None:
    text = GOOD.replace('model = "m.gguf"', f'model = "{test_model}"').replace(
        'listen = "127.0.0.1:9000"', 'listen = "127.0.0.1:9000"\nprofile = "tpu-v9"'
    )
    result = subprocess.run([str(AGENT_BIN), "--config", str(write(tmp_path, text))],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert "tpu-v9" in result.stderr and "a100-80gb" in result.stderr


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Configuration") :]
    return section[section.index("```toml\n") + len("```toml\n") : section.index("```\n", 8)]


def test_the_readmes_example_configuration_is_accepted() -> None:
    data = tomllib.loads(readme_example())
    config = parse_config(data, "README.md")
    assert [d.name for d in config.deployments] == ["llama2-13b", "smollm2", "falcon-7b"]
    assert config.deployment("llama2-13b").settings.threads == 8  # type: ignore[attr-defined]
    # [hardware] and [site] override profile fields: those are checked at start, against them.
    hardware_profile(config.agent.profile, dict(config.hardware))
    site_profile(config.site.name, config.site.overrides())


def test_the_configuration_reference_is_current() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == render_reference(), (
        "docs/configuration.md is out of date: "
        "python -m wattops.agents.reference > docs/configuration.md"
    )


def run_agent(path: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(AGENT_BIN), "--config", str(path)], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def good_with(tmp_path: Path, test_model: Path, **agent: str) -> Path:
    """GOOD with the test model, and these [agent] keys set (replacing GOOD's own)."""
    text = GOOD.replace('model = "m.gguf"', f'model = "{test_model}"')
    for key, value in agent.items():
        text = re.sub(rf"^{key} = .*\n", "", text, flags=re.M)
        text = text.replace("[agent]\n", f'[agent]\n{key} = "{value}"\n', 1)
    return write(tmp_path, text)


@pytest.mark.parametrize("kind", ["a file", "under a file", "unwritable"])
def test_a_bad_state_dir_is_named_with_exit_2(tmp_path: Path, test_model: Path, kind: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    state = {"a file": blocker, "under a file": blocker / "state",
             "unwritable": Path("/proc/wattops-state")}[kind]  # fmt: skip
    result = run_agent(good_with(tmp_path, test_model, state_dir=str(state)))
    assert result.returncode == 2, result.stderr
    assert "agent.state_dir" in result.stderr and "Traceback" not in result.stderr


def test_a_listen_address_in_use_is_refused_before_anything_starts(
    tmp_path: Path, test_model: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_agent(good_with(tmp_path, test_model, listen=f"127.0.0.1:{port}"))
    assert result.returncode == 2, result.stderr
    assert f"port {port} is in use" in result.stderr
    assert "serving" not in result.stderr  # no replica was started first
    assert not list((tmp_path / "st").glob("logs/*.log"))
    elsewhere = run_agent(good_with(tmp_path, test_model, listen="192.0.2.1:9000"))
    assert elsewhere.returncode == 2 and "not an address of this host" in elsewhere.stderr


def test_a_bad_override_names_the_users_file_and_section(tmp_path: Path, test_model: Path) -> None:
    path = good_with(tmp_path, test_model)
    path.write_text(path.read_text() + "\n[site]\npue = 0.5\n")
    result = run_agent(path)
    assert result.returncode == 2
    assert f"{path} [site] (overriding pue)" in result.stderr
    assert "pue" in result.stderr and "greater than or equal to 1" in result.stderr


def test_a_model_that_is_not_gguf_says_so(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_text("<html>404 Not Found</html>")
    result = run_agent(write(tmp_path, GOOD))
    assert result.returncode == 2
    assert "deployments.tiny.model" in result.stderr and "not a GGUF file" in result.stderr
