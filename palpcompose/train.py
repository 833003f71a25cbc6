"""`palpcompose train`: PALP personalization (arXiv:2401.06105) of a text-to-image model on a project's subjects.

`train()` reads like the paper's Fig. 4 loop, top to bottom: plan (run.make_plan: every check, nothing written) ->
lock (run.TrainingLock) -> setup (load and freeze the base model, add tokens and LoRA, cache latents and frozen prompt
embeddings, restore a checkpoint) -> loop (sample, `training_step`, log, preview, snapshot + checkpoint) -> finish
(final weights, summary). Everything written to out/ goes through run.RunRecord.

The parts live beside it, one job each: step.py (the state and `training_step`, docs/method.md "One training
step"), tokens.py (the learned tokens), previews.py (preview grids, the loss plot), progress.py (the progress line
and the summary). Their public names are re-exported here.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from palpcompose import __version__, distributed, models, trackers
from palpcompose.checkpoint import Checkpoint, restore_rng_state, rng_state
from palpcompose.data import SubjectData, encode_references, sample_batch
from palpcompose.encoder_offload import offload_idle_modules
from palpcompose.errors import Interrupted, ProjectError, UserError, command_line
from palpcompose.flow_step import prepare_flow_state
from palpcompose.guidance import NonFiniteError, guidance_config
from palpcompose.memory import OutOfMemory, estimate_training_memory, out_of_memory_message
from palpcompose.outputs import checkpoint_dir, lock_path, logs_dir
from palpcompose.previews import (
    PREVIEW_MAX_STEPS,
    PREVIEW_SEEDS,
    PREVIEW_TILE,
    plot_losses,
    preview_prompts,
    preview_shapes,
    render_preview,
)
from palpcompose.progress import TrainingProgress, print_summary
from palpcompose.project import caption_length_problems, config_prompts, load_project, too_long_problems
from palpcompose.run import Plan, RunRecord, TrainingLock, git_state, make_plan, now
from palpcompose.step import (
    EMBEDDING_WEIGHT_DECAY,
    LORA_WEIGHT_DECAY,
    TrainState,
    adapters,
    gradient_norms,
    make_denoiser,
    offload_vae,
    prepare_state,
    training_step,
    vae_on_device,
)
from palpcompose.tokens import PlaceholderEmbedding, add_trained_tokens, train_placeholder_rows
from palpcompose.weights import TrainedWeights

__all__ = [  # what callers import from here; the step, tokens, previews and progress are re-exported
    "EMBEDDING_WEIGHT_DECAY", "LORA_WEIGHT_DECAY", "PREVIEW_MAX_STEPS", "PREVIEW_SEEDS", "PREVIEW_TILE",
    "PlaceholderEmbedding", "TrainResult", "TrainState", "TrainingProgress", "adapters", "add_trained_tokens",
    "finish", "gradient_norms", "load_base_model", "loop", "make_checkpoint", "make_denoiser", "new_manifest",
    "offload_vae", "plot_losses", "prepare_state", "prepare_subjects", "preview_prompts", "render_preview",
    "restore_checkpoint", "sample_batch", "setup", "train", "train_placeholder_rows", "trained_weights",
    "training_step", "vae_on_device",
]


@dataclass
class TrainResult:
    status: str  # "completed" | "up_to_date"
    steps_done: int
    out_dir: Path
    weights_dir: Path
    wall_time_s: float = 0.0
    final_losses: dict[str, float] = field(default_factory=dict)


def train(project, *, steps: int | None = None, resume: bool = False, guidance: str | None = None,
          force: bool = False, console: Console | None = None) -> TrainResult:
    """Train the project's subjects. `project` is a Project or a project folder. See docs/training.md.

    Under a launcher of N processes (torchrun, accelerate launch) every process runs this; the main one plans,
    takes the lock, prints and writes, the others train their share of each batch and write nothing."""
    t0 = time.monotonic()
    if not hasattr(project, "config"):
        project = load_project(project)
    mixed_precision, precision_notice = _choose_mixed_precision(project.config.train.mixed_precision)
    accelerator = distributed.make_accelerator(mixed_precision, project.config.train.gradient_accumulation_steps)
    main = accelerator.is_main_process
    console = (console or Console()) if main else Console(quiet=True)  # one voice: the main process's
    # Writes nothing; on the main process only, whose plan every process follows
    plan = distributed.decided_by_main(accelerator, lambda: make_plan(project, steps=steps, resume=resume,
                                                                      guidance=guidance, force=force))
    if plan.up_to_date:
        console.print(f"weights are up to date ({plan.final_dir}); use --force to retrain")
        return TrainResult("up_to_date", plan.previous.get("steps_done", 0), plan.out, plan.final_dir)
    try:
        components = load_base_model(plan)  # the last checks: still nothing written
    except UserError as exc:
        exc.quiet = not main  # the same files, the same error on every process: said once
        raise
    if plan.notice:  # before anything is moved
        console.print(plan.notice, highlight=False, markup=False, soft_wrap=True)
    record = RunRecord(plan.out, new_manifest(plan, accelerator), writer=main)
    memory: dict = {}  # the estimate printed before training, for an out-of-memory message
    with _held_by_main(TrainingLock(lock_path(plan.out)), accelerator), _stop_requests() as stop:
        tracker = None  # train.log_with's TensorBoard or W&B run, on the main process only
        try:
            state, subjects, generator = setup(plan, record, components, accelerator, console,
                                               [precision_notice], memory)
            tracker = open_tracker(plan, record)
            losses = loop(plan, record, state, subjects, generator, stop, console, t0, tracker)
            return finish(plan, record, state, generator, losses, console, t0)
        except torch.OutOfMemoryError:
            record.mark(status="failed", finished_at=now())
            raise OutOfMemory(out_of_memory_message(
                plan.config, mixed_precision, record.manifest["device"], record.step, record.checkpoint_step,
                checkpoint_dir(plan.out), memory.get("estimate"))) from None
        except KeyboardInterrupt:  # a second Ctrl-C (the first one stops after the step): at once, no new checkpoint
            raise _stopped_at_once(plan, record) from None
        except BaseException as exc:
            if record.manifest["status"] == "running":
                record.mark(status="failed", finished_at=now())
            if distributed.lost_peer(accelerator, exc):
                raise _lost_peer(plan, record, exc) from exc
            raise
        finally:
            if tracker is not None:
                tracker.finish()


def setup(plan: Plan, record: RunRecord, components: models.Components, accelerator, console: Console,
          notices: list[str], memory: dict) -> tuple[TrainState, list[SubjectData], torch.Generator]:
    """Model, optimizer, cached latents and prompts, the data generator; the checkpoint restored on a resume. Ends
    by starting the run's record (the first write of a fresh run)."""
    config, tokens = plan.config, record.manifest["tokens"]
    notices = [*notices, models.set_attention(components.unet, config.train.attention, accelerator.device.type)]
    for notice in notices:
        if notice:
            console.print(notice)
    prepare = prepare_flow_state if components.flow else prepare_state  # a flow family's own setup (flow_step.py)
    state = prepare(config, components, accelerator, guidance_config(config), tokens)  # config: plan.mode in it
    if accelerator.device.type == "cuda":
        memory["estimate"] = estimate = estimate_training_memory(
            components.unet, components.vae, components.text_encoder,
            state.lora_params + [state.token_embedding.rows], resolution=config.train.resolution,
            batch_size=config.train.batch_size, half_precision=state.weight_dtype != torch.float32,
            gradient_checkpointing=config.train.recomputes_activations,
            vae_on_device=not (config.train.low_memory or components.flow))
        total = torch.cuda.get_device_properties(accelerator.device).total_memory / 2**30
        console.print(f"{estimate.describe()}; this GPU has {total:.1f} GiB" if estimate else
                      f"no memory estimate for this model's transformer (docs/flow-memory.md has the published "
                      f"models' tables); this GPU has {total:.1f} GiB")
    subjects = prepare_subjects(plan.project, config, state, tokens)
    if components.flow:  # the VAE, and the encoders without a learned token once they have encoded the run's prompts
        for key in offload_idle_modules(state, config, tokens, subjects):
            console.print(f"{key}: holds no learned token (train.t5_tokens = false): the run's prompts are encoded "
                          "once and it waits in host memory")
    elif config.train.low_memory:
        offload_vae(state)  # the latents are cached: the step never uses the VAE again
    # This process's own draws: subjects, images, flips, timesteps, noise (rank 0: train.seed itself)
    generator = torch.Generator("cpu").manual_seed(distributed.data_seed(config.train.seed, accelerator.process_index))
    console.print(distributed.describe_batch(accelerator.num_processes, config.train.batch_size,
                                             config.train.gradient_accumulation_steps))
    resumed_step = None
    if plan.resume_from is not None:  # read by the main process's plan: the same on every process
        ckpt = plan.checkpoint
        restore_checkpoint(state, ckpt, tokens, generator)
        resumed_step = ckpt.step
        console.print(f"resuming at step {resumed_step} of {plan.steps_target}")
    record.begin(resumed_step, plan.archive)
    return state, subjects, generator


def loop(plan: Plan, record: RunRecord, state: TrainState, subjects: list[SubjectData], generator, stop: dict,
         console: Console, t0: float, tracker: trackers.Tracker | None = None) -> dict[str, float]:
    """sample -> step -> log -> preview -> snapshot + checkpoint, to plan.steps_target. Returns the last losses.
    `tracker` (train.log_with) gets each logged step and each preview grid as well."""
    config, tokens, target = plan.config, record.manifest["tokens"], plan.steps_target

    def save_checkpoint(status: str) -> None:
        ckpt = make_checkpoint(state, config, tokens, record.step, generator, plan.settings)
        record.checkpoint(ckpt, status, time.monotonic() - t0)

    losses: dict[str, float] = {}
    with TrainingProgress(console, target, record.step) as progress:
        while record.step < target:
            for _ in range(config.train.gradient_accumulation_steps):
                batch = sample_batch(subjects, generator, config.train.batch_size,
                                     state.components.noise_scheduler.config.num_train_timesteps)
                try:
                    losses = training_step(state, batch)
                except NonFiniteError as exc:
                    record.mark(status="failed", steps_done=record.step, finished_at=now(),
                                wall_time_s=record.wall_time(time.monotonic() - t0))
                    kept = (f"the last good snapshot is {record.last_snapshot}" if record.last_snapshot
                            else "no snapshot yet")
                    raise NonFiniteError(f"stopped at step {record.step + 1}: {exc}. {kept}; the last checkpoint in "
                                         f"{checkpoint_dir(plan.out)} is untouched") from None
            losses = distributed.mean(state.accelerator, losses)
            record.step += 1
            step = record.step
            record.log.append({"step": step, **{k: round(v, 6) for k, v in losses.items()},
                               "lr": state.optimizer.param_groups[0]["lr"], "time_s": round(time.monotonic() - t0, 3)})
            progress.update(step, losses)
            if tracker is not None:
                tracker.log_step(step, tracked_values(losses, state.optimizer))
            if record.writer and config.train.preview_every and step % config.train.preview_every == 0:
                preview = render_preview(state, config, tokens, step, record, preview_shapes(subjects))  # main only
                if tracker is not None:
                    tracker.log_image_file("preview", preview, step)
            if config.train.save_every and step % config.train.save_every == 0 and step < target:
                record.snapshot(step, trained_weights(state, config, tokens, step))
                save_checkpoint("running")
            # Every process stops after the same step: a signal to any one of them stops them all
            if distributed.any_process(state.accelerator, stop.get("signal") is not None) and step < target:
                save_checkpoint("interrupted")
                distributed.barrier(state.accelerator)  # the checkpoint is on disk before any process exits
                raise Interrupted(f"interrupted at step {step} of {target}; a checkpoint was written. Resume with: "
                                  f"{plan.resume_command}", quiet=not record.writer)
    return losses


def finish(plan: Plan, record: RunRecord, state: TrainState, generator, losses: dict[str, float],
           console: Console, t0: float) -> TrainResult:
    """Final weights (and the snapshot of the last step), checkpoint, log, plot, manifest, summary."""
    config, tokens, step = plan.config, record.manifest["tokens"], record.step
    final = trained_weights(state, config, tokens, step)
    final_dir = record.final(final)
    if config.train.save_every:
        record.snapshot(step, final)
    record.manifest["finished_at"] = now()
    ckpt = make_checkpoint(state, config, tokens, step, generator, plan.settings)
    record.checkpoint(ckpt, "completed", time.monotonic() - t0)
    record.plot(plot_losses)
    distributed.barrier(state.accelerator)  # done when the main process has written everything
    result = TrainResult("completed", step, plan.out, final_dir, record.manifest["wall_time_s"], dict(losses))
    print_summary(console, result, record.log, plan.mode)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Setup's and the loop's parts

@contextlib.contextmanager
def _held_by_main(lock: TrainingLock, accelerator):
    """The training lock, taken and released by the main process; the others learn whether it was taken."""
    distributed.decided_by_main(accelerator, lock.acquire)
    try:
        yield
    finally:
        if accelerator.is_main_process:
            lock.release()


LEARNING_RATE_GROUPS = ("lora", "embedding")  # prepare_state's optimizer groups, in order


def open_tracker(plan: Plan, record: RunRecord) -> trackers.Tracker | None:
    """train.log_with's tracker, writing under out/logs/ (the main process's; None on the others and for "none").
    Its run is named after the run's start (a resumed run keeps it) and guidance; the resolved settings are its
    hyperparameters."""
    if not record.writer:
        return None
    name = f"{str(record.manifest['started_at']).split('+')[0].replace(':', '-')}-{plan.mode}"
    return trackers.open_tracker(plan.config.train.log_with, logs_dir(plan.out), name, record.manifest["config"],
                                 project=plan.config.project.name)


def tracked_values(losses: dict[str, float], optimizer) -> dict[str, float]:
    """One step's values for a tracker: `loss/<term>`, `grad_norm/<term>` (the gradient balance) and `lr/<group>`."""
    values = {(f"grad_norm/{k}" if k.startswith("grad_") else f"loss/{k}"): v for k, v in losses.items()}
    for name, group in zip(LEARNING_RATE_GROUPS, optimizer.param_groups):
        values[f"lr/{name}"] = group["lr"]
    return values


def load_base_model(plan: Plan) -> models.Components:
    """The base model's components; refuses prompts the text encoder would cut off (as `check` says)."""
    config = plan.config
    try:
        components = models.load_components(plan.source)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"project.base_model: {config.project.base_model!r} could not be loaded "
                        f"({type(exc).__name__}: {exc}); point it at a diffusers folder, a .safetensors file, "
                        "a cached hub id or builtin:toy") from exc
    too_long = too_long_problems(plan.project.file, components.tokenizer, config_prompts(config))
    too_long += caption_length_problems(components.tokenizer, plan.project)
    if too_long:
        raise ProjectError(too_long)
    return components


def new_manifest(plan: Plan, accelerator) -> dict:
    """This run's out/manifest.json as it starts (RunRecord.begin writes it)."""
    config = plan.config
    return {
        "palpcompose_version": __version__, "status": "running",
        "base_model": {"spec": plan.source.spec, "kind": plan.source.kind, "identity": plan.identity,
                       "family": plan.source.family},
        "config": config.to_dict(), "config_hash": config.hash(), "training_hash": config.training_hash(),
        "palp_toml": plan.file_hashes, "images": plan.images,
        "tokens": models.placeholder_tokens(config.project.name, config.subjects), "git": git_state(plan.project.root),
        # the defaults the base model chose for keys palp.toml leaves out (project.resolve_model_defaults)
        "model_defaults": {key: value for key, (value, _) in getattr(plan.project, "model_defaults", {}).items()},
        "steps_done": 0, "steps_target": plan.steps_target, "guidance": plan.mode, "wall_time_s": 0.0,
        "device": _device_name(accelerator.device), "started_at": now(), "finished_at": None,
        "num_processes": accelerator.num_processes,
        "effective_batch_size": distributed.effective_batch(accelerator.num_processes, config.train.batch_size,
                                                            config.train.gradient_accumulation_steps),
    }


def prepare_subjects(project, config, state: TrainState, tokens: dict[str, str]) -> list[SubjectData]:
    """Encode every reference once (cached latent distributions, at its aspect-ratio bucket) and tokenize each
    subject's y_P, and each image's caption when it has one (project.captions)."""
    c = state.components
    alignment = models.bucket_alignment(c.unet.config, c.vae.config)
    subjects = []
    for key, subject in config.subjects.items():
        paths = list(project.images[key])

        def ids(prompt: str) -> torch.Tensor:
            return c.tokenize([models.expand_placeholders(prompt, tokens)])[0]

        refs = encode_references(c.vae, paths, config.train.resolution, bool(subject.flip),
                                 state.accelerator.device, c.vae.dtype, alignment=alignment,
                                 bucketed=config.train.buckets)
        captions = getattr(project, "captions", {}) if config.train.captions else {}
        image_ids = [ids(captions.get(p, subject.prompt)) for p in paths] if any(p in captions for p in paths) \
            else None
        subjects.append(SubjectData(key, ids(subject.prompt), refs.means, refs.stds, len(paths), bool(subject.flip),
                                    image_ids, refs.size_ids))
    return subjects

def trained_weights(state: TrainState, config, tokens: dict[str, str], step: int) -> TrainedWeights:
    unet = state.accelerator.unwrap_model(state.unet)
    return TrainedWeights(
        lora=models.lora_state_dict(unet),
        embeddings={tokens[k]: row.detach().float().cpu().clone()
                    for k, row in zip(state.token_ids, state.token_embedding.rows)},
        placeholders=dict(tokens), rank=config.train.lora_rank,
        lora_alpha=float(config.train.lora_alpha),
        target_modules=list(state.components.lora_targets), base_model=config.project.base_model, step=step,
        guidance=config.palp.guidance,  # the run's mode (train() puts --guidance into config)
        adapter=config.train.adapter,
        text_encoder_dims=tuple(enc.get_input_embeddings().table.weight.shape[1]
                                for enc in state.components.text_encoders) if state.components.tokenizer_2 else (),
        encoder_keys=state.components.encoder_keys,  # flow families: "clip_l", "clip_g", "t5" of each part
    )


def make_checkpoint(state: TrainState, config, tokens, step: int, generator, settings: dict) -> Checkpoint:
    """The training state at `step`. Collective: every process calls it (each one's RNG states are gathered);
    weights and optimizer state are the same on all of them."""
    return Checkpoint(
        step=step, weights=trained_weights(state, config, tokens, step), optimizer=state.optimizer.state_dict(),
        lr_scheduler=state.lr_scheduler.state_dict(), rng=distributed.gather(state.accelerator, rng_state(generator)),
        settings=settings,
    )


def restore_checkpoint(state: TrainState, ckpt: Checkpoint, tokens: dict[str, str], generator) -> None:
    unet = state.accelerator.unwrap_model(state.unet)
    models.load_lora_state_dict(unet, {k: v.to(state.accelerator.device) for k, v in ckpt.weights.lora.items()})
    rows = state.token_embedding.rows
    with torch.no_grad():
        for i, key in enumerate(state.token_ids):
            rows[i] = ckpt.weights.embeddings[tokens[key]].to(rows.device)
    state.optimizer.load_state_dict(ckpt.optimizer)
    state.lr_scheduler.load_state_dict(ckpt.lr_scheduler)
    restore_rng_state(ckpt.rng[state.accelerator.process_index], generator)



def _stopped_at_once(plan: Plan, record: RunRecord) -> Interrupted:
    """The message of a second Ctrl-C: what was kept, and the command to continue."""
    target = plan.steps_target
    if not record.ours:  # still setting up: nothing of the previous run was touched
        again = plan.resume_command if plan.resume_from else plan.fresh_command
        return Interrupted(f"interrupted before training started; nothing was changed. Run again with: {again}")
    record.mark(status="interrupted", steps_done=record.checkpoint_step or 0, finished_at=now())
    if record.checkpoint_step is None:
        return Interrupted(f"stopped at once at step {record.step} of {target} (second interrupt), before the "
                           f"first checkpoint; run `{command_line('palpcompose', 'train', plan.project.root)}` again")
    return Interrupted(f"stopped at once at step {record.step} of {target} (second interrupt); the last checkpoint "
                       f"is at step {record.checkpoint_step}. Resume with: {plan.resume_command}")


def _lost_peer(plan: Plan, record: RunRecord, exc: BaseException) -> distributed.ProcessLost:
    """The message when another process of the run is gone: every process stops, the checkpoint is kept."""
    detail = " ".join(str(exc).split())[:160]  # gloo's message spans lines
    kept = (f"the last checkpoint is at step {record.checkpoint_step}. Resume with: {plan.resume_command}"
            if record.checkpoint_step is not None else f"there was no checkpoint yet; run again with: "
            f"{plan.fresh_command}")
    return distributed.ProcessLost(
        f"stopped at step {record.step} of {plan.steps_target}: another process of this run is gone (the "
        f"launcher's log says which, and why); {kept}. ({type(exc).__name__}: {detail})")


@contextlib.contextmanager
def _stop_requests():
    """SIGINT/SIGTERM ask the loop to stop after the current step (the dict gets "signal"); a second Ctrl-C
    stops at once (KeyboardInterrupt). The earlier handlers come back on exit."""
    stop: dict = {}
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.get("signal") is not None:
            raise KeyboardInterrupt
        stop["signal"] = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _choose_mixed_precision(requested: str) -> tuple[str, str]:
    """bf16/fp16 on accelerators; fp32 on the CPU (CPU autocast is slow, and fp32 keeps runs bit-reproducible)."""
    if requested != "no" and not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        return "no", f"mixed_precision: {requested} -> no (CPU: training runs in fp32)"
    return requested, ""


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)

