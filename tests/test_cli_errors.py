"""An operator's mistake on the command line is one clear line and a non-zero exit.

The real `breakwater` command runs in a subprocess for each case: a bad flag or
BREAKWATER_* value is argparse's usage error naming the flag (exit 2), a bad gateway config
file is one `breakwater gateway: ...` line (exit 2), and none of them is a traceback, a hang
or a server that starts. Every case fails fast; a regression that starts a server instead
is killed at the timeout and fails the test.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from serving.cli_types import choice, env_default, integer, number, port
from worker.settings import byte_size

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 60.0
# A gateway case that wrongly got past its check must not reach a real worker or fork.
GATEWAY_BASE = ["--worker", "127.0.0.1:1", "--processes", "1", "--admin-port", "-1"]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """`breakwater ARGS` (as the console script runs it), killed with its children if it
    is still running after `timeout`."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BREAKWATER_")}
    full_env.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "breakwater.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=full_env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"`breakwater {' '.join(args)}` still ran after {timeout:g}s:\n{err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_usage_error(r: subprocess.CompletedProcess[str], *named: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "error: argument" in last, r.stderr
    for name in named:
        assert name in last, r.stderr
    assert "READY" not in r.stdout


BAD_FLAGS = [
    # ports: 0..65535 (admin: -1 is "no listener")
    ("gateway", "--port", "80808"),
    ("gateway", "--port", "-5"),
    ("gateway", "--port", "abc"),
    ("gateway", "--grpc-port", "65536"),
    ("gateway", "--admin-port", "-2"),
    ("gateway", "--admin-port", "70000"),
    ("worker", "--grpc-port", "70000"),
    ("worker", "--http-port", "-1"),
    ("up", "--port", "80808"),
    ("up", "--grpc-port", "-3"),
    # limits and timings that would start a broken gateway
    ("gateway", "--max-connections", "0"),
    ("gateway", "--max-connections", "-1"),
    ("gateway", "--health-interval", "0"),
    ("gateway", "--health-interval", "-1"),
    ("gateway", "--max-attempts", "0"),
    ("gateway", "--request-timeout", "-1"),
    ("gateway", "--request-timeout", "nan"),
    ("gateway", "--keepalive-timeout", "-5"),
    ("gateway", "--retry-budget", "-3"),
    ("gateway", "--gpu-hour-price", "-1"),
    ("gateway", "--processes", "-1"),
    ("gateway", "--max-in-flight", "-1"),
    ("gateway", "--max-queue", "-1"),
    ("gateway", "--routing", "bogus"),
    # a worker address the gateway could never reach: an error now, not a replica that
    # never turns healthy
    ("gateway", "--worker", "h:x"),
    ("gateway", "--worker", "127.0.0.1:0"),
    ("gateway", "--worker", "h:\u0663"),  # an Arabic-Indic 3: isdigit() and int() take it
    ("gateway", "--worker", "http://"),
    ("gateway", "--worker", "http://h:99999"),
    # a bare message after parsing (no flag named for its variable); a missing tokenizer
    # directory was silently no tokenizer
    ("gateway", "--model-routing", "m=bogus"),
    ("gateway", "--model-routing", "prefix-aware"),
    ("gateway", "--tokenizer", "m=/no/such/tokenizer"),
    # the engine: a scheduler that admits nothing hangs; a zero block size divides by it
    ("worker", "--max-num-seqs", "0"),
    ("worker", "--max-num-seqs", "-1"),
    ("worker", "--max-num-batched-tokens", "0"),
    ("worker", "--block-size", "0"),
    ("worker", "--kv-cache-memory", "lots"),
    ("worker", "--memory-budget", "lots"),
    ("worker", "--max-queue", "-1"),
    ("generate", "--max-num-seqs", "0"),
    ("generate", "--block-size", "0"),
    ("up", "--max-num-seqs", "0"),
    ("up", "--kv-cache-memory", "lots"),
    ("up", "--workers", "0"),
    ("up", "--workers", "-1"),
    ("up", "--ready-timeout", "0"),
]


@pytest.mark.parametrize(("command", "flag", "value"), BAD_FLAGS)
def test_a_bad_flag_is_a_usage_error(command: str, flag: str, value: str) -> None:
    base = GATEWAY_BASE if command == "gateway" else []
    r = run_cli(command, *base, f"{flag}={value}")
    assert_usage_error(r, flag)


BAD_ENV = [
    ("gateway", "BREAKWATER_GATEWAY_PORT", "abc", "--port"),
    ("gateway", "BREAKWATER_GATEWAY_PORT", "80808", "--port"),
    ("gateway", "BREAKWATER_GATEWAY_ADMIN_PORT", "x", "--admin-port"),
    ("gateway", "BREAKWATER_GATEWAY_GPU_HOUR_PRICE", "cheap", "--gpu-hour-price"),
    ("gateway", "BREAKWATER_GATEWAY_PROCESSES", "many", "--processes"),
    ("gateway", "BREAKWATER_GATEWAY_PROCESSES", "-1", "--processes"),
    ("gateway", "BREAKWATER_GATEWAY_ROUTING", "bogus", "--routing"),
    ("gateway", "BREAKWATER_GATEWAY_HTTP_SERVER", "bogus", "--http-server"),
    ("gateway", "BREAKWATER_GATEWAY_BALANCE_REL", "0.5", "--balance-rel"),
    ("worker", "BREAKWATER_WORKER_GRPC_PORT", "abc", "--grpc-port"),
    ("worker", "BREAKWATER_WORKER_MAX_QUEUE", "-1", "--max-queue"),
    ("worker", "BREAKWATER_WORKER_ENGINE", "bogus", "--engine"),
    # every flag has its variable, booleans and repeatable flags too
    ("gateway", "BREAKWATER_GATEWAY_MAX_CONNECTIONS", "lots", "--max-connections"),
    ("gateway", "BREAKWATER_GATEWAY_WATCH_CACHES", "maybe", "--watch-caches"),
    ("gateway", "BREAKWATER_GATEWAY_REQUIRE_API_KEYS", "sure", "--require-api-keys"),
    ("worker", "BREAKWATER_WORKER_HTTP_PORT", "http", "--http-port"),
    ("worker", "BREAKWATER_WORKER_NO_PREFIX_CACHING", "2", "--no-prefix-caching"),
    # argparse checks no `choices` against a default: a traceback after the model loaded
    ("worker", "BREAKWATER_WORKER_FAULT_CODE", "BOGUS", "--fault-code"),
    ("gateway", "BREAKWATER_GATEWAY_MODEL_ROUTING", "m=round-robin,foo", "--model-routing"),
]


@pytest.mark.parametrize(("command", "var", "value", "flag"), BAD_ENV)
def test_a_bad_environment_value_is_a_usage_error(
    command: str, var: str, value: str, flag: str
) -> None:
    # The variable is only its flag's default: the base arguments leave that flag off.
    base = GATEWAY_BASE if command == "gateway" else []
    pairs = zip(base[::2], base[1::2], strict=True)
    base = [x for name, value in pairs if name != flag for x in (name, value)]
    r = run_cli(command, *base, env={var: value})
    assert_usage_error(r, flag, var)


@pytest.mark.parametrize(
    "env",
    [
        {"BREAKWATER_GATEWAY_PORT": "abc"},
        {"BREAKWATER_GATEWAY_ADMIN_PORT": "x", "BREAKWATER_WORKER_MAX_QUEUE": "lots"},
        {"BREAKWATER_GATEWAY_ROUTING": "bogus"},
    ],
)
def test_help_works_whatever_the_environment(env: dict[str, str]) -> None:
    r = run_cli("--help", env=env)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "gateway" in r.stdout


def test_a_flag_replaces_a_bad_environment_default() -> None:
    """argparse converts an env default only when its flag is absent: the flag wins."""
    env = {"BREAKWATER_GATEWAY_PORT": "x"}
    r = run_cli("gateway", *GATEWAY_BASE, "--port=0", "--max-connections=0", env=env)
    assert_usage_error(r, "--max-connections")
    assert "BREAKWATER_GATEWAY_PORT" not in r.stderr


@pytest.fixture(scope="module")
def config_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("configs")
    (d / "broken.toml").write_text("tenants = [\n")
    (d / "tenants5.json").write_text('{"tenants": 5}\n')
    (d / "limits.toml").write_text("[global]\nmax_in_flight = 0\n")
    return d


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--redis-url", "notaurl"], "Redis URL"),
        (["--admission-config", "{dir}/missing.toml"], "--admission-config"),
        (["--admission-config", "{dir}/broken.toml"], "broken.toml"),
        (["--admission-config", "{dir}/tenants5.json"], "tenants5.json"),
        (["--admission-config", "{dir}/limits.toml"], "--admission-config"),
        # started, then a traceback in the log for every span of every request
        (["--trace-exporter", "file:{dir}/no/such/dir/t.jsonl"], "--trace-exporter file:"),
        # started, then failed every admin change
        (["--state-dir", "{dir}/broken.toml/state"], "--state-dir"),
    ],
)
def test_a_gateway_config_error_is_one_line(config_files: Path, args: list[str], says: str) -> None:
    argv = [a.replace("{dir}", str(config_files)) for a in args]
    r = run_cli("gateway", *GATEWAY_BASE, "--port", "0", *argv)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("breakwater gateway: ") and says in lines[0], r.stderr
    assert "READY" not in r.stdout


def test_a_worker_with_an_unreadable_redis_url_says_so_before_loading() -> None:
    r = run_cli("worker", "--engine", "sim", "--grpc-port", "0", "--redis-url", "notaurl")
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("breakwater worker: --redis-url"), r.stderr
    assert "READY" not in r.stdout


def test_up_reports_a_gateway_config_error(tmp_path: Path) -> None:
    """The gateway child's one line, then `up`'s own; its sim worker is stopped again."""
    r = run_cli(
        "up",
        "--engine",
        "sim",
        "--port",
        "0",
        env={"BREAKWATER_GATEWAY_ADMISSION_CONFIG": str(tmp_path / "missing.toml")},
    )
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert "breakwater gateway: --admission-config" in r.stderr, r.stderr
    assert "breakwater up: gateway exited before it was ready (exit code 2)" in r.stderr


def test_up_names_the_child_that_timed_out() -> None:
    r = run_cli("up", "--engine", "sim", "--port", "0", "--ready-timeout", "0.01")
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert "breakwater up: worker-0 was not ready within 0.01s" in r.stderr, r.stderr


def test_demo_model_to_an_unwritable_place_is_one_line() -> None:
    r = run_cli("demo-model", "--out", "/proc/nope/model")
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("breakwater demo-model: --out"), r.stderr


# ---------------------------------------------------------------------------- the types


def refused(parse: Callable[[str], object], text: str) -> str:
    with pytest.raises(argparse.ArgumentTypeError) as e:
        parse(text)
    return str(e.value)


def test_number() -> None:
    positive = number(0.0, low_open=True)
    assert positive("1.5") == 1.5
    for bad in ("0", "-1", "nan", "inf", "x"):
        refused(positive, bad)
    assert number(0.0)("0") == 0.0
    assert number(0.0, 1.0)("1") == 1.0
    assert "<= 1" in refused(number(0.0, 1.0), "1.5")


def test_integer() -> None:
    assert integer(1)("3") == 3
    assert "is not an integer" in refused(integer(1), "1.5")
    assert ">= 1" in refused(integer(1), "0")
    assert integer(0, 2)("2") == 2
    refused(integer(0, 2), "3")


def test_port() -> None:
    assert port()("0") == 0 and port()("65535") == 65535
    for bad in ("65536", "80808", "-1", "-5", "http"):
        refused(port(), bad)
    assert port(allow_off=True)("-1") == -1
    refused(port(allow_off=True), "-2")


def test_choice() -> None:
    assert choice(["a", "b"])("b") == "b"
    assert "choose from a, b" in refused(choice(["a", "b"]), "c")


def test_an_environment_default_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BREAKWATER_TEST_PORT", "99999")
    monkeypatch.setenv("BREAKWATER_TEST_EMPTY", "")
    default = env_default("BREAKWATER_TEST_PORT", "8080")
    assert default == "99999"
    assert "(from BREAKWATER_TEST_PORT)" in refused(port(), default)
    assert "BREAKWATER_TEST" not in refused(port(), "99999")  # typed on the command line
    assert env_default("BREAKWATER_TEST_EMPTY", "8080") == "8080"
    assert env_default("BREAKWATER_TEST_UNSET", None) is None


def test_byte_size_keeps_the_text() -> None:
    assert byte_size("512MiB") == "512MiB"
    assert byte_size("1024") == "1024"
    assert "cannot parse" in refused(byte_size, "lots")
    refused(byte_size, "0")


def test_every_flag_takes_its_default_from_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's promise for containers: `--some-flag` from BREAKWATER_GATEWAY_SOME_FLAG
    (or _WORKER_); only a few flags had one, and the rest were silently ignored."""
    from breakwater.cli import build_parser

    env = {
        "BREAKWATER_GATEWAY_REQUEST_TIMEOUT": "5",
        "BREAKWATER_GATEWAY_MAX_CONNECTIONS": "7",
        "BREAKWATER_GATEWAY_GRPC_PORT": "1234",
        "BREAKWATER_GATEWAY_WATCH_CACHES": "off",
        "BREAKWATER_GATEWAY_WORKER": "127.0.0.1:5000, http://127.0.0.1:6000",
        "BREAKWATER_WORKER_HTTP_PORT": "8000",
        "BREAKWATER_WORKER_DRAIN_TIMEOUT": "5",
        "BREAKWATER_WORKER_NO_PREFIX_CACHING": "yes",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    gw = build_parser().parse_args(["gateway"])
    assert (gw.request_timeout, gw.max_connections, gw.grpc_port) == (5.0, 7, 1234)
    assert gw.watch_caches is False
    assert gw.workers == ["127.0.0.1:5000", "http://127.0.0.1:6000"]
    # the command line wins, a repeatable flag's list included
    gw = build_parser().parse_args(["gateway", "--worker", "127.0.0.1:7000", "--watch-caches"])
    assert (gw.workers, gw.watch_caches) == (["127.0.0.1:7000"], True)
    w = build_parser().parse_args(["worker", "--engine", "sim"])
    assert (w.http_port, w.drain_timeout, w.no_prefix_caching) == (8000, 5.0, True)


def test_every_flag_says_what_it_does_and_its_default() -> None:
    """Operators read the defaults (drain timeout, ports, queues) in --help, and how to set
    a flag from the environment; a third of the flags had no text at all."""
    from breakwater.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if action.option_strings and action.help != argparse.SUPPRESS:
                assert action.help, (name, action.option_strings)
    r = run_cli("worker", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "longer) (default: 30.0)" in text  # --drain-timeout
    assert "BREAKWATER_WORKER_<FLAG>" in text and "BREAKWATER_REDIS_URL" in text
    r = run_cli("gateway", "--help")
    assert "(default: 8080)" in r.stdout and "BREAKWATER_GATEWAY_<FLAG>" in r.stdout


def test_an_internal_flag_is_not_set_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from breakwater.cli import build_parser

    monkeypatch.setenv("BREAKWATER_GATEWAY_PROCESS_INDEX", "3")
    args = build_parser().parse_args(["gateway", *GATEWAY_BASE])
    assert args.process_index != 3 and args.process_index != "3"


def test_up_refuses_a_busy_port_or_a_silent_redis_before_any_worker_starts() -> None:
    """Both were found only after every worker had loaded its model (minutes, with a real
    one); the Redis after --ready-timeout (300 s), as 'the gateway did not become ready'."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        for args, says in (
            (["--port", str(taken)], f"breakwater up: --port {taken} on 127.0.0.1: "),
            (["--port", "0", "--grpc-port", str(taken)], f"--grpc-port {taken}"),
            (["--port", "0", "--redis-url", f"redis://127.0.0.1:{taken}/0"], "--redis-url"),
        ):
            started = time.monotonic()
            r = run_cli("up", "--engine", "sim", *args)
            assert r.returncode == 1, (r.returncode, r.stderr)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and says in lines[0], r.stderr
            assert "worker" not in r.stdout and time.monotonic() - started < 30


def test_help_never_prints_a_secret_from_the_environment() -> None:
    """Defaults in --help printed BREAKWATER_ADMIN_TOKEN and a Redis URL's password."""
    env = {
        "BREAKWATER_ADMIN_TOKEN": "TOPSECRET-admin",
        "BREAKWATER_REDIS_URL": "redis://:PW123@r:6379",
        "BREAKWATER_GATEWAY_MAX_QUEUE": "77",
    }
    for command in ("gateway", "worker"):
        r = run_cli(command, "--help", env=env)
        assert r.returncode == 0, r.stderr
        assert "TOPSECRET" not in r.stdout and "PW123" not in r.stdout
        assert "set from the environment" in r.stdout


def test_an_empty_trace_exporter_variable_is_tracing_off() -> None:
    from serving.tracing import exporter_problem

    assert exporter_problem("") is None and exporter_problem("none") is None
    assert exporter_problem("bogus") is not None


def test_messages_hide_a_redis_urls_password() -> None:
    from serving.cli_types import redacted

    assert redacted("redis://user:s3cret@h:1/0") == "redis://user:***@h:1/0"
    assert redacted("rediss://:s3cret@h") == "rediss://:***@h"
    assert redacted("redis://h:6379/0") == "redis://h:6379/0"
    r = run_cli("worker", "--engine", "sim", "--redis-url", "nope://u:s3cret@h")
    assert r.returncode == 2 and "s3cret" not in r.stderr, r.stderr
