"""The cluster flags: bad values are refused before anything starts, with one clear line."""

import pytest

from exo.main import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--peer", "host:abc"], "--peer"),
        (["--peer", "host:99999"], "port"),
        (["--namespace", "tab\there"], "--namespace"),
        (["--mesh-port", "70000"], "--mesh-port"),
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
