"""The node's flags: bad values are refused before anything starts, with one clear line;
good ones reach the settings that use them."""

import pytest

from exo.api.settings import ApiSettings
from exo.main import main, node_config_of


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--peer", "host:abc"], "--peer"),
        (["--peer", "host:99999"], "port"),
        (["--namespace", "tab\there"], "--namespace"),
        (["--mesh-port", "70000"], "--mesh-port"),
        (["--command-timeout", "0"], "--command-timeout"),
        (["--stall-timeout", "-1"], "--stall-timeout"),
        (["--generation-timeout", "0"], "--generation-timeout"),
        (["--max-request-bytes", "100"], "--max-request-bytes"),
        (["--max-request-bytes", str(64 * 1024 * 1024)], "--max-request-bytes"),
        (["--runner-load-timeout", "0"], "--runner-load-timeout"),
        (["--model-store-max-gb", "0"], "--model-store-max-gb"),
        (["--model-store-max-gb", "lots"], "--model-store-max-gb"),
    ],
)
def test_bad_cluster_flags_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        # Should the check ever let one through: no mDNS, no well-known ports.
        main(["--no-discovery", "--api-port", "0", "--mesh-port", "0", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_the_api_flags_reach_the_api_settings() -> None:
    config = node_config_of(
        [
            "--command-timeout",
            "3.5",
            "--stall-timeout",
            "7",
            "--generation-timeout",
            "60",
            "--max-request-bytes",
            "65536",
            "--runner-load-timeout",
            "42",
        ]
    )
    settings = ApiSettings.from_node_config(config)
    assert settings.command_timeout_s == 3.5
    assert settings.stall_timeout_s == 7.0
    assert settings.generation_timeout_s == 60.0
    assert settings.max_request_bytes == 65536
    assert settings.load_timeout_s == 42.0
    defaults = ApiSettings.from_node_config(node_config_of([]))
    assert defaults.model_dump() == ApiSettings().model_dump()


def test_the_model_store_limit_is_read_in_gigabytes() -> None:
    assert node_config_of(["--model-store-max-gb", "2.5"]).model_store_max_bytes == 2_500_000_000
    assert node_config_of([]).model_store_max_bytes is None
