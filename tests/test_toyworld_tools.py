"""The base-model tooling (tools/toyworld): training end to end (v1 and v2 recipes), resume, export."""

from __future__ import annotations

import json

import pytest
import torch

from tools.toyworld.__main__ import main as tools_main


@pytest.mark.slow
def test_train_base_smoke_resume_and_export(tmp_path):
    """The whole training script end to end on a CPU with tiny batches: phases, checkpoint, resume, export, load."""
    from palpcompose.models import load_pipeline, resolve_base_model

    ck = tmp_path / "ck"
    tools_main(["train-base", "--out", str(ck), "--device", "cpu", "--minutes", "0.2", "--final-eval", "0",
                "--smoke"])
    state = json.loads((ck / "state.json").read_text())
    assert state["vae_done"] and state["oracle_done"] and state["unet_steps"] >= 1
    steps = state["unet_steps"]
    tools_main(["train-base", "--out", str(ck), "--device", "cpu", "--minutes", "0.1", "--final-eval", "0",
                "--smoke", "--resume", str(ck)])
    assert json.loads((ck / "state.json").read_text())["unet_steps"] > steps
    dest = tmp_path / "toy"
    tools_main(["export-base", "--ckpt", str(ck), "--dest", str(dest), "--oracle", str(tmp_path / "o.safetensors")])
    pipe = load_pipeline(resolve_base_model(str(dest)))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert (tmp_path / "o.safetensors").is_file()


def test_v2_smoke_warm_start_cache_gate_checkpoint_resume_export(tmp_path):
    """v2 recipe with tiny sizes: warm start from builtin:toy (text positions cut to 32), latent cache, periodic
    gate and checkpoints with AdamW's moments, resume going on from them, export with the world recorded."""
    from palpcompose.models import load_pipeline, resolve_base_model
    from palpcompose.toyworld import ceiling
    from tools.toyworld.checkpoint import load_sharded

    ck = tmp_path / "ck"
    tools_main(["train-base", "--out", str(ck), "--recipe", "v2", "--minutes", "0.15", "--final-eval", "0",
                "--smoke", "--threads", "2"])
    state = json.loads((ck / "state.json").read_text())
    assert state["config"]["color2_choices"] == ["white", "black"] and state["config"]["text_tokens"] == 32
    assert state["init_from"]["spec"] == "builtin:toy" and state["cache_chunks"] >= 1 and state["unet_steps"] >= 1
    assert state["gates"] and set(state["gates"][-1]) >= {"described", "class_word", "old_bar", "passed"}
    log = [json.loads(line) for line in (ck / "train.jsonl").read_text().splitlines()]
    assert any(r["phase"] == "gate" for r in log) and any(r["phase"] == "cache" for r in log)
    optim = load_sharded(ck, "optim")
    assert optim and any(k.endswith("exp_avg_sq") for k in optim)
    steps = state["unet_steps"]
    tools_main(["train-base", "--out", str(ck), "--minutes", "0.05", "--final-eval", "0", "--smoke",
                "--resume", str(ck)])
    again = json.loads((ck / "state.json").read_text())
    assert again["unet_steps"] > steps and again["config"]["text_tokens"] == 32  # the recorded recipe went on
    dest = tmp_path / "toy"
    tools_main(["export-base", "--ckpt", str(ck), "--dest", str(dest), "--oracle", str(tmp_path / "o.safetensors")])
    assert ceiling.model_world(dest).color2_choices == ("white", "black")
    pipe = load_pipeline(resolve_base_model(str(dest)))
    assert pipe.tokenizer.model_max_length == 32
    assert pipe.text_encoder.config.max_position_embeddings == 32
    out = pipe("a photo of a red star with white dots", num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 64, 64)


def test_v2b_draws_larger_objects_and_its_gates_read_the_given_oracle(tmp_path, monkeypatch):
    """v2b recipe: every training scene (the latent cache included) is drawn at v2b's object scale, the gates read
    the oracle of --oracle-from (not the shipped one), and the export records the world's scale."""
    from palpcompose.toyworld import ceiling, world
    from palpcompose.toyworld.oracle import load_oracle
    from palpcompose.toyworld.worlds import WORLDS
    from tools.toyworld.checkpoint import digest, load_sharded, save_sharded

    tuned = tmp_path / "readout"
    oracle = {k: v + 0.01 if v.is_floating_point() else v for k, v in load_oracle().state_dict().items()}
    save_sharded(tuned, "oracle", oracle)
    scales = []
    real = world.render

    def spy(scenes, g):  # every picture the training sees (the gates render with the model, not the world)
        scales.append((float(scenes.scale.min()), float(scenes.scale.max())))
        return real(scenes, g)

    monkeypatch.setattr(world, "render", spy)
    ck = tmp_path / "ck"
    tools_main(["train-base", "--out", str(ck), "--recipe", "v2b", "--oracle-from", str(tuned), "--minutes", "0.1",
                "--final-eval", "0", "--smoke", "--threads", "2"])
    state = json.loads((ck / "state.json").read_text())
    assert state["config"]["object_scale"] == list(WORLDS["v2b"].object_scale) and state["cache_chunks"] >= 1
    lo, hi = WORLDS["v2b"].object_scale
    assert scales and all(lo <= a and b <= hi for a, b in scales), scales
    assert state["init_from"]["oracle_sha256"] == digest(oracle) == digest(load_sharded(ck, "oracle"))
    with pytest.raises(SystemExit) as exc:  # a resumed run keeps the oracle it recorded
        tools_main(["train-base", "--out", str(ck), "--resume", str(ck), "--oracle-from", str(tuned)])
    assert exc.value.code == 2
    dest = tmp_path / "toy"
    tools_main(["export-base", "--ckpt", str(ck), "--dest", str(dest), "--oracle", str(tmp_path / "o.safetensors")])
    assert json.loads((dest / "training.json").read_text())["world"]["object_scale"] == [0.5, 0.7]
    assert ceiling.model_world(dest).color2_choices == ("white", "black")


def test_the_v2c_recipe_draws_one_texture_per_pattern_and_the_export_records_it(tmp_path, monkeypatch):
    """v2c (docs/toyworld.md): every training picture has the world's one pattern frequency and angle, more of them
    are patterned than v2b's, and training.json records both ranges; a seed keeps its identity in every world."""
    from palpcompose.toyworld import world
    from palpcompose.toyworld.worlds import WORLDS, world_of

    seen = []
    real = world.render

    def spy(scenes, g):
        seen.append(scenes)
        return real(scenes, g)

    monkeypatch.setattr(world, "render", spy)
    ck = tmp_path / "ck"
    tools_main(["train-base", "--out", str(ck), "--recipe", "v2c", "--minutes", "0.1", "--final-eval", "0",
                "--smoke", "--threads", "2"])
    v2c = WORLDS["v2c"]
    freq = torch.cat([s.pattern_freq for s in seen])
    angle = torch.cat([s.pattern_angle for s in seen])
    assert seen and torch.allclose(freq, torch.full_like(freq, v2c.pattern_freq[0]))
    assert torch.allclose(angle, torch.full_like(angle, v2c.pattern_angle[0]))
    state = json.loads((ck / "state.json").read_text())
    assert state["config"]["solid_fraction"] == 0.2
    dest = tmp_path / "toy"
    tools_main(["export-base", "--ckpt", str(ck), "--dest", str(dest), "--oracle", str(tmp_path / "o.safetensors")])
    recorded = json.loads((dest / "training.json").read_text())["world"]
    assert recorded["pattern_freq"] == [2.2, 2.2] and recorded["pattern_angle"] == [0.3, 0.3]
    assert world_of(recorded["color2_choices"], recorded["object_scale"], recorded["pattern_freq"],
                    recorded["pattern_angle"]) is v2c
    for seed in (0, 1, 1_000_000):
        a, b = WORLDS["v2b"].subject(seed), v2c.subject(seed)
        assert (a.cls, a.color, a.pattern, a.color2) == (b.cls, b.color, b.pattern, b.color2)
        assert (b.pattern_freq, b.pattern_angle) == (2.2, 0.3)
    assert world.subject_from_seed(1) == WORLDS["v1"].subject(1)


def test_warm_start_keeps_the_latent_scale_and_the_text_encoders_first_positions(tmp_path):
    """The warm start keeps v1's latent scale, and cutting the positions to 32 leaves a causal text encoder's output
    for a short prompt unchanged."""
    from palpcompose.models import load_pipeline, resolve_base_model
    from tools.toyworld.recipes import RECIPES
    from tools.toyworld.train_base import Trainer

    trainer = Trainer(tmp_path / "ck", "cpu", RECIPES["v2"], None)
    pipe = load_pipeline(resolve_base_model("builtin:toy"), torch_dtype=torch.float32)
    # the VAE keeps the shipped latent scale (a fresh AutoencoderKL's default would scale latents 3x too small)
    assert trainer.vae.config.scaling_factor == pytest.approx(pipe.vae.config.scaling_factor)
    assert trainer.state["scaling_factor"] == pytest.approx(pipe.vae.config.scaling_factor)
    prompt = "a sketch of a blue heart with black dots at night"
    ids32 = trainer.tokenizer(prompt, padding="max_length", max_length=32, return_tensors="pt").input_ids
    n = int((ids32 != trainer.tokenizer.pad_token_id).sum()) + 1
    with torch.no_grad():
        ours = trainer.text_encoder.eval()(ids32)[0][:, :n]
        ids77 = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        theirs = pipe.text_encoder(ids77)[0][:, :n]
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_the_product_never_imports_the_tooling():
    """tools/ makes builtin:toy; palpcompose/ must run without it (imports inside functions included)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "palpcompose"
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(root)}: {n}" for n in names if n == "tools" or n.startswith("tools.")]
    assert not offenders, offenders


def test_legibility_reads_a_world_with_the_readouts_oracle_and_the_shipped_one(tmp_path, capsys):
    """The v2 instrument's legibility rule (docs/toyworld.md, "v2c"): per identity head and (b) per style, both
    oracles reported; the rule is judged on the read-out's oracle only."""
    from palpcompose.toyworld.oracle import load_oracle
    from tools.toyworld.checkpoint import save_sharded

    worse = {k: v.clone() for k, v in load_oracle().state_dict().items()}
    worse["heads.pattern.weight"].zero_()  # reads every pattern as the same one: the rule must fail
    worse["heads.pattern.bias"].zero_()
    save_sharded(tmp_path / "ro", "oracle", worse)
    report = tmp_path / "leg.json"
    tools_main(["legibility", "--world", "v2c", "--oracle", str(tmp_path / "ro"), "--images", "16",
                "--json", str(report)])
    data = json.loads(report.read_text())
    assert data["world"] == "v2c" and set(data["rule"]["b_by_style"]) == {"photo", "sketch", "pop art", "watercolor"}
    assert data["rule"]["clean_heads"]["pattern"] < 0.95 and not data["rule"]["met"]
    assert data["shipped"]["clean"]["pattern"]["all_styles"] > data["readout"]["clean"]["pattern"]["all_styles"]
    assert "NOT met" in capsys.readouterr().out


def test_v2d_trains_the_text_encoder_at_five_times_the_unets_rate(tmp_path, monkeypatch):
    """RECIPES["v2d"] (docs/toyworld.md): two parameter groups, the text encoder's learning rate 5x the UNet's at
    every step of the schedule; v2c keeps one group at one rate."""
    from tools.toyworld import recipes, train_base

    seen = []

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append([(len(g["params"]), g["lr"]) for g in self.param_groups])
            return super().step(closure)

    monkeypatch.setattr(train_base.torch.optim, "AdamW", Recording)
    tools_main(["train-base", "--out", str(tmp_path / "ck"), "--recipe", "v2d", "--minutes", "0.05",
                "--final-eval", "0", "--smoke", "--threads", "1"])
    unet_steps = [groups for groups in seen if len(groups) == 2]
    assert unet_steps, seen
    for (n_unet, lr_unet), (n_text, lr_text) in unet_steps:
        assert n_unet > n_text > 0 and lr_text == pytest.approx(5 * lr_unet)
    assert recipes.RECIPES["v2c"].text_encoder_lr_mult == 1.0



def test_param_groups_keep_old_layouts_and_put_the_cross_attention_query_and_key_apart():
    """recipes.param_groups: one group (v1-v2c), UNet + text encoder (v2d), and for v2e the cross-attention's
    to_q/to_k (attn2 only, never the self-attention) in a group of their own at 10x."""
    import tempfile
    from dataclasses import replace

    from palpcompose.toyworld import tokenizer as tok_mod
    from tools.toyworld import recipes, train_base

    with tempfile.TemporaryDirectory() as tmp:
        _, te, unet = train_base.build_models(tok_mod.make_tokenizer(tmp, model_max_length=32), 32)
    n_unet, n_te = len(list(unet.parameters())), len(list(te.parameters()))
    one = recipes.param_groups(unet, te, recipes.RECIPES["v2c"])
    assert [len(g["params"]) for g in one] == [n_unet + n_te]
    two = recipes.param_groups(unet, te, recipes.RECIPES["v2d"])
    assert [(len(g["params"]), g["lr_mult"]) for g in two] == [(n_unet, 1.0), (n_te, 5.0)]
    three = recipes.param_groups(unet, te, recipes.RECIPES["v2e"])
    names = {id(p): n for n, p in unet.named_parameters()}
    qk = [names[id(p)] for p in three[1]["params"]]
    blocks = sum(1 for n, _ in unet.named_modules() if n.endswith(".attn2"))
    assert blocks >= 7 and len(qk) == 2 * blocks  # to_q and to_k (no bias) in every transformer block
    assert all(".attn2.to_q." in n or ".attn2.to_k." in n for n in qk)
    assert [g["lr_mult"] for g in three] == [1.0, 10.0, 5.0]
    assert sum(len(g["params"]) for g in three) == n_unet + n_te
    qk_only = recipes.param_groups(unet, te, replace(recipes.RECIPES["v2c"], cross_attn_qk_lr_mult=10.0))
    assert [g["lr_mult"] for g in qk_only] == [1.0, 10.0, 1.0]


def test_a_branch_starts_from_a_checkpoints_weights_with_fresh_moments_and_keeps_its_data(tmp_path, monkeypatch,
                                                                                         capsys):
    """train-base --branch-from (the v2e lever probe): the source's weights, EMA and step count, fresh AdamW
    moments, its cached latents hard-linked, its oracle; the new recipe's rates (v2e: to_q/to_k at 10x);
    --stop-at-step stops there; the branch resumes; a recipe that would change the data is refused with exit 2;
    export-base --raw writes the trained weights, not the EMA."""
    from safetensors.torch import load_file

    from tools.toyworld import recipes, train_base
    from tools.toyworld.checkpoint import load_sharded

    src, br = tmp_path / "src", tmp_path / "br"
    tools_main(["train-base", "--out", str(src), "--recipe", "v2d", "--minutes", "0.05", "--final-eval", "0",
                "--smoke", "--threads", "1"])
    source = json.loads((src / "state.json").read_text())
    steps = source["unet_steps"]
    seen = []

    class Recording(torch.optim.AdamW):
        def load_state_dict(self, sd):
            seen.append(("restored", len(sd["state"])))
            return super().load_state_dict(sd)

        def step(self, closure=None):
            seen.append([g["lr"] for g in self.param_groups])
            return super().step(closure)

    monkeypatch.setattr(train_base.torch.optim, "AdamW", Recording)
    tools_main(["train-base", "--out", str(br), "--recipe", "v2e", "--branch-from", str(src), "--minutes", "5",
                "--stop-at-step", str(steps + 2), "--final-eval", "0", "--smoke", "--threads", "1"])
    state = json.loads((br / "state.json").read_text())
    assert state["unet_steps"] == steps + 2 and state["branched_from"]["unet_steps"] == steps
    assert state["config"]["cross_attn_qk_lr_mult"] == 10.0 and state["config"]["oracle_from"] is None
    assert not [r for r in seen if isinstance(r, tuple)]  # no AdamW moments carried over
    lrs = [r for r in seen if isinstance(r, list)]
    assert len(lrs) == 2 and all(len(r) == 3 and r[1] == pytest.approx(10 * r[0]) for r in lrs)
    chunk = next((src / "cache").glob("chunk-*.safetensors"))
    assert (br / "cache" / chunk.name).stat().st_ino == chunk.stat().st_ino  # hard-linked, not recomputed
    assert not any(r["phase"] == "gate" for r in map(json.loads, (br / "train.jsonl").read_text().splitlines()))
    seen.clear()
    tools_main(["train-base", "--out", str(br), "--resume", str(br), "--minutes", "5", "--stop-at-step",
                str(steps + 3), "--final-eval", "0", "--smoke", "--threads", "1"])
    assert [r for r in seen if isinstance(r, tuple)] and json.loads((br / "state.json").read_text())[
        "unet_steps"] == steps + 3  # the branch's own moments restored on resume
    # a resumed trainer's instruments are in eval mode: a gate reads the oracle with its running statistics and
    # leaves them as they were (in training mode its BatchNorm read each batch's own and rewrote them)
    resumed = train_base.Trainer(br, "cpu", recipes.config_from_state(
        json.loads((br / "state.json").read_text())["config"]), br)
    assert not resumed.oracle.training and not resumed.vae.training
    buffers = {k: v.clone() for k, v in resumed.oracle.state_dict().items()}
    resumed.gate()
    assert all(torch.equal(v, resumed.oracle.state_dict()[k]) for k, v in buffers.items())
    for argv in (["--recipe", "v2b", "--branch-from", str(src), "--out", str(tmp_path / "b2")],  # other objects
                 ["--recipe", "v2e", "--branch-from", str(src), "--out", str(br)],  # a run already there
                 ["--recipe", "v2e", "--branch-from", str(tmp_path / "none"), "--out", str(tmp_path / "b3")]):
        with pytest.raises(SystemExit) as exc:
            tools_main(["train-base", *argv, "--minutes", "0.05", "--final-eval", "0", "--smoke"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--branch-from" in err and "Traceback" not in err
    assert not (tmp_path / "b2").exists() and not (tmp_path / "b3").exists()  # nothing written
    dest = tmp_path / "raw"
    tools_main(["export-base", "--ckpt", str(br), "--dest", str(dest), "--raw", "--oracle",
                str(tmp_path / "o.safetensors")])
    assert json.loads((dest / "training.json").read_text())["weights"] == "raw"
    exported = load_file(str(next((dest / "unet").glob("*.safetensors"))))
    raw, ema = load_sharded(br, "diffusion"), load_sharded(br, "ema")
    key = next(k for k in exported if k.endswith("attn2.to_q.weight"))
    assert torch.equal(exported[key], raw[f"unet.{key}"].half())
    assert not torch.equal(exported[key], ema[f"unet.{key}"].half())

def test_loss_gap_changes_one_word_and_measures_every_band(capsys):
    """tools.toyworld loss-gap (docs/toyworld.md): a changed attribute is another allowed value of that attribute
    only (a pattern never becomes solid, a white second colour becomes black), every timestep band is measured, and
    --positions below the prompts' length is refused."""
    from palpcompose.errors import UserError
    from palpcompose.toyworld import world
    from palpcompose.toyworld.worlds import WORLDS
    from tools.toyworld import loss_gap
    from tools.toyworld.probe import load_toy_pipeline

    g = torch.Generator().manual_seed(0)
    s = WORLDS["v2c"].scenes(64, g, solid_fraction=0.0)
    s = world.Scenes(**{f: getattr(s, f)[s.pattern > 0] for f in s.__dataclass_fields__})
    for attr in loss_gap.ATTRIBUTES:
        changed = loss_gap._swapped(s, attr, g)
        for other in loss_gap.ATTRIBUTES:
            same = torch.equal(getattr(changed, other), getattr(s, other))
            assert same == (other != attr), (attr, other)
    assert bool((loss_gap._swapped(s, "pattern", g).pattern > 0).all())
    white, black = world.COLORS2.index("white"), world.COLORS2.index("black")
    c2 = loss_gap._swapped(s, "color2", g).color2
    assert bool(((s.color2 == white) == (c2 == black)).all())
    pipe = load_toy_pipeline()
    report = loss_gap.loss_gap(pipe, "v2c", scenes=4)
    assert len(report["bands"]) == loss_gap.BANDS and report["positions"] == pipe.tokenizer.model_max_length
    assert all(b["loss_true"] > 0 for b in report["bands"])
    with pytest.raises(UserError, match="--positions 5"):
        loss_gap.loss_gap(pipe, "v2c", scenes=4, positions=5)


def test_loss_gap_and_legibility_refuse_a_wrong_folder_with_exit_2(tmp_path, capsys):
    for argv, words in ((["loss-gap", "--model", str(tmp_path / "none")], "model_index.json"),
                        (["legibility", "--world", "v2c", "--oracle", str(tmp_path)], "oracle-*.safetensors")):
        with pytest.raises(SystemExit) as exc:
            tools_main(argv)
        assert exc.value.code == 2 and words in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_selection_probe_trains_three_pattern_siblings_whose_prompts_differ_in_the_pattern_word(
        tmp_path, monkeypatch, capsys):
    """probe --siblings (docs/toyworld.md, "The selection probe"): a subject's siblings keep everything but the
    pattern; every fine-tuning batch mixes them, each image with its own sibling's prompt; the reading has one row
    per sibling; --siblings with --pattern-freq is refused with exit 2."""
    from palpcompose.toyworld import world
    from palpcompose.toyworld.worlds import WORLDS
    from tools.toyworld import probe

    subject = WORLDS["v2c"].subject(probe.FIRST_SEED)
    sibs = probe.pattern_siblings(subject)
    assert [s.pattern for s in sibs] == [1, 2, 3]
    prompts = [probe.described_prompt(s) for s in sibs]
    assert len(set(prompts)) == 3
    assert {p.replace(world.PATTERN_WORDS[world.PATTERNS[s.pattern]], "X") for p, s in zip(prompts, sibs)} == {
        prompts[0].replace(world.PATTERN_WORDS["stripes"], "X")}
    seen = []
    real_render = probe.world.render

    def recording_render(scenes, g):
        seen.append((len(scenes.pattern), set(scenes.pattern.tolist())))
        return real_render(scenes, g)

    monkeypatch.setattr(probe.world, "render", recording_render)
    pipe = probe.load_toy_pipeline()
    conds = []
    real_unet_forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda x, t, c, **k: conds.append(c) or real_unet_forward(x, t, c, **k))
    probe.fine_tune(pipe, subject, 2, 12, 1e-4, lambda r: None, WORLDS["v2c"], siblings=sibs)
    assert sum(n for n, _ in seen) == 24 and all(len(p) == 1 for _, p in seen)  # one sibling per render call
    assert len({tuple(c[-1, :4].tolist()) for c in conds[0].unbind(0)}) > 1  # several prompts in one batch
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
    first_step = []  # the patterns of the first batch's images, in the order they were rendered
    for n, ps in seen:
        if len(first_step) < 12:
            first_step += [next(iter(ps))] * n
    assert len(first_step) == 12
    for row, pattern in zip(conds[0], first_step):  # each image trained with its own sibling's prompt
        assert torch.allclose(row, states[pattern - 1])
    from tools.toyworld.__main__ import main as tools_main

    with pytest.raises(SystemExit) as exc:
        tools_main(["probe", "--siblings", "--pattern-freq", "1.3,1.7", "--out", str(tmp_path / "p")])
    assert exc.value.code == 2 and "--siblings" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_the_draw_alone_control_fine_tunes_a_fresh_model_per_sibling(tmp_path, monkeypatch, capsys):
    """probe --siblings --alone (docs/toyworld.md, "The draw-alone control"): each sibling gets its own fresh
    builtin:toy and a fine-tune on itself only; the file keeps the same images as the selection probe's;
    --alone without --siblings is refused with exit 2."""
    from safetensors.torch import load_file

    from palpcompose.toyworld.worlds import WORLDS
    from tools.toyworld import probe
    from tools.toyworld.__main__ import main as tools_main

    calls, pipes = [], []
    real_load = probe.load_toy_pipeline

    def counting_load():
        pipes.append(real_load())
        return pipes[-1]

    monkeypatch.setattr(probe, "load_toy_pipeline", counting_load)
    monkeypatch.setattr(probe, "fine_tune", lambda pipe, subject, steps, batch, lr, log, w, siblings=None:
                        calls.append((id(pipe), subject.pattern, siblings)))
    monkeypatch.setattr(probe, "draw_renders", lambda pipe, subject, n: torch.full((n, 3, 8, 8), subject.pattern / 4))
    monkeypatch.setattr(probe, "world_and_reconstructions",
                        lambda pipe, subject, n, w: (torch.zeros(n, 3, 8, 8), torch.zeros(n, 3, 8, 8)))
    subject = WORLDS["v2c"].subject(probe.FIRST_SEED)
    probe.probe_siblings(tmp_path, subject, WORLDS["v2c"], 5, 4, 1e-4, 2, lambda r: None, alone=True)
    assert [(p, s) for _, p, s in calls] == [(1, None), (2, None), (3, None)]  # one sibling each, never together
    assert len({pid for pid, _, _ in calls}) == 3 and len(pipes) == 4  # a fresh model per sibling
    assert not probe.siblings_path(tmp_path, subject.seed).exists()  # never taken for the selection probe's
    saved = load_file(str(probe.siblings_path(tmp_path, subject.seed, alone=True)))
    assert {k.split("-")[0] for k in saved} == {"before", "after", "clean", "vae_bound"}
    assert float(saved["after-3"].mean()) == pytest.approx(0.75)
    with pytest.raises(SystemExit) as exc:
        tools_main(["probe", "--alone", "--out", str(tmp_path / "p")])
    assert exc.value.code == 2 and "--siblings" in capsys.readouterr().err
