"""`train.log_with`: TensorBoard (and W&B) through accelerate's trackers; weight-neutral; a missing package is
exit 2."""

from __future__ import annotations

import importlib.util
import io
import json

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from test_eval import oracle, toy_project  # noqa: F401 - fixtures

from palpcompose import trackers
from palpcompose.project import changed_weight_settings, load_project
from palpcompose.train import train

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
needs_tensorboard = pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed "
                                       "(pip install 'palpcompose[tensorboard]'); the event files cannot be read")


def quiet():
    return Console(file=io.StringIO(), width=120)


@pytest.mark.parametrize("log_with", ["tensorboard", "wandb"])
def test_a_missing_tracker_package_is_exit_2_naming_the_pip_extra(make_project, run_cli, monkeypatch, log_with):
    root = make_project({"train": {"log_with": log_with}})
    real = importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name, *a: None if name == log_with
                        else real(name, *a))
    result = run_cli("train", root)
    assert result.code == 2, result.err
    assert f"pip install 'palpcompose[{log_with}]'" in result.err and "train.log_with" in result.err
    assert "Traceback" not in result.err
    assert not (root / "out").exists()  # nothing written


def test_log_with_is_weight_neutral_and_added_later():
    """Switching the tracker never makes weights stale; a manifest written before the key reads as `none`."""
    before = {"train": {"steps": 2, "log_with": "none", "adapter": "lora"}, "palp": {"guidance": "palp"}}
    now = {"train": {"steps": 2, "log_with": "tensorboard", "adapter": "lora"}, "palp": {"guidance": "palp"}}
    assert changed_weight_settings(before, now) == []
    older = {"train": {"steps": 2}, "palp": {"guidance": "palp"}}  # no log_with, no adapter key at all
    assert changed_weight_settings(older, now) == []
    dora = {"train": {"steps": 2, "log_with": "none", "adapter": "dora"}, "palp": {"guidance": "palp"}}
    assert [key for key, _, _ in changed_weight_settings(older, dora)] == ["train.adapter"]


def test_a_non_main_process_opens_no_tracker():
    from palpcompose.run import RunRecord
    from palpcompose.train import open_tracker

    record = RunRecord(out=None, manifest={}, writer=False)
    assert open_tracker(plan=None, record=record) is None


@needs_tensorboard
def test_tensorboard_gets_each_step_s_losses_balance_lrs_and_previews(make_project, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = make_project({"train": {"steps": 2, "preview_every": 1, "log_with": "tensorboard"}})
    train(root, console=quiet())
    events = root / "out" / "logs" / trackers.TENSORBOARD_RUN
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    log = [json.loads(line) for line in (root / "out/logs/train.jsonl").read_text().splitlines()]
    for name in ("loss_pers", "loss_align", "grad_pers", "grad_align"):
        tag = f"grad_norm/{name}" if name.startswith("grad_") else f"loss/{name}"
        assert tag in tags["scalars"], tags
        scalars = acc.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([e[name] for e in log], rel=1e-5, abs=1e-6)
    lrs = acc.Scalars("lr/lora")
    assert [s.value for s in lrs] == pytest.approx([e["lr"] for e in log])
    assert "lr/embedding" in tags["scalars"]
    assert "preview" in tags["images"] and [i.step for i in acc.Images("preview")] == [1, 2]


@needs_tensorboard
def test_a_tracked_run_trains_the_same_weights_and_stays_up_to_date(make_project, one_thread):
    plain = make_project({"train": {"steps": 2}}, dirname="plain")
    tracked = make_project({"train": {"steps": 2, "log_with": "tensorboard"}}, dirname="tracked")
    train(plain, console=quiet())
    train(tracked, console=quiet())
    a = load_file(str(plain / "out/weights/final/lora.safetensors"))
    b = load_file(str(tracked / "out/weights/final/lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    toml = plain / "palp.toml"
    toml.write_text(toml.read_text().replace("[train]\n", "[train]\nlog_with = \"tensorboard\"\n", 1))
    assert load_project(plain).config.train.log_with == "tensorboard"
    assert train(plain, console=quiet()).status == "up_to_date"


@needs_tensorboard
def test_eval_writes_its_table_to_the_run_s_tensorboard(toy_project, oracle):  # noqa: F811 - the fixtures
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from palpcompose.evaluate import OracleScorer, evaluate

    toml = toy_project / "palp.toml"
    toml.write_text(toml.read_text().replace("[train]\n", "[train]\nlog_with = \"tensorboard\"\n", 1))
    project = load_project(toy_project)
    result = evaluate(project, seeds=[0], scorer=OracleScorer(project, oracle))
    acc = EventAccumulator(str(toy_project / "out" / "logs" / trackers.TENSORBOARD_RUN), size_guidance={"tensors": 0})
    acc.Reload()
    assert "eval/text_summary" in acc.Tags()["tensors"], acc.Tags()
    (event,) = acc.Tensors("eval/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert "| weights | step | guidance | images | text_alignment | subject_fidelity | V1 | V2 |" in text
    assert f"| final | 4 | palp | 1 | {result.text_alignment} |" in text


class FakeWandb:
    """A stand-in for the `wandb` package (not installed here, and it must not reach the network anyway): records
    what accelerate's WandBTracker calls."""

    def __init__(self):
        import importlib.machinery
        import os
        import types

        self.module = types.ModuleType("wandb")
        self.module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.inits, self.logs, self.finished, self.config = [], [], [], {}
        fake = self

        class Run:
            def log(self, values, step=None, **kwargs):
                fake.logs.append((step, values))

            def finish(self):
                fake.finished.append(True)

        def init(**kwargs):
            fake.inits.append({**kwargs, "mode": os.environ.get("WANDB_MODE")})
            return Run()

        self.module.init = init
        self.module.config = types.SimpleNamespace(update=lambda values, **kw: fake.config.update(values))
        self.module.Image = lambda image: ("image", image.size)


def test_wandb_runs_offline_under_the_project_with_the_same_values(make_project, monkeypatch, one_thread):
    import sys

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake.module)
    monkeypatch.setenv("WANDB_MODE", "")  # recorded, so that the test leaves the environment as it found it
    monkeypatch.delenv("WANDB_MODE")
    root = make_project({"train": {"steps": 2, "preview_every": 2, "log_with": "wandb"}})
    train(root, console=quiet())
    (init,) = fake.inits
    assert init["mode"] == "offline" and init["dir"] == str(root / "out" / "logs")
    assert init["project"] == load_project(root).config.project.name and init["name"].endswith("-palp")
    assert fake.config["train.log_with"] == "wandb" and fake.finished == [True]
    steps = [(step, values) for step, values in fake.logs if "loss/loss_pers" in values]
    log = [json.loads(line) for line in (root / "out/logs/train.jsonl").read_text().splitlines()]
    assert [s for s, _ in steps] == [1, 2]
    assert [v["loss/loss_pers"] for _, v in steps] == pytest.approx([e["loss_pers"] for e in log], rel=1e-5)
    assert [(s, list(v)) for s, v in fake.logs if "preview" in v] == [(2, ["preview"])]
