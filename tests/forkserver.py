"""Test-only fork server: one Python process imports torch and lambdapipe once, then forks a
child per `lambdapipe` command, which runs the CLI's main with the command's argv, working
directory, environment and standard streams. Each command is a process of its own (its own
pid, killed, signalled and exiting like any other), without the ~4 CPU-s of imports (torch,
and the torch._dynamo that torch.optim imports) a fresh interpreter spends first.

Two kinds of client:

- tests in Python (`ForkServer.start`): the kill loops of tests/test_killloop.py;
- `python -m lambdapipe` in a Snakemake rule, when the test puts tests/forkhook first on
  PYTHONPATH and names the server's socket in $LAMBDAPIPE_TEST_FORK_SERVER
  (`ForkServer.env`): tests/forkhook/sitecustomize.py hands its argv, working directory,
  environment and file descriptors 0-2 to the server (`relay`), forwards the signals it
  gets to the child and exits as the child did. Snakemake, DVC, the shell and the rules
  are the real ones; only the interpreter's start-up is shared.

The server refuses a command whose PYTHONPATH puts another checkout's package first than the
one it imported (a copied repo runs its own server). Run as `python tests/forkserver.py
SOCKET`; docs/testing.md says which tests use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOCKET_ENV = "LAMBDAPIPE_TEST_FORK_SERVER"
HOOK_DIR = Path(__file__).resolve().parent / "forkhook"
# What a command would import itself; imported once here, before any fork.
PRELOAD = ("torch", "torch._dynamo", "torch._inductor.config", "torch.optim",
           "torch.utils.serialization", "numpy", "lambdapipe.cli", "lambdapipe.data",
           "lambdapipe.evaluate", "lambdapipe.explain", "lambdapipe.gpu", "lambdapipe.logs",
           "lambdapipe.models", "lambdapipe.noise", "lambdapipe.provenance",
           "lambdapipe.report", "lambdapipe.step", "lambdapipe.train")
# Signals a relaying client passes on to its command (SIGKILL cannot be caught: the server
# kills the command when the client's connection closes first).
RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
           signal.SIGUSR2)
HEADER = struct.Struct("!I")


# --------------------------------------------------------------------------- the server
def serve(path: str) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    import torch

    import lambdapipe

    assert len(os.listdir("/proc/self/task")) == 1, "a thread would not survive the fork"
    package_root = Path(lambdapipe.__file__).resolve().parents[1]
    threads = torch.get_num_threads()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    commands: list[dict] = []
    while True:
        fds = [listener.fileno()]
        for c in commands:
            fds += [c["conn"].fileno()] if c["conn"] is not None else []
            fds += [c["pidfd"]] if c["pidfd"] is not None else []
        ready = set(select.select(fds, [], [])[0])
        for command in commands:
            if command["conn"] is not None and command["conn"].fileno() in ready:
                _signals_from_client(command)
            if command["pidfd"] is not None and command["pidfd"] in ready:
                _finished(command)
        commands = [c for c in commands if c["pidfd"] is not None or c["conn"] is not None]
        if listener.fileno() in ready:
            conn = listener.accept()[0]
            try:
                command = _receive(conn)
            except (OSError, ValueError):  # json's errors are ValueErrors
                conn.close()
            else:
                command["conn"] = conn
                _fork(command, package_root, threads)
                commands.append(command)


def _receive(conn: socket.socket) -> dict:
    header, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
    if len(header) != HEADER.size or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError("a request is a header and three file descriptors")
    size, payload = HEADER.unpack(header)[0], b""
    while len(payload) < size:
        chunk = conn.recv(size - len(payload))
        if not chunk:
            raise ValueError("a request ended early")
        payload += chunk
    return {**json.loads(payload), "fds": fds}


def _fork(command: dict, package_root: Path, threads: int) -> None:
    pid = os.fork()
    if pid == 0:
        _child(command, package_root, threads)  # never returns
    for fd in command.pop("fds"):
        os.close(fd)
    command["pid"], command["pidfd"] = pid, os.pidfd_open(pid)
    command["conn"].sendall(f"{pid}\n".encode())


def _child(command: dict, package_root: Path, threads: int) -> None:
    code = 1
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: dies with the server
        for n, fd in enumerate(command["fds"]):
            os.dup2(fd, n)
        os.closerange(3, 1 << 16)  # the server's socket, the other clients', pidfds
        for sig in RELAYED:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN if command.get("sigint_ignored")
                      else signal.default_int_handler)
        os.chdir(command["cwd"])
        os.environ.clear()
        os.environ.update(command["env"])
        first = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0]
        if command.get("check_path", True) and (
                not first or Path(first).resolve() != package_root):
            raise SystemExit(f"fork server: the package this command's PYTHONPATH names "
                             f"first ({first!r}) is not the one the server imported "
                             f"({package_root})")
        import numpy
        import torch

        numpy.random.seed()  # a fresh interpreter's global generator is its own
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or threads))
        hook: dict = {}
        exec(command.get("hook") or "", hook)
        import lambdapipe.__main__ as entry
        import lambdapipe.cli

        sys.argv = [entry.__file__, *command["argv"]]
        try:
            lambdapipe.cli.main(command["argv"], prog_name="lambdapipe")
            code = 0
        except SystemExit as stop:
            if isinstance(stop.code, int) or stop.code is None:
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
                code = 1
        finally:
            if "at_exit" in hook:
                hook["at_exit"]()
    except SystemExit as refused:  # before the CLI ran: its one-line reason
        print(refused.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _signals_from_client(command: dict) -> None:
    try:
        data = command["conn"].recv(64)
    except OSError:
        data = b""
    if not data:  # the client is gone (killed): so is its command
        if command["pidfd"] is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(command["pidfd"], signal.SIGKILL)
        command["conn"].close()
        command["conn"] = None
        return
    for sig in data:
        if command["pidfd"] is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(command["pidfd"], sig)


def _finished(command: dict) -> None:
    status = os.waitpid(command["pid"], 0)[1]
    os.close(command["pidfd"])
    command["pidfd"] = None
    if command["conn"] is not None:
        with contextlib.suppress(OSError):
            command["conn"].sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
        command["conn"].close()
        command["conn"] = None


# --------------------------------------------------------------------------- clients
class Command:
    """A command the server started: its pid, its exit code when it ends."""

    def __init__(self, conn: socket.socket):
        self.conn, self.buffer = conn, b""
        self.pid = int(self._line(timeout=300) or 0)
        assert self.pid, "the fork server did not start the command"
        self.code: int | None = None

    def _line(self, timeout: float | None) -> str | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and (left <= 0 or not select.select([self.conn], [], [],
                                                                     left)[0]):
                return None
            chunk = self.conn.recv(4096)
            if not chunk:
                raise RuntimeError("the fork server closed the connection")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code (negative: the signal that ended it), None after `timeout` s."""
        if self.code is None:
            line = self._line(timeout)
            if line is None:
                return None
            self.code = int(line)
            self.conn.close()
        return self.code

    def signal(self, sig: int) -> None:
        self.conn.sendall(bytes([sig]))


def submit(path: str, argv: list[str], env: dict[str, str], cwd: str, fds: tuple[int, int, int],
           hook: str = "", check_path: bool = True) -> Command:
    """Start `lambdapipe ARGV` in a child of the server at PATH, on the file descriptors FDS
    as its stdin, stdout and stderr; HOOK is Python run in the child before the CLI (it may
    define `at_exit()`, run after it)."""
    payload = json.dumps({
        "argv": argv, "env": env, "cwd": cwd, "hook": hook, "check_path": check_path,
        "sigint_ignored": signal.getsignal(signal.SIGINT) == signal.SIG_IGN}).encode()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    socket.send_fds(conn, [HEADER.pack(len(payload))], list(fds))
    conn.sendall(payload)
    return Command(conn)


def relay(path: str, argv: list[str]) -> None:
    """Run `lambdapipe ARGV` in the server as this process would (its working directory,
    environment and standard streams), pass on the signals this process gets, and end this
    process as the command ended (its exit code, or killed by the same signal)."""
    command = submit(path, argv, dict(os.environ), os.getcwd(), (0, 1, 2))
    for sig in RELAYED:
        if signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, lambda sig, _frame: command.signal(sig))
    code = command.wait()
    if code < 0:
        for sig in RELAYED:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


class ForkServer:
    """A server process for one test (or module, or session): `start` commands from Python,
    or run Snakemake with `env()` so that its rules' `python -m lambdapipe` go through it."""

    def __init__(self, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="lp-fork-"))  # a socket path is <108 bytes
        self.path = str(self.dir / "socket")
        # numpy's OpenBLAS starts its thread pool when imported, and a thread does not
        # survive a fork: one BLAS thread in the server (torch's own threads are set per
        # command, from its OMP_NUM_THREADS).
        env = dict(os.environ if env is None else env, OPENBLAS_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, __file__, self.path], env=env, cwd=cwd,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        ready = select.select([self.proc.stdout], [], [], 600)[0]
        line = self.proc.stdout.readline().decode().strip() if ready else ""
        if line != "ready":
            self.close()
            raise RuntimeError(f"the fork server did not start ({self.proc.poll()})")

    def start(self, argv: list[str], env: dict[str, str], fds: tuple[int, int, int],
              cwd: str | None = None, hook: str = "", check_path: bool = True) -> Command:
        assert self.proc.poll() is None, f"the fork server exited ({self.proc.returncode})"
        return submit(self.path, argv, env, cwd or os.getcwd(), fds, hook, check_path)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """BASE (default: this process's environment) with the hook first on PYTHONPATH and
        this server's socket named: every `python -m lambdapipe` started with it, and by
        what is started with it, runs in this server."""
        env = dict(os.environ if base is None else base)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = os.pathsep.join([str(HOOK_DIR), *([path] if path else [])])
        env[SOCKET_ENV] = self.path
        return env

    def close(self) -> None:
        self.proc.kill()  # its children die with it (PR_SET_PDEATHSIG)
        self.proc.wait()
        self.proc.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == "__main__":
    with contextlib.suppress(ValueError):  # tests/ is no package path for the commands
        sys.path.remove(str(Path(__file__).resolve().parent))
    serve(sys.argv[1])
