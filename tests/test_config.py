"""Flags, Q8KV_* fallbacks and their validation."""

from __future__ import annotations

import pytest
from harness.server import REPO, free_port, listening_socket
from harness.server import run_server as run_to_exit

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

    readme = (REPO / "README.md").read_text()
    missing = [
        f.name for f in fields(Config) if "--" + f.name.replace("_", "-") not in readme
    ]
    assert not missing, f"README.md's flag table lacks {missing}"


# -- settings only the running server can check: one line on stderr, status 2 -------------

SECRET = "hunter2-secret-token-abc"


def run_server(*flags: str, env: dict[str, str] | None = None):
    """A numpy server with a small budget and no metrics, run to its exit."""
    args = ["--backend", "numpy", "--memory-budget", "16MiB", "--metrics-port", "-1", *flags]
    if "--port" not in flags:
        args += ["--port", str(free_port())]
    return run_to_exit(*args, env=env)


def _case(name: str, tmp_path):
    """(flags, env, what the one line must say) for each configuration error."""
    tokens = tmp_path / "tokens"
    if name == "bad-tokens-line":
        tokens.write_text(f"ok-token-123456 alpha\n{SECRET}\n")
        return ["--auth-tokens-file", str(tokens)], {}, ["--auth-tokens-file", "entry 2"]
    if name == "bad-tokens-env":
        return [], {"Q8KV_AUTH_TOKENS": f"{SECRET} bad tenant!"}, ["Q8KV_AUTH_TOKENS entry 1"]
    if name == "missing-tokens-file":
        return (["--auth-tokens-file", str(tmp_path / "nope")], {},
                ["--auth-tokens-file", "nope", "No such file"])
    if name == "unreadable-tls-cert":
        key = tmp_path / "key.pem"
        key.write_text("not used")
        return (["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(key)], {},
                ["--tls-cert", "missing.pem", "No such file"])
    if name == "tls-key-is-a-directory":
        cert = tmp_path / "cert.pem"
        cert.write_text("not used")
        return (["--tls-cert", str(cert), "--tls-key", str(tmp_path)], {},
                ["--tls-key", "Is a directory"])
    if name == "tls-cert-not-pem":
        junk = tmp_path / "junk.pem"
        junk.write_text("not a certificate")
        return (["--tls-cert", str(junk), "--tls-key", str(junk)], {},
                ["--tls-cert", "Invalid cert"])
    if name == "budget-holds-no-page":
        return ["--memory-budget", "1000"], {}, ["--memory-budget", "1000 bytes"]
    if name == "snapshot-dir-is-a-file":
        (tmp_path / "plain").write_text("x")
        return (["--snapshot-dir", str(tmp_path / "plain")], {},
                ["--snapshot-dir", "plain", "Not a directory"])
    if name == "snapshot-dir-under-a-file":
        (tmp_path / "plain").write_text("x")
        return (["--snapshot-dir", str(tmp_path / "plain" / "snaps")], {},
                ["--snapshot-dir", "writable directory"])
    raise AssertionError(name)


@pytest.mark.parametrize("name", [
    "bad-tokens-line", "bad-tokens-env", "missing-tokens-file", "unreadable-tls-cert",
    "tls-key-is-a-directory", "tls-cert-not-pem", "budget-holds-no-page", "snapshot-dir-is-a-file",
    "snapshot-dir-under-a-file",
])
def test_configuration_errors_are_one_line_and_status_2(name, tmp_path) -> None:
    flags, env, needles = _case(name, tmp_path)
    result = run_server(*flags, env=env)
    assert_one_line_error(result, needles)
    assert SECRET not in result.stderr


def assert_one_line_error(result, needles) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("q8kv-server: error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert result.stdout == ""


@pytest.mark.parametrize("which", ["--port", "--metrics-port"])
def test_a_port_in_use_is_one_line_and_status_2(which) -> None:
    with listening_socket() as taken:
        port = str(taken.getsockname()[1])
        flags = ["--port", port] if which == "--port" else ["--metrics-port", port]
        result = run_server(*flags)
    needle = "--host/--port" if which == "--port" else "--metrics-port"
    assert_one_line_error(result, [needle, port, "in use"])
