"""The read-out tool (tools/toyworld/readout.py): a tiny run completes and checkpoints, a resumed run is the
uninterrupted run bit for bit, the encoder never changes, the clean-accuracy guard catches a worse oracle, and the
export and the ceiling take a candidate's decoder and oracle."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from tools.toyworld import readout
from tools.toyworld.__main__ import main as tools_main
from tools.toyworld.checkpoint import load_sharded, save_sharded

TINY = replace(readout.ReadoutConfig(), **readout.SMOKE)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: on the shared 2-core machine two OpenMP threads wait for each other (10x slower measured), and
    the bit-for-bit resume comparison wants the same thread count in every run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A train-base checkpoint folder of the v2 world holding only what the read-out reads: builtin:toy's VAE
    (fp32) and the shipped oracle."""
    from safetensors.torch import load_file

    from palpcompose.models import BUILTIN_MODELS
    from palpcompose.toyworld.oracle import load_oracle

    folder = tmp_path_factory.mktemp("ck")
    toy = BUILTIN_MODELS["builtin:toy"]
    vae = {k: v.float() for k, v in load_file(str(next((toy / "vae").glob("*.safetensors")))).items()}
    save_sharded(folder, "vae", vae)
    save_sharded(folder, "oracle", load_oracle().state_dict())
    scale = json.loads((toy / "vae" / "config.json").read_text())["scaling_factor"]
    (folder / "state.json").write_text(json.dumps({"config": {"color2_choices": ["white", "black"]},
                                                   "scaling_factor": scale, "unet_steps": 0}))
    return folder


@pytest.fixture(scope="module")
def finished(ckpt, tmp_path_factory):
    """One uninterrupted tiny read-out (3 decoder + 3 oracle steps)."""
    out = tmp_path_factory.mktemp("ro") / "full"
    result = readout.run_readout(ckpt, out, minutes=60, cfg=TINY)
    return out, result


def _weights(folder):
    return {**{f"vae.{k}": v for k, v in load_sharded(folder, "vae").items()},
            **{f"oracle.{k}": v for k, v in load_sharded(folder, "oracle").items()}}


def test_a_tiny_run_completes_measures_and_keeps_the_encoder_bit_for_bit(ckpt, finished):
    out, result = finished
    assert result["done"] and result["phase"] == "done"
    state = json.loads((out / "state.json").read_text())
    assert state["decoder_step"] == TINY.decoder_steps and state["oracle_step"] == TINY.oracle_steps
    assert set(state["measurements"]) == {"before", "after_decoder", "after"}
    m = state["measurements"]["after"]
    assert set(m["clean"]) == {"v1", "v2"} and set(m["clean"]["v1"]) == {"cls", "color", "pattern", "color2",
                                                                          "style", "ambiance"}
    assert set(m["b_v2"]["vae_mean"]) == {"photo", "sketch", "pop art", "watercolor"}
    assert set(state["guard"]) == {"passed", "tolerance", "dropped"}
    assert state["b_target"]["after"]["need"] == readout.B_TARGET
    log = [json.loads(line) for line in (out / "readout.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in log} >= {"measure", "decoder", "oracle"}
    source, tuned = load_sharded(ckpt, "vae"), load_sharded(out, "vae")
    encoder = [k for k in source if not readout.is_decoding(k)]
    assert encoder and all(torch.equal(source[k], tuned[k]) for k in encoder)
    assert any(not torch.equal(source[k], tuned[k]) for k in source if readout.is_decoding(k))
    before, after = load_sharded(ckpt, "oracle"), load_sharded(out, "oracle")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_an_interrupted_and_resumed_run_is_the_uninterrupted_run(ckpt, finished, tmp_path, monkeypatch):
    """SIGTERM during the second decoder step (it finishes, the checkpoint is saved), then stopped across the phase
    boundary, then resumed to the end: the same weights and measurements as the uninterrupted run."""
    import os
    import signal

    from palpcompose.errors import Interrupted

    out = tmp_path / "ro"
    real, calls = readout.decoder_loss, []

    def terminated_during_the_second_step(*args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(readout, "decoder_loss", terminated_during_the_second_step)
    with pytest.raises(Interrupted, match="--resume"):
        readout.run_readout(ckpt, out, minutes=60, cfg=TINY)
    monkeypatch.undo()
    state = json.loads((out / "state.json").read_text())
    assert state["phase"] == "decoder" and state["decoder_step"] == 2
    assert state["optim_phase"] == "decoder" and load_sharded(out, "optim")
    second = readout.run_readout(ckpt, out, minutes=60, resume=True, stop_after_steps=2)
    assert (second["decoder_step"], second["oracle_step"]) == (3, 1)
    third = readout.run_readout(ckpt, out, minutes=60, resume=True)
    assert third["done"]
    ours, theirs = _weights(out), _weights(finished[0])
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the measurements are of the same images and weights too
    assert (json.loads((out / "state.json").read_text())["measurements"]
            == json.loads((finished[0] / "state.json").read_text())["measurements"])


def test_the_guard_flags_a_head_that_dropped_beyond_the_tolerance():
    def m(acc):
        return {"clean": {"v1": {"cls": {"all_styles": 0.95}, "color": {"all_styles": acc}},
                          "v2": {"cls": {"all_styles": 0.95}, "color": {"all_styles": 0.97}}}}

    assert readout.guard(m(0.97), m(0.966), 0.005)["passed"]
    failed = readout.guard(m(0.97), m(0.964), 0.005)
    assert not failed["passed"]
    assert failed["dropped"] == [{"world": "v1", "head": "color", "before": 0.97, "after": 0.964}]


def test_a_worse_oracle_fails_the_guard_and_the_export_refuses_it(ckpt, finished, tmp_path, capsys):
    """The tool, fed an oracle that got worse (its colour head zeroed), says so, exits 1, and export refuses it."""
    out = tmp_path / "ro"
    shutil.copytree(finished[0], out)
    oracle = load_sharded(out, "oracle")
    oracle["heads.color.weight"].zero_()
    oracle["heads.color.bias"].zero_()
    save_sharded(out, "oracle", oracle)
    state = json.loads((out / "state.json").read_text())
    state["phase"] = "after"  # the oracle phase ended with this oracle: measure it again
    del state["measurements"]["after"]
    (out / "state.json").write_text(json.dumps(state))
    with pytest.raises(SystemExit) as exc:
        tools_main(["readout", "--ckpt", str(ckpt), "--out", str(out), "--resume"])
    assert exc.value.code == 1
    assert "must not be used" in capsys.readouterr().err
    guard = json.loads((out / "state.json").read_text())["guard"]
    assert not guard["passed"] and {d["head"] for d in guard["dropped"]} == {"color"}
    with pytest.raises(SystemExit) as exc:
        tools_main(["export-base", "--ckpt", str(ckpt), "--dest", str(tmp_path / "cand"), "--readout", str(out)])
    assert exc.value.code == 2 and "must not be used" in capsys.readouterr().err
    assert not (tmp_path / "cand").exists()


def test_export_accepts_a_readout_that_dropped_only_on_another_world_and_records_it(ckpt, finished, tmp_path):
    """The oracle in a model folder is that model's instrument: the guard that matters is on the read-out's own
    world (docs/toyworld.md, "v2c"); a drop on v1 alone is recorded, not refused."""
    out = tmp_path / "ro"
    shutil.copytree(finished[0], out)
    state = json.loads((out / "state.json").read_text())
    assert state["source"]["world"] == "v2"
    drop = {"world": "v1", "head": "pattern", "before": 0.954, "after": 0.948}
    state["guard"] = {"passed": False, "tolerance": 0.005, "dropped": [drop]}
    (out / "state.json").write_text(json.dumps(state))
    dest = tmp_path / "cand"
    tools_main(["export-base", "--ckpt", str(ckpt), "--dest", str(dest), "--readout", str(out)])
    recorded = json.loads((dest / "training.json").read_text())["readout"]
    assert recorded["guard"]["dropped"] == [drop] and recorded["guard_world"] == "v2"
    state["guard"]["dropped"] = [drop, {**drop, "world": "v2"}]  # its own world too: refused
    (out / "state.json").write_text(json.dumps(state))
    with pytest.raises(SystemExit) as exc:
        tools_main(["export-base", "--ckpt", str(ckpt), "--dest", str(tmp_path / "cand2"), "--readout", str(out)])
    assert exc.value.code == 2 and not (tmp_path / "cand2").exists()


def test_bad_folders_are_refused_before_anything_is_written(ckpt, finished, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        tools_main(["readout", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "a")])
    assert exc.value.code == 2 and "state.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # already holds a read-out and no --resume
        tools_main(["readout", "--ckpt", str(ckpt), "--out", str(finished[0])])
    assert exc.value.code == 2 and "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        tools_main(["readout", "--ckpt", str(ckpt), "--out", str(tmp_path / "a"), "--oracle-steps", "0"])
    assert exc.value.code == 2 and "at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # builtin:toy must be told which world to be read on
        tools_main(["readout", "--ckpt", "builtin:toy", "--out", str(tmp_path / "a")])
    assert exc.value.code == 2 and "--world" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # a checkpoint's world is its own
        tools_main(["readout", "--ckpt", str(ckpt), "--out", str(tmp_path / "a"), "--world", "v2b"])
    assert exc.value.code == 2 and "trained on world v2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # a resumed read-out keeps its recorded sizes
        tools_main(["readout", "--ckpt", str(ckpt), "--out", str(finished[0]), "--resume", "--oracle-steps", "9"])
    assert exc.value.code == 2 and "recorded" in capsys.readouterr().err
    v1 = tmp_path / "v1ck"
    shutil.copytree(ckpt, v1)
    (v1 / "state.json").write_text(json.dumps({"config": {}, "scaling_factor": 1.0}))
    with pytest.raises(SystemExit) as exc:
        tools_main(["readout", "--ckpt", str(v1), "--out", str(tmp_path / "b")])
    assert exc.value.code == 2 and "v1's" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_export_takes_the_readouts_decoder_and_oracle_and_the_ceiling_reads_with_it(ckpt, finished, tmp_path,
                                                                                     capsys):
    from safetensors.torch import load_file

    from palpcompose.toyworld.__main__ import main as toyworld_main
    from palpcompose.toyworld.oracle import MODEL_ORACLE_FILE, ORACLE_PATH, model_oracle_path

    shipped = ORACLE_PATH.read_bytes()
    dest = tmp_path / "cand"
    tools_main(["export-base", "--ckpt", str(ckpt), "--dest", str(dest), "--readout", str(finished[0])])
    assert ORACLE_PATH.read_bytes() == shipped  # the product's oracle is never written by a candidate export
    tuned = load_sharded(finished[0], "vae")
    exported = load_file(str(next((dest / "vae").glob("*.safetensors"))))
    assert all(torch.equal(exported[k].float(), tuned[k].half().float()) for k in tuned)  # fp16, decoder included
    oracle = load_file(str(dest / MODEL_ORACLE_FILE))
    tuned_oracle = load_sharded(finished[0], "oracle")
    assert all(torch.equal(oracle[k].float(), tuned_oracle[k].half().float()) for k in tuned_oracle)
    assert json.loads((dest / "training.json").read_text())["readout"]["guard"]["passed"] in (True, False)
    assert model_oracle_path(dest) == dest / MODEL_ORACLE_FILE and model_oracle_path(tmp_path) == ORACLE_PATH
    capsys.readouterr()
    report = tmp_path / "ceiling.json"
    toyworld_main(["ceiling", "--model", str(dest), "--subjects", "1", "--steps", "1", "--old-bar-prompts", "0",
                   "--threads", "1", "--json", str(report)])
    assert f"oracle: {dest / MODEL_ORACLE_FILE}" in capsys.readouterr().out
    assert json.loads(report.read_text())["oracle"] == str(dest / MODEL_ORACLE_FILE)
    with pytest.raises(SystemExit) as exc:
        toyworld_main(["ceiling", "--model", str(dest), "--oracle", str(tmp_path / "none.safetensors")])
    assert exc.value.code == 2 and "--oracle" in capsys.readouterr().err


def test_oracle_accuracy_measures_the_oracle_it_is_given(tmp_path, capsys):
    from palpcompose.fsutil import atomic_save_safetensors
    from palpcompose.toyworld.__main__ import main as toyworld_main
    from palpcompose.toyworld.oracle import load_oracle

    worse = {k: v.half() if v.is_floating_point() else v for k, v in load_oracle().state_dict().items()}
    worse["heads.color.weight"].zero_()
    worse["heads.color.bias"].zero_()
    atomic_save_safetensors(tmp_path / "worse.safetensors", worse)
    reports = []
    for extra in ([], ["--oracle", str(tmp_path / "worse.safetensors")]):
        toyworld_main(["oracle-accuracy", "--images", "60", *extra])
        reports.append(json.loads(capsys.readouterr().out)["accuracy"])
    shipped, zeroed = reports
    assert shipped["color"]["all_styles"] > 0.8 and zeroed["color"]["all_styles"] < 0.5  # every image read "red"
    assert zeroed["cls"] == shipped["cls"] and set(shipped["cls"]) == {"all_styles", "photo", "sketch", "pop art",
                                                                       "watercolor", "pixel art"}
    with pytest.raises(SystemExit) as exc:
        toyworld_main(["oracle-accuracy", "--images", "4", "--oracle", str(tmp_path / "none.safetensors")])
    assert exc.value.code == 2


def test_the_oracle_alone_on_builtin_toy_in_the_v2b_world(tmp_path):
    """--ckpt builtin:toy --world v2b --decoder-steps 0: the decoder is the shipped one bit for bit, only the oracle
    trains, on v1 and v2b renders (v2b's objects drawn at its larger scale), and the v2b held-out set is measured."""
    from palpcompose.toyworld.worlds import WORLDS

    drawn = []
    real = readout.render

    def spy(n, g, w, solid_fraction):
        drawn.append(w.name)
        s, images = real(n, g, w, solid_fraction)
        assert float(s.scale.min()) >= w.object_scale[0] and float(s.scale.max()) <= w.object_scale[1]
        return s, images

    out = tmp_path / "ro"
    cfg = replace(TINY, decoder_steps=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(readout, "render", spy)
        result = readout.run_readout("builtin:toy", out, minutes=60, cfg=cfg, world_name="v2b")
    assert result["done"] and result["decoder_step"] == 0 and result["oracle_step"] == TINY.oracle_steps
    assert set(drawn) == {"v1", "v2b"} and WORLDS["v2b"].object_scale[0] >= WORLDS["v1"].object_scale[1]
    state = json.loads((out / "state.json").read_text())
    assert state["source"]["world"] == "v2b" and state["config"]["world"] == "v2b"
    assert "after_decoder" not in state["measurements"]
    assert set(state["measurements"]["after"]["clean"]) == {"v1", "v2", "v2b"}
    vae_before = readout.load_source("builtin:toy", "v2b")[0].state_dict()
    tuned = load_sharded(out, "vae")
    assert all(torch.equal(tuned[k], v) for k, v in vae_before.items())
    oracle_before = readout.load_source("builtin:toy", "v2b")[1].state_dict()
    assert any(not torch.equal(load_sharded(out, "oracle")[k], v) for k, v in oracle_before.items())


def test_the_oracle_trains_on_equal_parts_of_every_world_it_is_given():
    """--oracle-worlds v1,v2 with a v2b source: each step draws v1, v2 and v2b in equal parts, clean and
    reconstructed (the v2b retry's sixths)."""
    cfg = replace(TINY, oracle_worlds=("v1", "v2"), oracle_batch=12, world="v2b")
    assert readout.oracle_worlds(cfg) == ("v1", "v2", "v2b")
    assert readout.oracle_worlds(replace(TINY, world="v2b")) == ("v1", "v2b")  # step 1's quarters
    drawn = []
    real = readout.render

    def spy(n, g, w, solid_fraction):
        drawn.append((w.name, n))
        return real(n, g, w, solid_fraction)

    vae, oracle, _ = readout.load_source("builtin:toy", "v2b")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(readout, "render", spy)
        loss = readout.oracle_loss(vae, oracle, cfg, torch.Generator().manual_seed(0))
    assert drawn == [("v1", 4), ("v2", 4), ("v2b", 4)] and torch.isfinite(loss)


def test_the_command_line_sets_the_oracles_worlds_batch_and_learning_rate(tmp_path, capsys):
    out = tmp_path / "ro"
    tools_main(["readout", "--ckpt", "builtin:toy", "--world", "v2b", "--smoke", "--decoder-steps", "0",
                "--oracle-worlds", "v1,v2", "--oracle-batch", "12", "--oracle-lr", "1e-4", "--out", str(out)])
    config = json.loads((out / "state.json").read_text())["config"]
    assert config["oracle_worlds"] == ["v1", "v2"] and config["oracle_batch"] == 12 and config["oracle_lr"] == 1e-4
    assert config["world"] == "v2b" and config["decoder_steps"] == 0
    with pytest.raises(SystemExit) as exc:
        tools_main(["readout", "--ckpt", "builtin:toy", "--world", "v2b", "--oracle-lr", "0", "--out",
                    str(tmp_path / "x")])
    assert exc.value.code == 2 and "--oracle-lr" in capsys.readouterr().err
