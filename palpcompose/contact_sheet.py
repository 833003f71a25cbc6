"""A render's contact sheet: every image of the render in one labelled grid (render.py saves it as
contact-sheet.png in the render folder)."""

from __future__ import annotations


def contact_sheet(images: list, prompts, seeds, model_captions: dict[str, str], min_cell: int = 128):
    """One labelled grid of `images` (render.RenderedImage: path, prompt, model, seed): a row per (prompt, model), a
    column per seed. Row captions name the model (base, or the weights' step) and the prompt; column captions name
    the seed. Small images are enlarged (nearest neighbour) to stay readable."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    by_key = {(i.prompt, i.model, i.seed): i.path for i in images}
    first = Image.open(images[0].path)
    scale = max(1, -(-min_cell // min(first.size)))  # ceil division
    cell_w, cell_h = first.width * scale, first.height * scale
    label_w, head_h, pad = 240, 24, 4
    rows = [(p_index, prompt, label) for p_index, prompt in enumerate(prompts, 1) for label in model_captions]
    sheet = Image.new(
        "RGB", (label_w + len(seeds) * (cell_w + pad), head_h + len(rows) * (cell_h + pad)), "white"
    )
    draw = ImageDraw.Draw(sheet)
    for col, seed in enumerate(seeds):
        draw.text((label_w + col * (cell_w + pad) + 4, 6), f"seed {seed}", fill="black", font=font)
    for row, (p_index, prompt, label) in enumerate(rows):
        y = head_h + row * (cell_h + pad)
        caption = f"{model_captions[label]}\nprompt {p_index}:\n" + "\n".join(_wrap(prompt, 36)[:6])
        draw.multiline_text((4, y + 4), caption, fill="black", font=font, spacing=2)
        for col, seed in enumerate(seeds):
            with Image.open(by_key[(prompt, label, seed)]) as picture:
                cell = picture.convert("RGB").resize((cell_w, cell_h), Image.NEAREST)
            sheet.paste(cell, (label_w + col * (cell_w + pad), y))
    return sheet


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])
