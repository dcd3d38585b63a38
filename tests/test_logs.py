"""The log file: JSON lines, rotated by size, and a failing disk said once, not per record."""

import json
from pathlib import Path

import pytest
from loguru import logger

from exo.logs import LOG_FILE, JsonLinesFile, setup_logging


def test_records_are_json_lines_in_the_log_file(tmp_path: Path) -> None:
    setup_logging(tmp_path, verbose=False)
    try:
        logger.debug("quiet on the console, kept in the file")
        logger.info("hello {}", "file")
        logger.complete()
    finally:
        logger.remove()
    lines = (tmp_path / LOG_FILE).read_text().splitlines()
    records = [json.loads(line)["record"] for line in lines]
    assert [(r["level"]["name"], r["message"]) for r in records] == [
        ("DEBUG", "quiet on the console, kept in the file"),
        ("INFO", "hello file"),
    ]


def test_the_file_rotates_by_size_and_keeps_a_few(tmp_path: Path) -> None:
    log_file = JsonLinesFile(tmp_path / LOG_FILE, rotate_bytes=100, kept=2)
    for n in range(10):
        log_file.write(f'{{"n": {n}, "pad": "{"x" * 40}"}}\n')
    log_file.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [LOG_FILE, f"{LOG_FILE}.1", f"{LOG_FILE}.2"]
    newest = [json.loads(line)["n"] for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert newest[-1] == 9


def test_a_full_disk_is_said_once_and_the_file_comes_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # /dev/full fails every write with ENOSPC, as a full disk does.
    log_file = JsonLinesFile(Path("/dev/full"), rotate_bytes=0)
    for n in range(20):
        log_file.write(f'{{"n": {n}}}\n')
    failed = capsys.readouterr().err
    assert failed.count("\n") == 1, failed
    assert "the log file /dev/full cannot be written" in failed
    assert "No space left on device" in failed
    assert log_file.failing

    # Room again (here: another file): the next record is written, and that is said once.
    log_file.baseFilename = str(tmp_path / LOG_FILE)
    log_file.write('{"n": 20}\n')
    log_file.write('{"n": 21}\n')
    log_file.close()
    assert capsys.readouterr().err == f"exo: the log file {tmp_path / LOG_FILE} is written again\n"
    assert not log_file.failing
    assert (tmp_path / LOG_FILE).read_text() == '{"n": 20}\n{"n": 21}\n'
