"""``buildseg report``: one self-contained HTML page that shows where a model fails.

Inputs are a submission (``img_id,mask_rle``) and its truth: a dataset CSV with ``img_path``
(the images are found through it) or a bare ``img_id,mask_rle`` CSV with ``--images DIR``
(``DIR/<img_id>.png`` or another image extension). The page holds, with every image embedded
as a data URI (no network, no files beside it):

* the summary: competition Dice, images scored, IoU, empty-tile false-positive rate, building
  F1 / precision / recall;
* a histogram of per-image Dice;
* the worst tiles (lowest Dice first) as image | truth | prediction;
* false positives on empty tiles (the metric's costliest error: a speck scores 0) and false
  negatives (buildings in the truth, nothing predicted);
* a per-source breakdown when the truth CSV has a ``source`` column;
* one table row per scored image.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from buildseg.errors import BuildsegError, RleError
from buildseg.formats import rle
from buildseg.formats.tables import read_csv_rows, read_rle_table
from buildseg.instance_metrics import InstanceCounts, match_masks
from buildseg.metrics import dice_per_image, summarize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
THUMB = 160  # px: the side of each picture in the page


@dataclass
class ImageScore:
    img_id: str
    image_path: Path | None
    source: str
    shape: tuple[int, int]
    tp: int
    fp: int
    fn: int
    dice: float  # NaN when prediction and truth are both empty (not scored)
    buildings: InstanceCounts

    @property
    def f1(self) -> float:
        return self.buildings.summary()["f1"]


def _image_path(img_id: str, row: dict, base: Path, images: Path | None) -> Path | None:
    if row.get("img_path"):
        path = Path(row["img_path"])
        return path if path.is_absolute() else base / path
    if images is not None:
        for suffix in IMAGE_SUFFIXES:
            if (images / f"{img_id}{suffix}").is_file():
                return images / f"{img_id}{suffix}"
    return None


def score_images(pred_csv: str | Path, truth_csv: str | Path, images: str | Path | None = None,
                 shape: tuple[int, int] | None = None) -> list[ImageScore]:
    """Per-image counts and scores, in the truth's order."""
    from buildseg.formats.images import image_size

    truth_csv = Path(truth_csv)
    if not truth_csv.is_file():
        raise BuildsegError(f"truth CSV not found: {truth_csv}")
    _, rows = read_csv_rows(truth_csv)
    pred = read_rle_table(pred_csv)
    images = Path(images) if images else None
    if images is not None and not images.is_dir():
        raise BuildsegError(f"--images {images} is not a folder")
    scores = []
    for row in rows:
        img_id = row["img_id"]
        if img_id not in pred:
            raise BuildsegError(f"{pred_csv} has no row for {img_id} (in {truth_csv})")
        path = _image_path(img_id, row, truth_csv.parent, images)
        size = shape or (image_size(path) if path is not None and path.is_file() else (224, 224))
        try:
            g = rle.decode(row.get("mask_rle") or rle.EMPTY, size, img_id=img_id)
            p = rle.decode(pred[img_id], size, img_id=img_id)
        except RleError as exc:
            raise BuildsegError(f"{truth_csv} / {pred_csv}: {exc}") from None
        tp = int(np.count_nonzero(p & g))
        fp, fn = int(np.count_nonzero(p)) - tp, int(np.count_nonzero(g)) - tp
        scores.append(ImageScore(img_id, path, row.get("source") or "", size, tp, fp, fn,
                                 float(dice_per_image([tp], [fp], [fn])[0]), match_masks(p, g).counts))
    return scores


def _png_uri(image: np.ndarray) -> str:
    import cv2

    ok, data = cv2.imencode(".png", image[:, :, ::-1] if image.ndim == 3 else image)
    return "data:image/png;base64," + base64.b64encode(data.tobytes()).decode("ascii")


def _thumb(image: np.ndarray) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    scale = THUMB / max(h, w)
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def _triptych(score: ImageScore, pred_rle: str, truth_rle: str) -> str:
    """image | truth | prediction as three embedded pictures."""
    from buildseg.formats.images import overlay, read_image

    g = rle.decode(truth_rle, score.shape)
    p = rle.decode(pred_rle, score.shape)
    if score.image_path is not None and score.image_path.is_file():
        image = read_image(score.image_path, 3)
    else:
        image = np.zeros((*score.shape, 3), np.uint8)
    green = np.zeros_like(image)
    green[g.astype(bool)] = (40, 220, 40)
    truth_view = np.where(g[:, :, None].astype(bool), (0.5 * image + 0.5 * green).astype(np.uint8), image)
    cells = [("image", image), ("truth", truth_view), ("prediction", overlay(image, p))]
    figures = "".join(f'<figure><img alt="{name}" src="{_png_uri(_thumb(view))}"><figcaption>{name}</figcaption></figure>'
                      for name, view in cells)
    return (f'<div class="case"><div class="pics">{figures}</div><p><b>{html.escape(score.img_id)}</b> Dice '
            f'{_num(score.dice)}, buildings {score.buildings.n_true} true / {score.buildings.n_pred} predicted, '
            f'F1 {_num(score.f1)}, '
            f'tp {score.tp} fp {score.fp} fn {score.fn}{", " + html.escape(score.source) if score.source else ""}</p></div>')


def _num(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _histogram(dice: np.ndarray) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.hist(dice[~np.isnan(dice)], bins=20, range=(0, 1), color="#4a7fb5", edgecolor="white")
    ax.set_xlabel("per-image competition Dice")
    ax.set_ylabel("images")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
.case{display:inline-block;margin:.4em;vertical-align:top;width:500px}.pics{display:flex;gap:4px}
figure{margin:0}figcaption{font-size:11px;text-align:center;color:#666}p{margin:.2em 0;font-size:13px}
"""

CHECK = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; }).length;
  document.body.setAttribute('data-images', String(imgs.length));
  document.body.setAttribute('data-broken-images', String(bad));
});
</script>
"""


def _dice_of(scores: Sequence[ImageScore]) -> float:
    return summarize(np.array([[s.tp, s.fp, s.fn] for s in scores], dtype=np.int64).reshape(-1, 3))["dice"]


def comparison_html(before: Sequence[ImageScore], after: Sequence[ImageScore], top: int) -> str:
    """Before/after on the same tiles (e.g. a model before and after ``buildseg adapt``): the
    competition Dice of each, per source, and the tiles that changed most either way. A tile
    empty in truth and prediction is unscored ('—'); its change counts only where both are scored."""
    rows = []
    groups = [("all", list(range(len(after))))]
    groups += [(src, [k for k, s in enumerate(after) if s.source == src]) for src in sorted({s.source for s in after if s.source})]
    for name, idx in groups:
        b, a = _dice_of([before[k] for k in idx]), _dice_of([after[k] for k in idx])
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{len(idx)}</td><td>{_num(b)}</td><td>{_num(a)}</td>"
                    f"<td>{a - b:+.3f}</td></tr>")
    changes = sorted(((a.dice - b.dice, a.img_id, b.dice, a.dice, a.source) for b, a in zip(before, after)
                      if not (math.isnan(a.dice) or math.isnan(b.dice))), key=lambda c: (c[0], c[1]))
    shown = changes[:top] + [c for c in changes[-top:][::-1] if c not in changes[:top]]
    tiles = "".join(f"<tr class='change-row'><td>{html.escape(i)}</td><td>{_num(b)}</td><td>{_num(a)}</td>"
                    f"<td>{d:+.3f}</td><td>{html.escape(src)}</td></tr>" for d, i, b, a, src in shown)
    up = sum(c[0] > 0 for c in changes)
    return ("<h2>Before / after</h2><table id='before-after'><tr><th>tiles</th><th>images</th><th>Dice before</th>"
            "<th>Dice after</th><th>change</th></tr>" + "".join(rows) + "</table>"
            f"<p>{up} of {len(changes)} tiles scored in both went up.</p><table id='changes'><tr><th>img_id</th>"
            "<th>before</th><th>after</th><th>change</th><th>source</th></tr>" + tiles + "</table>")


def _sources_html(scores) -> str:
    """The per-source table (empty when no image names a source)."""
    sources = sorted({s.source for s in scores if s.source})
    if not sources:
        return ""
    rows = []
    for source in sources:
        mine = [s for s in scores if s.source == source]
        sub = summarize(np.array([[s.tp, s.fp, s.fn] for s in mine], dtype=np.int64))
        rows.append(f"<tr><td>{html.escape(source)}</td><td>{len(mine)}</td><td>{_num(sub['dice'])}</td>"
                    f"<td>{_num(sub['empty_fp_rate'])}</td></tr>")
    return ("<h2>By source</h2><table id='sources'><tr><th>source</th><th>images</th><th>Dice</th>"
            "<th>empty-tile FP rate</th></tr>" + "".join(rows) + "</table>")


def render_report(pred_csv: str | Path, truth_csv: str | Path, out: str | Path, images: str | Path | None = None,
                  shape: tuple[int, int] | None = None, worst: int = 12, before: str | Path | None = None) -> Path:
    """Write the report page; returns its path. ``before``: predictions of the same tiles by
    another model (unadapted, say), shown side by side with the Dice change per tile and source."""
    from buildseg.atomic import atomic_open

    scores = score_images(pred_csv, truth_csv, images, shape)
    before_scores = score_images(before, truth_csv, images, shape) if before else None
    if not scores:
        raise BuildsegError(f"{truth_csv} has no images to report on")
    pred = read_rle_table(pred_csv)
    _, truth_rows = read_csv_rows(Path(truth_csv))
    truth = {r["img_id"]: r.get("mask_rle") or rle.EMPTY for r in truth_rows}
    counts = np.array([[s.tp, s.fp, s.fn] for s in scores], dtype=np.int64)
    summary = summarize(counts)
    total = InstanceCounts()
    for s in scores:
        total += s.buildings
    buildings_summary = total.summary()
    dice = np.array([s.dice for s in scores])
    scored = [s for s in scores if not math.isnan(s.dice)]
    worst_cases = sorted(scored, key=lambda s: (s.dice, s.img_id))[:worst]
    empty_fp = [s for s in scores if s.tp + s.fn == 0 and s.fp > 0]
    missed = [s for s in scores if s.tp + s.fn > 0 and s.tp + s.fp == 0]

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>buildseg report</title><style>{STYLE}</style>"
             f"</head><body><h1>buildseg report</h1><p>{html.escape(str(pred_csv))} against {html.escape(str(truth_csv))}</p>"]
    parts.append("<h2>Summary</h2><table id='summary'>" + "".join(
        f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in [
            ("competition Dice", _num(summary["dice"], 4)), ("images scored", f"{summary['n_scored']} of {summary['n']}"),
            ("IoU (per image)", _num(summary["iou"], 4)), ("empty-tile false-positive rate", _num(summary["empty_fp_rate"])),
            ("building F1 (IoU >= 0.5)", _num(buildings_summary["f1"], 4)),
            ("building precision / recall", f"{_num(buildings_summary['precision'])} / {_num(buildings_summary['recall'])}"),
            ("buildings true / predicted / matched",
             f"{buildings_summary['n_true']} / {buildings_summary['n_pred']} / {buildings_summary['n_matched']}")]) + "</table>")
    if before_scores is not None:
        parts.append(comparison_html(before_scores, scores, worst))
    parts.append(f"<h2>Per-image Dice</h2><img alt='histogram of per-image Dice' src='{_histogram(dice)}'>")
    parts.append(f"<h2 id='worst'>Worst tiles ({len(worst_cases)} lowest Dice)</h2><div id='worst-tiles'>"
                 + "".join(_triptych(s, pred[s.img_id], truth[s.img_id]) for s in worst_cases) + "</div>")
    parts.append(f"<h2>False positives on empty tiles ({len(empty_fp)})</h2><div id='empty-fp'>"
                 + "".join(_triptych(s, pred[s.img_id], truth[s.img_id]) for s in empty_fp[:worst]) + "</div>")
    parts.append(f"<h2>False negatives: buildings, nothing predicted ({len(missed)})</h2><div id='missed'>"
                 + "".join(_triptych(s, pred[s.img_id], truth[s.img_id]) for s in missed[:worst]) + "</div>")
    parts.append(_sources_html(scores))
    parts.append("<h2>Every scored image</h2><table id='images'><tr><th>img_id</th><th>Dice</th><th>building F1</th>"
                 "<th>true px</th><th>predicted px</th><th>buildings true</th><th>buildings predicted</th><th>source</th></tr>"
                 + "".join(f"<tr class='image-row'><td>{html.escape(s.img_id)}</td><td>{_num(s.dice)}</td><td>{_num(s.f1)}</td>"
                           f"<td>{s.tp + s.fn}</td><td>{s.tp + s.fp}</td><td>{s.buildings.n_true}</td>"
                           f"<td>{s.buildings.n_pred}</td>"
                           f"<td>{html.escape(s.source)}</td></tr>" for s in sorted(scored, key=lambda s: (s.dice, s.img_id)))
                 + "</table>")
    parts.append(CHECK + "</body></html>")
    with atomic_open(out, "w", encoding="utf-8") as handle:
        handle.write("".join(parts))
    return Path(out)


def render_run_report(folder: str | Path, out: str | Path) -> Path:
    """One self-contained page of a ``predict`` output folder: its overview picture (the
    imagery with the footprints by status), the counts, and the manifest."""
    from buildseg.atomic import atomic_open

    folder = Path(folder)
    pictures = sorted(folder.glob("overview.png")) or sorted(folder.glob("*_overview.png"))
    if not folder.is_dir() or not pictures:
        raise BuildsegError(f"--run {folder}: no overview.png there; give the --out folder of an AOI or many-scene "
                            "`buildseg predict` (or the folder of a GeoTIFF run's mask, with --footprints)")
    picture = pictures[0]
    about_path = picture.with_suffix(".json")
    about = json.loads(about_path.read_text()) if about_path.is_file() else {}
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    uri = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    colours = about.get("colours", {})
    rows = "".join(f"<tr class='status'><th><span style='display:inline-block;width:12px;height:12px;"
                   f"background:rgb{tuple(colours.get(k, (0, 0, 0)))}'></span> {html.escape(k)}</th><td>{v}</td></tr>"
                   for k, v in about.get("counts", {}).items())
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>buildseg run {html.escape(folder.name)}</title>"
             f"<style>{STYLE}</style></head><body><h1>buildseg run: {html.escape(str(folder))}</h1>",
             f"<h2>What was found</h2><table id='counts'>{rows}</table>",
             f"<img id='overview' alt='the imagery with the footprints drawn over it' style='max-width:100%' src='{uri}'>"]
    if manifest is not None:
        parts.append("<h2>Manifest</h2><pre id='manifest'>" + html.escape(json.dumps(manifest, indent=1)[:200_000])
                     + "</pre>")
    parts.append(CHECK + "</body></html>")
    with atomic_open(out, "w", encoding="utf-8") as handle:
        handle.write("".join(parts))
    return Path(out)
