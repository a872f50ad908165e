"""Flags, Q8KV_* fallbacks and their validation."""

from __future__ import annotations

import pytest

from q8kv.server.config import Config, load_config, parse_size


def test_defaults_serve() -> None:
    config = load_config([], environ={})
    assert config == Config()
    assert (config.port, config.backend, config.memory_budget) == (50051, "auto", None)


def test_flag_beats_environment_beats_default() -> None:
    env = {"Q8KV_PORT": "6000", "Q8KV_BACKEND": "numpy", "Q8KV_MEMORY_BUDGET": "1GiB"}
    config = load_config(["--port", "7000"], environ=env)
    assert config.port == 7000
    assert config.backend == "numpy"
    assert config.memory_budget == 1024**3


@pytest.mark.parametrize(
    ("text", "size"),
    [("65536", 65536), ("64KiB", 65536), ("2GiB", 2 * 1024**3), ("1.5MB", 1_500_000)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--backend", "tpu"], {}, "--backend: expected auto, numpy or cupy, got 'tpu'"),
        (["--page-bytes", "1000"], {}, "--page-bytes: expected a positive multiple of 512"),
        ([], {"Q8KV_PORT": "many"}, "Q8KV_PORT='many'"),
        (["--memory-budget", "lots"], {}, "expected a size like 4GiB"),
        (["--quant-error-sample-rate", "2"], {}, "expected 0..1, got 2.0"),
    ],
)
def test_bad_values_exit_with_a_clear_message(argv, env, needle, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        load_config(argv, environ=env)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_readme_documents_every_flag() -> None:
    from dataclasses import fields
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [
        f.name for f in fields(Config) if "--" + f.name.replace("_", "-") not in readme
    ]
    assert not missing, f"README.md's flag table lacks {missing}"
