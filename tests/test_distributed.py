"""`palpcompose train` on 2 CPU processes (gloo) under torchrun and `accelerate launch`, tiny pipeline, few steps.

Each launch starts two Python processes (a few seconds of imports each), so the tests launch as little as they can:
a run and its resume, an interrupt, one numerical step, one lost process. The launchers run the console script of
this venv, as a user would.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from palpcompose import distributed
from palpcompose.checkpoint import load_checkpoint
from palpcompose.data import SubjectData, sample_batch
from palpcompose.errors import UserError
from palpcompose.project import load_project
from palpcompose.train import train

BIN = Path(sys.executable).parent
PALPCOMPOSE = str(BIN / "palpcompose")
HANG_GUARD_S = 300  # a launch that takes longer is stuck: fail instead of waiting for CI's timeout


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]


def accelerate_launch(*args) -> list[str]:
    """The command docs/training.md gives for N processes on one machine (--cpu would start only one)."""
    with socket.socket() as s:  # accelerate's default port 29500 may be taken by another run on this machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *map(str, args)]


@pytest.fixture
def launch_env(tmp_path):
    # One thread per process (2 processes, few cores); no accelerate config file of the user's (HF_HOME)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parent)}
    env.pop("PALP_DEBUG", None)
    return env


def run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, check=False)


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)


def wait_until_training(root: Path, process: subprocess.Popen, after_step: int = 0) -> None:
    """Until this run's manifest says running (the main process writes it as the loop starts) and, with
    `after_step`, its checkpoint is past that step (a resumed run at work)."""
    manifest = root / "out" / "manifest.json"
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.is_file() and json.loads(manifest.read_text()).get("status") == "running":
            if not after_step:
                return
            state = root / "out" / "checkpoint" / "state.json"
            try:
                if json.loads(state.read_text())["step"] > after_step:
                    return
            except (OSError, ValueError, KeyError):
                pass
        time.sleep(0.2)
    raise AssertionError(f"training never started (exit code {process.poll()})")


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def data_state_after(root: Path, rank: int, steps: int) -> torch.Tensor:
    """The state of rank `rank`'s data generator after `steps` steps of batch 1: what its checkpoint must hold.
    The draws' count depends on shapes only (8x8 latents of 4 channels for the tiny pipeline's 16 px images)."""
    config = load_project(root).config
    subject = config.subjects["V1"]
    latents = torch.zeros(2 * 3 if subject.flip else 3, 4, 8, 8)
    subjects = [SubjectData("V1", torch.zeros(77, dtype=torch.long), latents, latents, 3, bool(subject.flip))]
    generator = torch.Generator().manual_seed(distributed.data_seed(config.train.seed, rank))
    for _ in range(steps):
        sample_batch(subjects, generator, config.train.batch_size, 1000)
    return generator.get_state()


def test_two_processes_train_like_one_then_resume_and_stop_together_on_sigint(make_project, launch_env, tmp_path):
    # torchrun: a run of 2 steps completes
    root = make_project({"train": {"steps": 2, "save_every": 1}})
    done = run(torchrun(PALPCOMPOSE, "train", root), launch_env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = root / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["steps_done"] == 2
    assert manifest["num_processes"] == 2 and manifest["effective_batch_size"] == 2
    # One voice: the main process prints, once
    assert done.stdout.count("effective batch 2 = 2 processes x batch_size 1 x gradient_accumulation_steps 1") == 1
    assert done.stdout.count("training summary") == 1
    # Exactly the files one process leaves (and no lock)
    single = make_project({"train": {"steps": 2, "save_every": 1}}, dirname="single")
    train(single, console=Console(file=io.StringIO()))
    assert files_under(out) == files_under(single / "out")
    # The checkpoint holds each process's own generator state
    ckpt = load_checkpoint(out / "checkpoint")
    assert ckpt.num_processes == 2
    assert [torch.equal(ckpt.rng[r]["data"], data_state_after(root, r, 2)) for r in (0, 1)] == [True, True]

    # accelerate launch: resume to more steps, then SIGINT to the launcher
    log = tmp_path / "resume.log"
    launcher = start(accelerate_launch(PALPCOMPOSE, "train", root, "--resume", "--steps", 10_000), launch_env, log)
    wait_until_training(root, launcher, after_step=2)
    launcher.send_signal(signal.SIGINT)
    code = launcher.wait(timeout=HANG_GUARD_S)
    text = log.read_text()
    assert code == 130, text  # accelerate launch passes the interrupt on as 130 (bare torchrun exits 1)
    assert text.count("resuming at step 2 of 10000") == 1 and text.count("interrupted at step") == 1, text
    manifest = json.loads((out / "manifest.json").read_text())
    ckpt = load_checkpoint(out / "checkpoint")
    assert manifest["status"] == "interrupted" and manifest["steps_done"] == ckpt.step > 2
    assert f"interrupted at step {ckpt.step} of 10000" in text
    assert "Resume with: torchrun --nproc_per_node 2 $(which palpcompose) train" in text
    logged = [json.loads(line)["step"] for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    assert logged == list(range(1, ckpt.step + 1))
    # Every process stopped after the same step and continued its own draws (restored from its own state)
    assert [torch.equal(ckpt.rng[r]["data"], data_state_after(root, r, ckpt.step)) for r in (0, 1)] == [True, True]
    assert not (out / "train.lock").exists()

    # One process cannot continue a run of two (other effective batch, other draws): exit 2, nothing written
    before = (out / "manifest.json").read_text()
    with pytest.raises(UserError,
                       match=r"written by a run of 2 processes, this one has 1.*torchrun --nproc_per_node 2"):
        train(root, resume=True, console=Console(file=io.StringIO()))
    assert (out / "manifest.json").read_text() == before


def test_averaged_update_of_two_processes_equals_one_process_on_both_samples(make_project, launch_env, tmp_path):
    from distributed_step import one_step

    root = make_project({"train": {"max_grad_norm": 1.0}})
    two = run(torchrun(Path(__file__).parent / "distributed_step.py", root, tmp_path / "two.safetensors"), launch_env)
    assert two.returncode == 0, two.stdout + two.stderr
    one_step(root, tmp_path / "one.safetensors")  # this process alone, both samples in one batch
    one, two = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-6
    # The step moved both kinds of weights: the placeholder rows took part in the average, not only the LoRA
    for kind in ("lora", "rows"):
        moved = max((one[f"after.{k[7:]}"] - one[k]).abs().max().item() for k in one if k.startswith(f"before.{kind}."))
        assert moved > 1e-5, kind
    # The last optimizer group is the placeholder rows': its averaged gradient is not zero
    assert one[f"exp_avg.{max(int(k.split('.')[1]) for k in one if k.startswith('exp_avg.'))}"].abs().max() > 0


def test_a_process_that_dies_stops_the_others_and_leaves_no_lock(make_project, launch_env, tmp_path):
    if not Path("/proc/self/environ").is_file():
        pytest.skip("finds the launcher's processes through /proc")
    root = make_project({"train": {"steps": 10_000, "save_every": 1}})
    log = tmp_path / "launch.log"
    launcher = start(torchrun(PALPCOMPOSE, "train", root), launch_env, log)
    wait_until_training(root, launcher, after_step=1)
    rank1 = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if _environ(pid).get("RANK") == "1"
             and _environ(pid).get("TORCHELASTIC_RUN_ID") and str(root) in _cmdline(pid)]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGKILL)
    code = launcher.wait(timeout=HANG_GUARD_S)  # rank 0 stops on its next collective, not at a timeout
    text = log.read_text()
    assert code != 0
    assert "another process of this run is gone" in text and "the last checkpoint is at step" in text, text
    assert "Resume with: torchrun --nproc_per_node 2" in text, text
    assert not (root / "out" / "train.lock").exists()
    assert json.loads((root / "out" / "manifest.json").read_text())["status"] == "failed"


def _environ(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------------------------
# In this process: no launcher needed


def test_data_seeds_per_rank_keep_rank_0_and_never_replay_another_seed():
    assert distributed.data_seed(7, 0) == 7  # one process draws what it always drew
    seeds = {distributed.data_seed(seed, rank) for seed in range(4) for rank in range(1, 4)}
    assert len(seeds) == 12 and min(seeds) >= 2**32  # above every valid train.seed: seed + rank would collide


@pytest.mark.parametrize("rank", ["0", "1"])
def test_render_export_eval_refuse_a_multi_process_launcher(make_project, run_cli, monkeypatch, rank):
    root = make_project()
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for command in (["render", root], ["eval", root], ["export", root, "--format", "webui", "--out", root / "x"]):
        result = run_cli(*command)
        assert result.code == 2
        # said once, by rank 0; the other ranks only exit
        assert ("runs as one process" in result.err) == (rank == "0") and "Traceback" not in result.err
    assert not (root / "out").exists() and not (root / "x").exists()


def _to_single_process_format(folder: Path) -> None:
    """Rewrite a checkpoint as palpcompose wrote it before several processes: rng keys without rank, one python
    state, no num_processes."""
    from safetensors.torch import save_file

    rng = load_file(str(folder / "rng.safetensors"))
    save_file({k.split(".", 1)[1]: v for k, v in rng.items() if k.startswith("0.")}, str(folder / "rng.safetensors"))
    state = json.loads((folder / "state.json").read_text())
    state["python_rng"], state["cuda_rng_devices"] = state["python_rng"][0], state["cuda_rng_devices"][0]
    del state["num_processes"]
    (folder / "state.json").write_text(json.dumps(state))


def test_a_checkpoint_from_before_several_processes_resumes_and_a_damaged_one_exits_2(make_project, run_cli):
    quiet = Console(file=io.StringIO())
    straight = make_project({"train": {"steps": 3}}, dirname="straight")
    train(straight, console=quiet)
    old = make_project({"train": {"steps": 3}}, dirname="old")
    train(old, steps=2, console=quiet)
    _to_single_process_format(old / "out" / "checkpoint")
    assert train(old, resume=True, console=quiet).steps_done == 3
    for name in ("lora", "embeddings"):
        a, b = (load_file(str(r / "out" / "weights" / "final" / f"{name}.safetensors")) for r in (straight, old))
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    # a damaged checkpoint: a clear message and exit 2, not a KeyError
    (old / "out" / "checkpoint" / "rng.safetensors").write_bytes(b"")
    result = run_cli("train", old, "--resume", "--steps", 4)
    assert result.code == 2 and "rng.safetensors" in result.err and "is damaged" in result.err
    assert "Traceback" not in result.err
