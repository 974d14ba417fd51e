"""The Slurm job scripts in examples/slurm/, run by a real Slurm that the test starts on this machine:
one node, the CPU, gloo, the smoke preset. Each job is submitted with ``sbatch --wait`` and its
checkpoints and log are checked in the job's folder.

Needs Debian's ``slurm-wlm`` and ``munge`` (``.ci/run`` installs them) and root (the daemons run as
root from a private folder). Missing: skipped on a developer's machine, a failure in CI.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import in_ci

pytestmark = pytest.mark.slow  # a Slurm cluster and two training jobs: `make test-fast` leaves it out

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "examples" / "slurm"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unavailable() -> str | None:
    missing = [c for c in ("slurmctld", "slurmd", "sbatch", "munged", "munge") if shutil.which(c) is None]
    if missing:
        return f"Slurm is not installed (apt-get install slurm-wlm munge): {', '.join(missing)} missing"
    if os.geteuid() != 0:
        return "a private Slurm cluster runs its daemons as root"
    return None


def _start_munge() -> None:
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return  # a munge daemon answers already
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], check=True)
    for _ in range(50):
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError("munged did not start")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm cluster of this machine's CPUs; yields the environment that reaches it."""
    why = _unavailable()
    if why:
        if in_ci():
            pytest.fail(why + "; in CI a missing Slurm fails instead of skipping")
        pytest.skip(why)
    base = tmp_path_factory.mktemp("slurm")
    for d in ("state", "spool", "log"):
        (base / d).mkdir()
    host = socket.gethostname().split(".")[0]
    conf = base / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=hipseg-test", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}", "AuthType=auth/munge",
        f"StateSaveLocation={base / 'state'}", f"SlurmdSpoolDir={base / 'spool'}",
        f"SlurmctldPidFile={base / 'slurmctld.pid'}", f"SlurmdPidFile={base / 'slurmd.pid'}",
        f"SlurmctldLogFile={base / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={base / 'log' / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "MpiDefault=none", "ReturnToService=2",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN",
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    _start_munge()
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
    subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env)
    try:
        deadline = time.time() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                                           env=env).stdout:
            assert time.time() < deadline, (base / "log" / "slurmctld.log").read_text()[-2000:]
            time.sleep(0.5)
        yield env
    finally:
        for pid_file in ("slurmd.pid", "slurmctld.pid"):
            path = base / pid_file
            if path.exists():
                try:
                    os.kill(int(path.read_text().split()[0]), 15)
                except (ProcessLookupError, ValueError):
                    pass


def _submit(slurm_env: dict, script: str, folder: Path, data: Path, extra: list[str], **env) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    run_env = {**slurm_env, "HIPSEG_DATA": str(data), "HIPSEG_PRESET": "smoke", "OMP_NUM_THREADS": "1",
               "PYTHON": str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else "python3",
               "PYTHONPATH": str(ROOT), **env}
    r = subprocess.run(["sbatch", "--wait", "--parsable", "--cpus-per-task=2", "--mem=2000", *extra,
                        str(SCRIPTS / script)], cwd=folder, env=run_env, capture_output=True, text=True,
                       timeout=900)
    job = r.stdout.strip().split(";")[0]
    outputs = "".join(p.read_text() for p in folder.glob("slurm-*.out"))
    assert r.returncode == 0, f"job {job} failed: {r.stderr}\n{outputs[-3000:]}"
    runs = [p for p in (folder / "runs").iterdir() if p.name.endswith(f"-{job}")]
    assert len(runs) == 1, (list((folder / "runs").iterdir()), outputs)
    return runs[0]


def test_the_multi_node_script_trains_two_processes_through_torchrun(slurm, tiny_synth, tmp_path):
    """srun starts torchrun with a rendezvous taken from Slurm's node list; two processes (gloo)
    train, and the job's folder holds the checkpoints and the log of both ranks' steps."""
    run = _submit(slurm, "train_multi_node.sbatch", tmp_path, tiny_synth, ["--nodes=1", "--gres=none"],
                  GPUS_PER_NODE="2", MASTER_PORT=str(_free_port()), HIPSEG_ARGS="--device cpu --epochs 2 --quiet")
    assert {"new_model.pth", "last.pth", "train_log.jsonl", "job.out"} <= {p.name for p in run.iterdir()}
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in log] == [1, 2] and all(h["world_size"] == 2 for h in log)
    out = (run / "job.out").read_text()
    assert "on cpu x 2 (gloo)" in out and "best checkpoint:" in out


def test_the_one_gpu_script_trains_into_the_jobs_folder(slurm, tiny_synth, tmp_path):
    from hipseg_lib.checkpoint import read_checkpoint

    run = _submit(slurm, "train_one_gpu.sbatch", tmp_path, tiny_synth, ["--gres=none"],
                  HIPSEG_ARGS="--device cpu --epochs 1 --quiet")
    assert read_checkpoint(run / "last.pth")["epoch"] == 0
    assert "planned 1 epochs done" in (run / "job.out").read_text()


def _job_field(slurm_env: dict, job: str, field: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], env=slurm_env, capture_output=True,
                           text=True).stdout
    found = [w.split("=", 1)[1] for w in shown.split() if w.startswith(field + "=")]
    return found[0] if found else ""


@pytest.mark.parametrize("script, name, processes, epochs", [("train_one_gpu.sbatch", "hipseg", 1, 40),
                                                              ("train_multi_node.sbatch", "hipseg-ddp", 2, 12)])
def test_a_job_warned_before_its_time_limit_saves_requeues_and_resumes(slurm, tiny_synth, tmp_path, script, name,
                                                                       processes, epochs):
    """The time-limit path: Slurm's warning (``--signal=B:USR1@...`` sends USR1 to the batch shell)
    reaches the job mid-run; hipseg ends its epoch and writes last.pth (under torchrun: every process,
    while torchrun's agents live on), the script requeues the job, and the same job (same id and
    folder) resumes from last.pth and trains to the planned last epoch. The warning is sent as Slurm
    sends it, to the batch shell, by ``scancel --batch --signal``, once the first epoch is logged (a
    time limit of minutes would make the test as long)."""
    from hipseg_lib.checkpoint import read_checkpoint

    run_env = {**slurm, "HIPSEG_DATA": str(tiny_synth), "HIPSEG_PRESET": "smoke", "OMP_NUM_THREADS": "1",
               "PYTHON": str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else "python3",
               "PYTHONPATH": str(ROOT), "HIPSEG_ARGS": f"--device cpu --epochs {epochs}",
               "GPUS_PER_NODE": str(processes), "MASTER_PORT": str(_free_port())}
    r = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=2", "--mem=2000", "--gres=none", "--nodes=1",
                        str(SCRIPTS / script)], cwd=tmp_path, env=run_env,
                       capture_output=True, text=True, check=True)
    job = r.stdout.strip().split(";")[0]
    run = tmp_path / "runs" / f"{name}-{job}"
    log = run / "train_log.jsonl"

    def outputs() -> str:
        return "".join(p.read_text() for p in [*tmp_path.glob("slurm-*.out"), run / "job.out"] if p.exists())

    deadline = time.time() + 300
    while not (log.exists() and log.read_text().strip()):
        assert time.time() < deadline and _job_field(slurm, job, "JobState") in ("PENDING", "RUNNING"), outputs()
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm, check=True)
    hurried, pending_since = False, 0.0
    while _job_field(slurm, job, "JobState") != "COMPLETED":
        state = _job_field(slurm, job, "JobState")
        assert time.time() < deadline and state not in ("FAILED", "CANCELLED", "TIMEOUT"), (state, outputs())
        pending_since = pending_since or (time.time() if state == "PENDING" else 0.0)
        if pending_since and time.time() > pending_since + 3 and not hurried:
            # requeued: Slurm holds it a few minutes; not here. Not at once either: slurmd refuses a
            # credential issued within the second it revoked the first run's ("already killed").
            hurried = subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm,
                                     capture_output=True).returncode == 0
        time.sleep(0.5)
    said = (run / "job.out").read_text()
    assert "time limit near: last.pth saved; requeueing" in said, said
    assert "signal SIGUSR1" in said, said
    assert "srun: error" not in said, "every task ended well: the warning killed no torchrun agent"
    assert _job_field(slurm, job, "Restarts") == "1", said
    assert "(restart 1)" in said and "--resume" in said.split("(restart 1)", 1)[1].splitlines()[0], said
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [h["epoch"] for h in lines] == list(range(1, epochs + 1)), "each epoch once: resumed from last.pth"
    assert all(h["world_size"] == processes for h in lines)
    resumed_at = int(said.split("at epoch ", 1)[1].split()[0])
    assert 1 < resumed_at <= epochs, said  # stopped mid-run, after at least one epoch
    assert read_checkpoint(run / "last.pth")["epoch"] == epochs - 1
