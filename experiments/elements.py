"""Which prompt elements each variant keeps, and how often the references' context leaks in: the explanation table
of the PALP study (docs/evaluation.md). Renders, for every cell of an ablation folder made with --rotate, the
snapshot STEP of each variant (and the base model at step 0) with the ablation's seeds and render settings, and
tallies, per variant, the fraction of images whose style / ambiance / class the oracle recognises, the fraction it
reads as the references' ambiance (`--context`), and the four identity heads' agreement with the references.

    python -m experiments.elements out/study/B --context sunset --step 200 --seeds 4 --variants none,palp,sds
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from experiments import ablation


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.elements", description=__doc__.splitlines()[0])
    parser.add_argument("work")
    parser.add_argument("--context", default="day")
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--variants", default="none,palp")
    parser.add_argument("--subjects", default="1,2,4,8,9,10,11,12")
    args = parser.parse_args(argv)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from palpcompose.models import expand_placeholders, placeholder_tokens
    from palpcompose.outputs import out_dir, snapshot_dir
    from palpcompose.project import load_project
    from palpcompose.toyworld import oracle as toy_oracle
    from palpcompose.toyworld import world
    from palpcompose.weights import load_trained_weights

    subjects = ablation._ints(args.subjects)
    s = ablation.Settings(Path(args.work), subjects, 4, args.seeds, args.step, args.step, ("none",), "cpu",
                          context=args.context)
    renderer, oracle = ablation.Renderer(s), toy_oracle.load_oracle()
    heads = toy_oracle.HEADS
    seeds = list(range(args.seeds))
    tally: dict[str, dict[str, list[float]]] = {}
    for k, seed in enumerate(subjects):
        prompt_index = k % 4
        subject = world.subject_from_seed(seed)
        target = ablation.target_prompts(subject.class_name, prompt_index + 1, args.context)[prompt_index][0]
        style, ambiance = ablation.prompt_pairs(args.context)[prompt_index]
        refs = toy_oracle.predict(oracle, ablation.reference_images(seed, args.context))
        identity = {h: int(refs[h].mean(0).argmax()) for h in ("cls", "color", "pattern", "color2")}
        for variant in ["base"] + args.variants.split(","):
            if variant == "base":
                weights, text = None, expand_placeholders(target, {"V1": subject.class_name})
            else:
                run = ablation.run_dir(s, seed, variant, None if variant == "none" else prompt_index)
                if not snapshot_dir(out_dir(run), args.step).is_dir():
                    continue
                project = load_project(run)
                tokens = placeholder_tokens(project.config.project.name, project.config.subjects)
                weights = load_trained_weights(snapshot_dir(out_dir(run), args.step))
                text = expand_placeholders(target, tokens)
            probs = toy_oracle.predict(oracle, renderer.images(weights, [text] * len(seeds), seeds))
            pred = {h: probs[h].argmax(-1) for h in probs}
            t = tally.setdefault(variant, {})
            for name, hit in (
                ("style", pred["style"] == heads["style"].index(style)),
                ("ambiance", pred["ambiance"] == heads["ambiance"].index(ambiance)),
                ("context ambiance", pred["ambiance"] == heads["ambiance"].index(args.context)),
                ("photo style", pred["style"] == heads["style"].index("photo")),
                *((f"identity {h}", pred[h] == v) for h, v in identity.items()),
            ):
                t.setdefault(name, []).extend(hit.float().tolist())
    names = list(next(iter(tally.values())))
    print("| variant | images | " + " | ".join(names) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in names) + " |")
    for variant, t in tally.items():
        n = len(t[names[0]])
        print(f"| {variant} | {n} | " + " | ".join(f"{sum(t[x]) / n:.2f}" for x in names) + " |")


if __name__ == "__main__":
    main()
