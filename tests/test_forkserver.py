"""The test-only fork server (tests/forkserver.py) that the kill loops and the end-to-end
grids start their `lambdapipe` commands from: a command through it exits, prints and ends on
a signal as the same command in a fresh interpreter does, and dies with its client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from click.testing import CliRunner
from forkserver import HOOK_DIR

from lambdapipe.cli import main

ROOT = HOOK_DIR.parents[1]
SLEEP = "import time\ntime.sleep(120)\n"  # a command that is still running when signalled

pytestmark = pytest.mark.slow  # a server imports torch first (seconds of CPU)


def relayed(fork_server, *args: str) -> subprocess.CompletedProcess:
    """`python -m lambdapipe ARGS` as a rule runs it, through the server."""
    env = fork_server.env()
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env['PYTHONPATH']}"  # the rule's prefix
    return subprocess.run([sys.executable, "-m", "lambdapipe", *args], env=env, text=True,
                          capture_output=True, timeout=300)


def test_a_relayed_command_prints_and_exits_as_the_cli(fork_server):
    # a pattern: tests earlier in this worker may have registered their own models here
    # (test_distributed's dist_tiny), which the server's fresh registry does not hold
    for args in (["models", "--dataset", "digits", "--pattern", "resnet2*"],
                 ["train", "--no-such-option"]):
        res = relayed(fork_server, *args)
        cli = CliRunner().invoke(main, args, prog_name="lambdapipe")
        assert (res.returncode, res.stdout) == (cli.exit_code, cli.stdout), args
        assert res.stderr == cli.stderr, args


def test_another_checkout_is_refused_in_one_line(fork_server, tmp_path):
    env = fork_server.env()
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"
    res = subprocess.run([sys.executable, "-m", "lambdapipe", "models"], env=env, text=True,
                         capture_output=True, timeout=300)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.startswith("fork server: the package this command's PYTHONPATH names")
    assert len(res.stderr.strip().splitlines()) == 1


def test_a_signal_to_the_client_ends_the_command_with_it(fork_server, tmp_path):
    with open(os.devnull, "rb") as null, open(tmp_path / "log", "wb") as log:
        fds = (null.fileno(), log.fileno(), log.fileno())
        command = fork_server.start(["models"], dict(os.environ), fds, hook=SLEEP,
                                    check_path=False)
    command.signal(signal.SIGTERM)
    assert command.wait(timeout=60) == -signal.SIGTERM


def test_a_killed_client_takes_its_command_with_it(fork_server, tmp_path):
    with open(os.devnull, "rb") as null, open(tmp_path / "log", "wb") as log:
        fds = (null.fileno(), log.fileno(), log.fileno())
        command = fork_server.start(["models"], dict(os.environ), fds, hook=SLEEP,
                                    check_path=False)
    child = psutil.Process(command.pid)
    assert child.ppid() == fork_server.proc.pid
    command.conn.close()  # what the kernel does when the client is SIGKILLed
    deadline = time.monotonic() + 60
    while child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the command outlived its client"
        time.sleep(0.05)
