"""`palpcompose report DIR`: one self-contained out/report.html (runs side by side, plots, previews, renders, eval).

One tiny project is trained once per module (2 steps, previews every step), then trained again with another learning
rate and guidance (the first run is kept in out/runs/<id>/), rendered and scored with a tiny random CLIP; each test
works on its own copy when it changes anything."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import tree_snapshot, write_project

from palpcompose.cli import main


def _cli(*args) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_pipeline_dir) -> Path:
    """A project with a kept run (palp, learning rate 5e-5), the current run (sds, 1e-4), a render and its eval."""
    import torch
    from test_eval import write_tiny_clip

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = tmp_path_factory.mktemp("report")
        root = base / "proj"
        write_project(root, tiny_pipeline_dir, {"train": {"preview_every": 1}}, n_images=2)
        assert _cli("train", root) == 0
        write_project(root, tiny_pipeline_dir, {"train": {"preview_every": 1, "learning_rate": 1e-4}}, n_images=2)
        assert _cli("train", root, "--guidance", "sds") == 0
        clip = write_tiny_clip(base / "clip", tiny_pipeline_dir / "tokenizer")
        assert _cli("eval", root, "--clip", clip) == 0
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture
def project(trained, tmp_path) -> Path:
    """A copy of the trained project, to change and report on."""
    return Path(shutil.copytree(trained, tmp_path / "proj", symlinks=True))


class _Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts, and every src/href attribute."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.links: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("src", "href") and value is not None]
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self.tables and self.tables[-1]:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _page(root: Path) -> tuple[str, _Tables]:
    text = (root / "out" / "report.html").read_text()
    parser = _Tables()
    parser.feed(text)
    return text, parser


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_report_embeds_every_preview_of_every_run_as_a_data_uri(project, run_cli):
    result = run_cli("report", project)
    assert result.code == 0, result.err
    assert "report.html" in result.out
    text, _ = _page(project)
    previews = sorted((project / "out").glob("previews/step-*.png")) + \
        sorted((project / "out").glob("runs/*/previews/step-*.png"))
    assert len(previews) == 4  # two steps of each run
    for png in previews:
        assert _data_uri(png) in text, png
    sheet = next((project / "out" / "renders").glob("*/contact-sheet.png"))
    assert _data_uri(sheet) in text


def test_report_fetches_nothing_and_links_only_inside_out(project, run_cli):
    assert run_cli("report", project).code == 0
    text, parser = _page(project)
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text
    assert "default-src 'none'" in text  # the browser may fetch nothing, even if something slipped in
    assert parser.links
    for link in parser.links:
        assert link.startswith(("data:image/", "#")) or (
            not re.match(r"^[a-z]+:|^/", link) and ".." not in link and (project / "out" / link).exists()), link


def test_report_lists_the_settings_that_differ_from_the_kept_run(project, run_cli):
    assert run_cli("report", project).code == 0
    _, parser = _page(project)
    kept = next((project / "out" / "runs").iterdir()).name
    differ = next(t for t in parser.tables if t[0][0] == "setting")
    assert differ[0][1:] == ["current", kept]  # the current run first, then the kept one
    rows = {row[0]: row[1:] for row in differ[1:]}
    assert rows["train.learning_rate"] == ["0.0001", "5e-05"]
    assert rows["palp.guidance"] == ["sds", "palp"]
    assert "train.resolution" not in rows and "train.lora_rank" not in rows  # equal settings are not listed


def test_loss_plots_draw_each_run_s_logged_steps(project, run_cli):
    assert run_cli("report", project).code == 0
    text, _ = _page(project)
    plot = re.search(r'aria-label="loss_pers">(.*?)</svg>', text).group(1)
    lines = re.findall(r'<polyline points="([^"]+)" stroke="([^"]+)"', plot)
    assert len(lines) == 2 and lines[0][1] != lines[1][1]  # one line per run, in its own colour
    for points, _ in lines:
        assert len(points.split()) == 2  # two logged steps each
    assert 'aria-label="gradient balance"' in text


def test_report_shows_the_eval_scores_per_subject_with_the_render(project, run_cli):
    assert run_cli("report", project).code == 0
    text, parser = _page(project)
    assert "Latest eval" not in text  # out/eval.json scored that render: shown once, with it
    data = json.loads(next((project / "out" / "renders").glob("*/eval.json")).read_text())
    table = next(t for t in parser.tables if t[0][:2] == ["weights", "guidance"])
    assert table[0][-1] == "[V1] cat"
    final = next(row for row in table if row[0] == "final")
    assert final[3] == f"{data['models']['final']['text_alignment']:.3f}"
    assert final[5] == f"{data['models']['final']['subjects']['V1']:.3f}"


def test_damaged_files_are_named_in_the_page_and_the_rest_is_shown(project, run_cli):
    out = project / "out"
    kept = next((out / "runs").iterdir())
    (kept / "manifest.json").write_text('{"status": "completed", "steps_done": ')
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["steps_done"] = "x"
    manifest["config"] = 123
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "logs" / "train.jsonl").write_text("{not json\n")
    (out / "previews" / "step-000001.png").write_bytes(b"not a png")
    fifo = next(kept.glob("previews/step-*.png"))
    fifo.unlink()
    os.mkfifo(fifo)  # reading it would block: never opened
    eval_json = next((out / "renders").glob("*/eval.json"))
    eval_json.unlink()
    eval_json.mkdir()
    result = run_cli("report", project)
    assert result.code == 0, result.err
    assert "Traceback" not in result.err
    text, _ = _page(project)
    damaged = re.search(r"<h2 class=\"damaged\">Damaged files</h2>(.*?)</ul>", text, re.DOTALL).group(1)
    for name in (f"runs/{kept.name}/manifest.json", "field steps_done is", "field config is",
                 "logs/train.jsonl", "previews/step-000001.png", f"runs/{kept.name}/previews/{fifo.name}",
                 f"{eval_json.parent.name}/eval.json</code>: a folder"):
        assert name in damaged, name
    assert _data_uri(out / "previews" / "step-000002.png") in text  # the readable preview is still there
    assert "runs/" + kept.name in result.err  # and the command says so too


def _no_report(root: Path) -> bool:
    return not (root / "out" / "report.html").exists()


@pytest.mark.parametrize("case", ["missing", "file", "no-toml", "toml-folder", "no-out", "empty-out", "manifest",
                                  "manifest-fifo"])
def test_bad_project_folders_exit_2_naming_the_folder_and_the_fix(case, project, tmp_path, run_cli):
    target, expect = project, ""
    if case == "missing":
        target, expect = tmp_path / "nowhere", "no such folder"
    elif case == "file":
        target = tmp_path / "a-file"
        target.write_text("x")
        expect = "is a file"
    elif case == "no-toml":
        (project / "palp.toml").unlink()
        expect = "palpcompose init"
    elif case == "toml-folder":
        (project / "palp.toml").unlink()
        (project / "palp.toml").mkdir()
        expect = "is a folder"
    elif case == "no-out":
        shutil.rmtree(project / "out")
        expect = "train first"
    elif case == "empty-out":
        shutil.rmtree(project / "out")
        (project / "out").mkdir()
        expect = "train first"
    elif case == "manifest":
        (project / "out" / "manifest.json").write_text("{trunc")
        expect = "--resume"
    elif case == "manifest-fifo":
        (project / "out" / "manifest.json").unlink()
        os.mkfifo(project / "out" / "manifest.json")
        expect = "FIFO"
    before = tree_snapshot(project)
    result = run_cli("report", target)
    assert result.code == 2, (result.code, result.err)
    assert expect in result.err and "Traceback" not in result.err
    named = "manifest.json" if case.startswith("manifest") else target.name
    assert named in result.err
    assert tree_snapshot(project) == before and _no_report(project)


CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and Path(p).exists()), None)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium); "
                    "the headless-browser check of report.html is skipped")
def test_report_renders_with_its_images_in_headless_chromium(project, run_cli, tmp_path):
    assert run_cli("report", project).code == 0
    text = (project / "out" / "report.html").read_text()
    # The test, not the page, adds a script recording each image's decoded width once the page has loaded; the
    # page's own policy stays as written except that this one inline script may run.
    probe = ("<script>window.addEventListener('load', () => { for (const i of document.images) "
             "i.setAttribute('data-natural-width', String(i.naturalWidth)); "
             "document.body.setAttribute('data-probed', 'yes'); });</script></body>")
    assert "script-src 'none'" in text
    checked = project / "out" / "probe.html"
    checked.write_text(text.replace("script-src 'none'", "script-src 'unsafe-inline'").replace("</body>", probe))
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={tmp_path / 'chrome'}",
         "--virtual-time-budget=10000", "--dump-dom", checked.as_uri()],
        capture_output=True, text=True, timeout=120, check=False).stdout
    assert 'data-probed="yes"' in dom, dom[-2000:]
    widths = re.findall(r'data-natural-width="([^"]*)"', dom)
    assert len(widths) == text.count("<img ") >= 5  # 4 previews and the contact sheet at least
    assert all(int(w) > 0 for w in widths), widths  # 0: not loaded (blocked, or not an image)


def test_large_images_are_downscaled_before_they_are_embedded(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from palpcompose.report_parts import image_data_uri

    big = tmp_path / "sheet.png"
    pixels = np.random.default_rng(0).integers(0, 256, size=(600, 3000, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(big)
    uri, w, h = image_data_uri(big, 1024)
    assert (w, h) == (1024, 205)
    mime, payload = uri.removeprefix("data:").split(";base64,")
    with Image.open(io.BytesIO(base64.b64decode(payload))) as shown:
        assert shown.size == (1024, 205) and mime == f"image/{shown.format.lower()}"
    assert len(payload) < big.stat().st_size


def test_report_is_listed_and_has_help(run_cli):
    assert "report" in run_cli("-h").out
    long, short = run_cli("report", "--help"), run_cli("report", "-h")
    assert long.code == short.code == 0 and long.out == short.out and "report.html" in long.out
