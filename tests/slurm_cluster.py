"""A real single-node SLURM cluster (munged + slurmctld + slurmd on loopback) for tests.

Built from Debian's `slurm-wlm` and `munge` packages (installed on first use when we are
root and have apt-get), it runs entirely out of one private temp dir: its own munge key
and socket, its own slurm.conf on free ports, state, spool and logs. Client commands find
it through `SLURM_CONF`, so nothing in /etc is touched and a site's cluster is never hit.

Accounting is deliberately absent (no slurmdbd, no database): snakemake's SLURM executor
reads job states with `squeue --states=all` instead of `sacct` when MinJobAge is long
enough to keep finished jobs visible, and `jobcomp/filetxt` leaves one line per finished
job as an audit trail. The GPU is a gres backed by a plain file, so SLURM schedules it and
sets CUDA_VISIBLE_DEVICES exactly as on a real GPU node, without any hardware.

Every daemon is started in the foreground under our own process id and stopped by that id
(fixture finalizer and `atexit`), jobs are cancelled first, and stray `slurmstepd`
processes of this cluster (recognised by their SLURM_CONF) are killed by pid.

Run `python tests/slurm_cluster.py` to get a cluster for a human (see
scripts/slurm-local-cluster.sh).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
PARTITION = "debug"
WRAPPER_MARK = ".lambdapipe-slurm-wrappers"
CLIENTS = ("sbatch", "srun", "salloc", "squeue", "scancel", "sinfo", "scontrol", "sacct",
           "sstat", "sacctmgr", "sshare")


class ClusterUnavailable(RuntimeError):
    """SLURM cannot be installed or started here (not root, no apt, daemons refuse)."""


def _sbin(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _installed() -> bool:
    return all(_sbin(d) for d in DAEMONS) and bool(shutil.which("sbatch"))


def ensure_installed(timeout_s: float = 600) -> float:
    """Install SLURM and munge from Debian if missing; return the seconds it took (0 if
    already there). Raises ClusterUnavailable when that is impossible on this machine.

    Once per machine: two pytest-xdist workers starting clusters at the same time would
    otherwise both run apt-get, and the second would fail on dpkg's lock. The first
    installs under a file lock; the other waits for it and finds the packages there."""
    if _installed():
        return 0.0
    from filelock import FileLock

    with FileLock(Path(tempfile.gettempdir()) / "lambdapipe-slurm-install.lock"):
        return _install(timeout_s)


def _install(timeout_s: float) -> float:
    if _installed():
        return 0.0
    if os.geteuid() != 0:
        raise ClusterUnavailable("SLURM is not installed and we are not root to apt-get it")
    if not shutil.which("apt-get"):
        raise ClusterUnavailable("SLURM is not installed and there is no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    start = time.monotonic()
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ClusterUnavailable(f"{' '.join(cmd)} took over {timeout_s:g} s") from None
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            raise ClusterUnavailable(f"{' '.join(cmd)} failed: {tail[0]}")
    if not _installed():
        raise ClusterUnavailable(f"apt-get installed {PACKAGES} but the daemons are missing")
    return time.monotonic() - start


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _mem_mb() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 4096


class SlurmCluster:
    """One controller + one compute node named after this host, reachable on 127.0.0.1.

    `gpus`: how many gres GPUs the node has (0: no GresTypes at all, a cluster without
    GPUs). `cpus`: CPUs the node advertises (config_overrides, so it may exceed nproc).
    `nodes` 2: a second node, `localhost`, served by a second slurmd on this host (its own
    port, spool, pid and log files, `%n`), so that srun starts a step's tasks on two nodes;
    Debian's slurmd 22.05 runs two on one host without --enable-multiple-slurmd (it logs
    "Duplicated NodeHostName" and goes on). Its node names must resolve to this host (the
    ranks meet at the first one): the short host name and `localhost`.
    """

    def __init__(self, root: Path | None = None, gpus: int = 1, cpus: int | None = None,
                 partition: str = PARTITION, cluster_name: str = "lambdapipe-test",
                 nodes: int = 1):
        self._owns_root = root is None  # a dir we made is removed on stop()
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="slurm-"))
        self.gpus = gpus
        self.cpus = cpus or max(2, os.cpu_count() or 2)
        self.partition = partition
        self.cluster_name = cluster_name
        # slurmctld insists that SlurmctldHost names this host; slurmd takes its node name
        # from the short hostname. Both are reached on loopback whatever the host is called.
        self.node = socket.gethostname().split(".")[0]
        if nodes not in (1, 2):
            raise ValueError(f"nodes {nodes}: a test cluster has 1 or 2")
        self.nodes = [self.node, "localhost"][:nodes]
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "etc" / "slurm.conf"
        self.log_dir = self.root / "log"
        self.bin_dir = self.root / "bin"
        self.jobcomp = self.log_dir / "jobcomp.txt"
        # munged wants execute-for-all on every directory above its socket, which a
        # pytest tmp dir (0700) is not: the munge dir is a separate 0755 temp dir.
        self.munge_dir = Path(tempfile.mkdtemp(prefix="slurm-munge-"))
        self.munge_socket = self.munge_dir / "munge.socket.2"
        # slurmstepd makes a Unix socket per job step in the spool dir, whose path may be 108
        # bytes at most: under a pytest tmp path it was 110, the step failed and slurmctld
        # requeued the job forever. A short temp dir, as for munge.
        self.spool = Path(tempfile.mkdtemp(prefix="slurm-spool-"))
        self.gpu_files = [self.root / "dev" / f"fakegpu{i}" for i in range(gpus)]
        self._atexit = False

    # ------------------------------------------------------------------ environment
    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands (sbatch, squeue, snakemake) to reach this cluster."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        # A login-node default would otherwise steer jobs elsewhere.
        for var in ("SBATCH_PARTITION", "SLURM_PARTITION", "SBATCH_ACCOUNT", "SLURM_ACCOUNT"):
            env.pop(var, None)
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env=kwargs.pop("env", self.env), capture_output=True,
                              text=True, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: "
                               f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    # ------------------------------------------------------------------ configuration
    def _write_config(self) -> None:
        for sub in ("etc", "log", "state", "run", "dev", "bin"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._write_client_wrappers()
        self.munge_dir.chmod(0o755)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for f in self.gpu_files:
            # slurmd wants a character device per GPU; /dev/null's numbers stand in.
            if not f.exists():
                try:
                    os.mknod(f, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
                except OSError:  # no CAP_MKNOD: a link to /dev/null stats the same
                    f.symlink_to("/dev/null")
        ctld_port, slurmd_port, *node_ports = _free_ports(2 + len(self.nodes))
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        many = len(self.nodes) > 1  # one slurmd per node: files named by node (%n)
        lines = [
            f"ClusterName={self.cluster_name}",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.spool}{'/%n' if many else ''}",
            f"SlurmctldPidFile={self.root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'run' / ('slurmd-%n.pid' if many else 'slurmd.pid')}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log_dir / ('slurmd-%n.log' if many else 'slurmd.log')}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            # task/affinity, not task/none: the jobstep executor runs `srun --cpu-bind=q`,
            # which task/none refuses. It needs no cgroups.
            "TaskPlugin=task/affinity",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp}",
            # Finished jobs stay visible to `squeue --states=all` for 30 min: that is what
            # lets snakemake's executor poll squeue instead of sacct (no slurmdbd here).
            "MinJobAge=1800",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "SchedulerParameters=sched_min_interval=0",
            "KillWait=5",
            *(["GresTypes=gpu"] if self.gpus else []),
            *(f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={self.node} "
              f"CPUs={self.cpus} RealMemory={_mem_mb()}{gres} State=UNKNOWN"
              + (f" Port={port}" if many else "")
              for name, port in zip(self.nodes, node_ports, strict=True)),
            f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES "
            "MaxTime=INFINITE State=UP",
        ]
        for name in self.nodes if many else ():
            (self.spool / name).mkdir(exist_ok=True)
        self.conf.write_text("\n".join(lines) + "\n")
        gres_conf = self.conf.parent / "gres.conf"
        gres_conf.write_text("".join(f"NodeName={n} Name=gpu File={f}\n"
                                     for n in self.nodes for f in self.gpu_files))

    def _write_client_wrappers(self) -> None:
        """`srun` etc. that always find this cluster's slurm.conf.

        On a real node the config is in /etc/slurm (or slurmd's configless cache), and
        snakemake's jobstep executor strips every SLURM_* variable, SLURM_CONF included,
        before its nested `srun`. Wrappers first on PATH (which sbatch exports into the job)
        give that srun our config without writing to /etc or /run."""
        (self.bin_dir / WRAPPER_MARK).write_text("slurm client wrappers of a test cluster\n")
        search = os.pathsep.join(
            d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not (Path(d) / WRAPPER_MARK).exists())  # never wrap another wrapper
        for name in CLIENTS:
            real = shutil.which(name, path=search)
            if real is None:
                continue
            wrapper = self.bin_dir / name
            wrapper.write_text(f'#!/bin/sh\nSLURM_CONF="{self.conf}" exec {real} "$@"\n')
            wrapper.chmod(0o755)

    # ------------------------------------------------------------------ lifecycle
    def _spawn(self, name: str, args: list[str]) -> None:
        with open(self.log_dir / f"{name}.stdout", "ab") as log:
            self.procs[name] = subprocess.Popen(
                args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait(self, what: str, ok, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterUnavailable(
                        f"{name} exited with {proc.returncode} while waiting for {what}: "
                        f"{self._log_tail(name)}")
            if ok():
                return
            time.sleep(0.2)
        raise ClusterUnavailable(f"timed out after {timeout_s:g} s waiting for {what}: "
                                 f"{self._log_tail('slurmctld')} | {self._log_tail('slurmd')}")

    def _log_tail(self, name: str) -> str:
        for path in (self.log_dir / f"{name}.log", self.log_dir / f"{name}.stdout"):
            if path.exists() and path.stat().st_size:
                lines = path.read_text(errors="replace").strip().splitlines()
                return " / ".join(lines[-3:])
        return "(no log)"

    def start(self, timeout_s: float = 60) -> SlurmCluster:
        """Write the config, start the three daemons, wait for the node to be idle."""
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        self._write_config()
        try:
            m = self.munge_dir
            self._spawn("munged", [_sbin("munged"), "--foreground", f"--socket={self.munge_socket}",
                                   f"--key-file={m / 'munge.key'}",
                                   f"--log-file={self.log_dir / 'munged.log'}",
                                   f"--pid-file={m / 'munged.pid'}",
                                   f"--seed-file={m / 'munged.seed'}"])
            self._wait("munged", self.munge_socket.exists, timeout_s)
            self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait("slurmctld", lambda: self.run("scontrol", "ping", check=False,
                                                     timeout=10).returncode == 0, timeout_s)
            for k, name in enumerate(self.nodes):
                self._spawn("slurmd" if k == 0 else f"slurmd-{name}",
                            [_sbin("slurmd"), "-D", "-f", str(self.conf), "-N", name])
            self._wait(f"node(s) {','.join(self.nodes)} idle", self._node_idle, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _node_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%t", check=False, timeout=10).stdout
        states = [s.strip().rstrip("*") for s in out.split()]
        return len(states) == len(self.nodes) and all(
            s in ("idle", "mix", "alloc") for s in states)

    def stop(self) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged by their process ids."""
        if self.procs:
            self._stop_daemons()
        shutil.rmtree(self.munge_dir, ignore_errors=True)
        shutil.rmtree(self.spool, ignore_errors=True)
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _stop_daemons(self) -> None:
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            with contextlib.suppress(Exception):
                self.run("scancel", "--full", "--user", str(os.getuid()), check=False,
                         timeout=15)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self.run(
                        "squeue", "-h", "-t", "running,completing", check=False,
                        timeout=10).stdout.strip():
                    time.sleep(0.3)
        slurmds = [n for n in self.procs if n.startswith("slurmd-")]  # nodes after the first
        for name in (*slurmds, "slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for pid in self.stray_step_daemons():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.procs.clear()

    def stray_step_daemons(self) -> list[int]:
        """Pids of slurmstepd (or any process) still carrying this cluster's SLURM_CONF."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                comm = (entry / "comm").read_text().strip()
                if comm not in ("slurmstepd", "slurmd", "slurmctld", "munged"):
                    continue
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def alive(self) -> dict[str, bool]:
        return {name: proc.poll() is None for name, proc in self.procs.items()}

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ job helpers
    def sbatch(self, *args: str) -> str:
        """Submit with `sbatch --parsable ARGS`; return the job id."""
        out = self.run("sbatch", "--parsable", *args).stdout.strip()
        return out.split(";")[0]

    def job_state(self, job_id: str) -> str:
        out = self.run("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T",
                       check=False).stdout.strip()
        return out or "UNKNOWN"

    def wait_job(self, job_id: str, timeout_s: float = 60,
                 states: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                            "NODE_FAIL", "OUT_OF_MEMORY")) -> str:
        deadline = time.monotonic() + timeout_s
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} still {state} after {timeout_s:g} s")

    def finished_jobs(self) -> list[dict[str, str]]:
        """The jobcomp/filetxt records: one dict per finished job (JobId, JobName, JobState,
        Partition, ...), written by slurmctld itself."""
        if not self.jobcomp.exists():
            return []
        records = []
        for line in self.jobcomp.read_text().splitlines():
            records.append(dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line)))
        return records


REQUIRE_ENV = "LAMBDAPIPE_REQUIRE_SLURM"


def start_or_skip(root: Path | None, gpus: int = 1, **kwargs) -> SlurmCluster | None:
    """Install if needed and start a cluster in ROOT, or pytest.skip with the reason (ROOT
    None: install only, for a test that needs SLURM installable but no cluster).

    With $LAMBDAPIPE_REQUIRE_SLURM=1 (CI on a machine known to support it) a cluster that
    cannot be had fails the test instead, so a broken harness is never a silent skip."""
    import pytest

    try:
        ensure_installed()
        return None if root is None else SlurmCluster(root=root, gpus=gpus, **kwargs).start()
    except ClusterUnavailable as exc:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"no local SLURM cluster although ${REQUIRE_ENV}=1: {exc}")
        pytest.skip(f"no local SLURM cluster: {exc}")


if __name__ == "__main__":  # a cluster for a human: prints the env line, stops on Ctrl-C
    import sys

    try:
        took = ensure_installed()
    except ClusterUnavailable as exc:
        sys.exit(f"slurm-local-cluster: {exc}")
    if took:
        print(f"installed {' '.join(PACKAGES)} in {took:.0f} s")
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    with SlurmCluster(root=root) as cluster:
        print(f"export SLURM_CONF={cluster.conf} PATH={cluster.bin_dir}:$PATH"
              f"    # partition {cluster.partition}, node {cluster.node}, "
              f"gpu:{cluster.gpus}; logs in {cluster.log_dir}", flush=True)
        def _interrupt(*_):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _interrupt)
        with contextlib.suppress(KeyboardInterrupt):
            while all(cluster.alive().values()):
                time.sleep(1)
