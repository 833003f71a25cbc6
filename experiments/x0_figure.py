"""The paper's Fig. 5 diagnostic for an ablation cell: x0-hat from pure noise, base model vs `none` vs `palp`.

x0-hat = (x_T - sqrt(1 - abar_T) * eps_hat) / sqrt(abar_T) at the last training timestep, with classifier-free
guidance on the target prompt (the base model reads the class word in place of [V1]), decoded by the VAE: what the
model "aims at" from the very first denoising step. The paper: the base model aims at the prompt's look (a sketch),
the personalized baseline at its references (their background and colours), PALP at the prompt with the subject.

    python -m experiments.x0_figure WORK --subject 1 --prompt 0 --step 400 --out docs/figures/study-x0.png

Rows: the references, then per model the x0-hat of `--noise-seeds` noises and the final renders of the same seeds
(render settings of the ablation: 20 DPM++ steps, CFG 5). WORK is an ablation folder that has the subject's `none`
run and its `palp` run on that prompt (same settings as the command that made it: pass the same --context).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from experiments import ablation


def x0_hat_images(pipe, prompt: str, seeds: list[int], scale: float) -> list:
    from palpcompose import models
    from palpcompose.guidance import cfg, predict_x0, v_to_eps

    unet, vae = pipe.unet, pipe.vae
    t_last = pipe.scheduler.config.num_train_timesteps - 1
    abar = pipe.scheduler.alphas_cumprod[t_last].float().view(1, 1, 1, 1)
    res = unet.config.sample_size
    with torch.no_grad():
        cond = models.encode_prompt(pipe.text_encoder, models.tokenize(pipe.tokenizer, [prompt]))
        null = models.encode_prompt(pipe.text_encoder, models.tokenize(pipe.tokenizer, [""]))
        images = []
        for seed in seeds:
            x = torch.randn((1, unet.config.in_channels, res, res), generator=torch.Generator().manual_seed(seed))
            t = torch.full((2,), t_last, dtype=torch.long)
            out = unet(torch.cat([x, x]), t, torch.cat([null, cond])).sample.float()
            if pipe.scheduler.config.prediction_type == "v_prediction":
                out = v_to_eps(out, torch.cat([x, x]), abar)
            uncond, cond_out = out.chunk(2)
            x0 = predict_x0(x, cfg(uncond, cond_out, scale), abar)
            image = vae.decode(x0 / vae.config.scaling_factor).sample.float()
            images.append(pipe.image_processor.postprocess(image, output_type="pil")[0])
    return images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.x0_figure", description=__doc__.splitlines()[0])
    parser.add_argument("work")
    parser.add_argument("--subject", type=int, required=True)
    parser.add_argument("--prompt", type=int, default=0, help="target prompt index")
    parser.add_argument("--step", type=int, required=True, help="the snapshot of both runs to show")
    parser.add_argument("--context", default="day")
    parser.add_argument("--noise-seeds", type=int, default=4)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from PIL import Image, ImageDraw

    from palpcompose.models import expand_placeholders, placeholder_tokens
    from palpcompose.outputs import out_dir, snapshot_dir
    from palpcompose.project import load_project
    from palpcompose.toyworld import world
    from palpcompose.weights import load_trained_weights

    s = ablation.Settings(Path(args.work), (args.subject,), 4, args.noise_seeds, args.step, args.step, ("none",),
                          "cpu", context=args.context)
    renderer = ablation.Renderer(s)
    pipe = renderer.pipe
    class_name = world.subject_from_seed(args.subject).class_name
    target = ablation.target_prompts(class_name, args.prompt + 1, args.context)[args.prompt][0]
    seeds = list(range(args.noise_seeds))
    rows = [("references", ablation.reference_images(args.subject, args.context, args.noise_seeds))]
    for label, run in (("base", None), ("none", ablation.run_dir(s, args.subject, "none", None)),
                       ("palp", ablation.run_dir(s, args.subject, "palp", args.prompt))):
        if run is None:
            if getattr(pipe.unet, "peft_config", None):
                pipe.unet.disable_adapters()
            text = expand_placeholders(target, {"V1": class_name})
            weights = None
        else:
            project = load_project(run)
            tokens = placeholder_tokens(project.config.project.name, project.config.subjects)
            weights = load_trained_weights(snapshot_dir(out_dir(run), args.step))
            text = expand_placeholders(target, tokens)
        renders = renderer.images(weights, [text] * len(seeds), seeds)  # attaches the weights (or disables them)
        rows.append((f"{label} x0-hat", x0_hat_images(pipe, text, seeds, s.guidance_scale)))
        rows.append((f"{label} render", renders))
    tile, label_w, head = 96, 110, 24
    sheet = Image.new("RGB", (label_w + tile * len(seeds), head + tile * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), f"{target} (subject {args.subject}, step {args.step}, references: {args.context})",
              fill="black")
    for r, (label, images) in enumerate(rows):
        draw.text((4, head + r * tile + tile // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            sheet.paste(image.resize((tile, tile), Image.Resampling.NEAREST), (label_w + c * tile, head + r * tile))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
