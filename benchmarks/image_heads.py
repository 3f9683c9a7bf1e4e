"""Per-image heads on the packaged network (issue 39): the tile decision and the GSD estimate,
measured place by place with the place held out.

Every tile of real_dev, more_dev (no Xiamen) and more_dev2 is grouped by place (a source; the
Inria, crowdAI and Christchurch tiles of more_dev2 join their real_dev namesakes). For each
held-out place, both heads are fitted on crops of the *other* places (training/image_heads.py),
then judged on the held-out place:

* **tile decision**, on the place's 224 px grid tiles at their own pixel size (what a
  competition test tile is), with the packaged post-processing (threshold 0.4, min-area 100):
  no empty-tile rule (1.0's default); the max-probability rule (empty if the tile's max
  probability is below E) with E chosen on the other places; the tile head with its threshold
  chosen on the other places' held-out-place scores; and both tuned on ten tiles of the place
  (what ``buildseg tune`` does with ten labels), every row scored on the place's other tiles.
  Dice is the competition's (per tile, both-empty tiles dropped); the empty-tile FP rate is the
  share of building-free tiles that get any building.
* **scale**, on crops of the place at random known pixel sizes: the error of the estimated
  log2 pixel size, and the estimate at the tiles' own size.

The network is buildings 1.0, which saw real_dev and more_dev (not more_dev2): the heads and
their thresholds never see the held-out place, the network's features did for the first two
sets, so the "unseen by the network" rows (more_dev2) are the clean measure.

    python benchmarks/image_heads.py [--per-tile 16] [--out runs/image_heads]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "buildings"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import place_of  # noqa: E402

from buildseg.data.datasets import GridTileDataset, grid_offsets
from buildseg.formats.images import read_image  # noqa: E402
from buildseg.formats.tables import load_records  # noqa: E402
from buildseg.inference.core import postprocess as pp_mod  # noqa: E402
from buildseg.metrics import competition_dice, image_counts  # noqa: E402
from buildseg.models.image_heads import column_groups, run_head  # noqa: E402
from buildseg.runtime.checkpoint import load_model  # noqa: E402
from buildseg.runtime.packaged import PACKAGED_PREFIX  # noqa: E402
from buildseg.training.image_heads import MIN_ZOOM, balanced_weights, draw_crops, fit_head, pooled_vectors, with_heads  # noqa: E402
from loader_throughput import cpu_flags  # noqa: E402

POST = pp_mod.PostProcess(threshold=0.4, min_area=100)  # the package's
EMPTY = (0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
TILE = tuple(np.round(np.arange(0.0, 0.96, 0.05), 2))
FEW = 10
DEAD_BAND = 2.0  # the estimate must be this factor from the model's GSD before a tile is resampled


def grid_outputs(model, dataset: GridTileDataset, batch: int = 16):
    """Footprint probabilities, truths and pooled vectors of every grid tile (valid part)."""
    probs, truths, images = [], [], []
    for k in range(len(dataset)):
        image, mask, valid = dataset[k]
        h, w = valid.tolist()
        images.append(image[:, :h, :w].permute(1, 2, 0).numpy().astype(np.uint8))
        truths.append(mask[0, :h, :w].numpy().astype(bool))
    vectors = pooled_vectors(model, images, batch=batch, footprints=probs)
    return probs, truths, vectors


class Tiles:
    """Each grid tile's pixel counts with the package's post-processing, kept or declared empty:
    a gate only chooses between the two, so rules are scored without re-running it."""

    def __init__(self, probs, truths) -> None:
        kept = [image_counts(pp_mod.apply(p, POST), t) for p, t in zip(probs, truths)]
        self.kept = np.array(kept, dtype=np.int64)  # (N, 3) tp, fp, fn
        self.emptied = np.array([(0, 0, int(t.sum())) for t in truths], dtype=np.int64)
        self.truth_empty = self.truth_empty_of(truths)

    @staticmethod
    def truth_empty_of(truths) -> np.ndarray:
        return np.array([not t.any() for t in truths])

    def score(self, rows: np.ndarray, gate: np.ndarray | None = None) -> tuple[float, float]:
        """(competition Dice, empty-tile FP rate) of ``rows`` with tiles where ``gate`` is False emptied."""
        keep = np.ones(len(rows), dtype=bool) if gate is None else gate
        counts = np.where(keep[:, None], self.kept[rows], self.emptied[rows])
        empty = self.truth_empty[rows]
        fp_rate = float(((counts[:, 1] > 0) & empty).sum() / empty.sum()) if empty.any() else float("nan")
        return competition_dice(counts[:, 0], counts[:, 1], counts[:, 2])[0], fp_rate


def component_features(prob: np.ndarray) -> list[float]:
    """What a tile's post-processed mask looks like: max and mean probability, the share of
    pixels kept, the largest component's share, log component count, mean probability inside."""
    import cv2

    mask = pp_mod.apply(prob, POST)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA] if n > 1 else np.zeros(1)
    inside = float(prob[mask > 0].mean()) if mask.any() else 0.0
    return [float(prob.max()), float(prob.mean()), float(mask.mean()), float(areas.max() / mask.size),
            float(np.log1p(n - 1)), inside]


@torch.no_grad()
def scored_at(model, records, factors) -> float:
    """Competition Dice over the 224 grid tiles of ``records``, each predicted after resampling
    its image by its factor (model pixels per tile pixel: GSD / 0.5) and restored to its size."""
    import cv2

    counts = []
    for record, factor in zip(records, factors):
        image = read_image(record.image_path)
        truth = record.load_mask(image.shape[:2]).astype(bool)
        h, w = image.shape[:2]
        size = (max(32, round(w * factor)), max(32, round(h * factor)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
        logits = model(torch.from_numpy(small).permute(2, 0, 1)[None].float())[:, :1]
        prob = torch.sigmoid(torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear"))[0, 0].numpy()
        for y, th in grid_offsets(h, 224):
            for x, tw in grid_offsets(w, 224):
                counts.append(image_counts(pp_mod.apply(prob[y:y + th, x:x + tw], POST), truth[y:y + th, x:x + tw]))
    tp, fp, fn = (np.array(c) for c in zip(*counts))
    return competition_dice(tp, fp, fn)[0]


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC by ranks (ties count half): the chance a tile with buildings outscores a free one."""
    pos, neg = score[positive], score[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg)))


def best_cut(tiles: Tiles, rows: np.ndarray, scores: np.ndarray, cuts) -> float:
    return max(cuts, key=lambda c: tiles.score(rows, scores >= c)[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-tile", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale-only", action="store_true", help="skip the tile head variants")
    parser.add_argument("--min-zoom", type=float, default=MIN_ZOOM, help="scale crops are enlarged at most 1/this")
    parser.add_argument("--out", default="runs/image_heads")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    corpus = out / "corpus.csv"
    import corpus as corpus_recipe

    corpus_recipe.main(["--out", str(corpus)])
    records = load_records(corpus)
    places = np.array([place_of(r.tile_source) for r in records])
    unseen = {place_of(r.tile_source) for r in records if r.img_id.startswith("MD2_")} - {"inria", "crowdai",
                                                                                              "whu_christchurch"}
    model = with_heads(load_model(PACKAGED_PREFIX + "buildings@1.0")[0], ["tile", "scale"])
    started = time.perf_counter()
    cache = out / f"crops_p{args.per_tile}_s{args.seed}_z{args.min_zoom:g}.npz"
    if cache.is_file():
        data = np.load(cache)
        vectors, has, scale, group = data["vectors"], data["has"], data["scale"], data["group"]
    else:
        crops = draw_crops(records, model_gsd=0.5, per_tile=args.per_tile, seed=args.seed, groups=list(places),
                           min_zoom=args.min_zoom)
        vectors = pooled_vectors(model, crops.images)
        has, scale, group = crops.has_building, crops.log2_scale, crops.group
        np.savez_compressed(cache, vectors=vectors, has=has, scale=scale, group=group)
    grid_cache = out / "grid.npz"
    if grid_cache.is_file():
        data = np.load(grid_cache, allow_pickle=True)
        gprobs, gtruths, gvectors, gplace = list(data["probs"]), list(data["truths"]), data["vectors"], data["place"]
    else:
        dataset = GridTileDataset(records, tile=224)
        gprobs, gtruths, gvectors = grid_outputs(model, dataset)
        gplace = np.array([places[r] for r, *_ in dataset.tiles])
        stored_p, stored_t = np.empty(len(gprobs), dtype=object), np.empty(len(gprobs), dtype=object)
        for k in range(len(gprobs)):
            stored_p[k], stored_t[k] = gprobs[k].astype(np.float16), gtruths[k]
        np.savez_compressed(grid_cache, probs=stored_p, truths=stored_t, vectors=gvectors, place=gplace)
    gprobs = [np.asarray(p, dtype=np.float32) for p in gprobs]
    gsd_of = {place_of(r.tile_source): r.gsd for r in records}
    gsd_of_group = {k: (v if v else np.nan) for k, v in gsd_of.items()}
    print(f"CPU flags: {cpu_flags()}; {len(records)} tiles, {len(set(places))} places, {len(vectors)} crops, "
          f"{len(gprobs)} grid tiles; features {time.perf_counter() - started:.0f} s\n")

    groups = column_groups(model.net.encoder.feature_info.channels())
    columns = {name: np.zeros(vectors.shape[1], dtype=bool) for name in ("map", "map + deepest", "all", "stages")}
    columns["map"][groups["map"]] = True
    columns["map + deepest"][groups["map"]] = columns["map + deepest"][groups[f"stage{len(groups) - 2}"]] = True
    columns["all"][:] = True
    columns["stages"][:] = True
    columns["stages"][groups["map"]] = False
    max_logit = vectors[:, groups["map"].start]
    native = np.isclose(scale, np.log2(np.array([gsd_of_group.get(g, np.nan) for g in group]) / 0.5)) | np.isnan(scale)

    def held_out(kind: str, used: np.ndarray, decay: float) -> tuple[np.ndarray, np.ndarray]:
        """(grid tile outputs, crop outputs) of heads fitted without each tile's place; each
        place's head is kept in ``fitted[kind]``."""
        grid_out, crop_out = np.zeros(len(gprobs)), np.zeros(len(vectors))
        fitted[kind] = {}
        for place in sorted(set(places)):
            train = group != place
            target = has[train].astype(float) if kind == "tile" else scale[train]
            weights = balanced_weights(group[train], has[train] if kind == "tile" else None)
            head = fit_head(vectors[train], target, kind=kind, weights=weights, columns=used, decay=decay,
                            seed=args.seed)
            fitted[kind][place] = head
            rows = gplace == place
            grid_out[rows] = run_head(head, torch.from_numpy(gvectors[rows]))[:, 0].numpy()
            crop_out[~train] = run_head(head, torch.from_numpy(vectors[~train]))[:, 0].numpy()
        return grid_out, crop_out

    fitted: dict[str, dict] = {}
    truth_has = ~Tiles.truth_empty_of(gtruths)
    print("Tile head variants, each fitted without the place it scores (ROC AUC of 'holds a building'; grid tiles "
          "at their own size, and the native-size crops, which include building-free ground on purpose):\n")
    print("| inputs | weight decay | grid tiles, seen places | grid tiles, unseen | native crops, all places |")
    print("|---|---|---|---|---|")
    seen_rows = ~np.isin(gplace, list(unseen))
    print(f"| max probability alone (1.0's rule) | — | {auc(gvectors[seen_rows, groups['map'].start], truth_has[seen_rows]):.3f} "
          f"| {auc(gvectors[~seen_rows, groups['map'].start], truth_has[~seen_rows]):.3f} | "
          f"{auc(max_logit[native], has[native]):.3f} |")
    best_tile, best_auc = None, -1.0
    for name in ("map",) if args.scale_only else ("map", "map + deepest", "all"):
        for decay in (1e-3,) if args.scale_only else (1e-3, 1e-2):
            grid_out, crop_out = held_out("tile", columns[name], decay)
            row = (auc(grid_out[seen_rows], truth_has[seen_rows]), auc(grid_out[~seen_rows], truth_has[~seen_rows]),
                   auc(crop_out[native], has[native]))
            print(f"| {name} | {decay:g} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.3f} |")
            if np.mean(row) > best_auc:
                best_tile, best_auc, gscore = (name, decay), float(np.mean(row)), 1 / (1 + np.exp(-grid_out))
    # a calibrated score from the post-processed mask's components (computed after the engine, not in the graph)
    shape_features = np.array([component_features(p) for p in gprobs])
    component_score = np.zeros(len(gprobs))
    for place in sorted(set(places)):
        train, rows = gplace != place, gplace == place
        head = fit_head(shape_features[train], truth_has[train].astype(float), kind="tile",
                        weights=balanced_weights(gplace[train], truth_has[train]), decay=1e-2, seed=args.seed)
        component_score[rows] = run_head(head, torch.from_numpy(shape_features[rows]).float())[:, 0].numpy()
    print(f"| components of the mask (max, mean, kept share, largest, count, mean inside) | 0.01 | "
          f"{auc(component_score[seen_rows], truth_has[seen_rows]):.3f} | "
          f"{auc(component_score[~seen_rows], truth_has[~seen_rows]):.3f} | — |")
    print(f"\nchosen: {best_tile[0]}, decay {best_tile[1]:g} (best mean AUC, every figure held out)\n")

    print("Scale head variants (median |error| of the held-out place's crops, log2 units):\n")
    print("| inputs | weight decay | median abs error | within x1.5 | within x2 |")
    print("|---|---|---|---|---|")
    best_scale, best_err = None, np.inf
    for name in ("stages", "all"):
        for decay in (1e-3, 1e-2):
            grid_out, crop_out = held_out("scale", columns[name], decay)
            known = ~np.isnan(scale)
            err = np.abs(crop_out[known] - scale[known])
            print(f"| {name} | {decay:g} | {np.median(err):.2f} | {np.mean(err < np.log2(1.5)):.2f} | "
                  f"{np.mean(err < 1):.2f} |")
            if np.median(err) < best_err:
                best_scale, best_err, gscale, crop_estimate = (name, decay), float(np.median(err)), grid_out, crop_out
                scale_heads = dict(fitted["scale"])
    print(f"\nchosen: {best_scale[0]}, decay {best_scale[1]:g}\n")
    gmax = np.array([float(p.max()) for p in gprobs])
    tiles = Tiles(gprobs, gtruths)

    table: dict[str, list] = {}
    for place in sorted(set(gplace)):
        rows = np.flatnonzero(gplace == place)
        others = np.flatnonzero(gplace != place)
        e_other = best_cut(tiles, others, gmax[others], EMPTY)
        t_other = best_cut(tiles, others, gscore[others], TILE)
        rng = np.random.default_rng(args.seed)
        few = rng.choice(rows, size=FEW, replace=False) if len(rows) >= 2 * FEW else np.array([], dtype=int)
        rest = np.setdiff1d(rows, few)
        result = {"none": tiles.score(rest),
                  "max-prob rule, other places": tiles.score(rest, gmax[rest] >= e_other),
                  "tile head, other places": tiles.score(rest, gscore[rest] >= t_other)}
        if len(few):
            result[f"max-prob rule, {FEW} tiles of the place"] = tiles.score(
                rest, gmax[rest] >= best_cut(tiles, few, gmax[few], EMPTY))
            result[f"tile head, {FEW} tiles of the place"] = tiles.score(
                rest, gscore[rest] >= best_cut(tiles, few, gscore[few], TILE))
        table[place] = [len(rest), int(tiles.truth_empty[rest].sum()), result, e_other, t_other]

    names = ["none", "max-prob rule, other places", "tile head, other places", f"max-prob rule, {FEW} tiles of the place",
             f"tile head, {FEW} tiles of the place"]
    for title, chosen in (("places the network saw (heads held out)", lambda p: p not in unseen),
                          ("places unseen by the network (more_dev2)", lambda p: p in unseen)):
        print(f"### {title}\n")
        print("| place | tiles (empty) | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        for place, (n, n_empty, result, _e, _t) in table.items():
            if not chosen(place):
                continue
            cells = [f"{result[k][0]:.3f} / {result[k][1]:.2f}" if k in result else "—" for k in names]
            print(f"| {place} | {n} ({n_empty}) | " + " | ".join(cells) + " |")
        print()
    print("cells: competition Dice / empty-tile FP rate. Paired differences over places (Dice):\n")
    print("| rule | vs none: mean ± sd | places up / down | vs max-prob rule (same labels) |")
    print("|---|---|---|---|")
    for name in names[1:]:
        pairs = [(r[2][name][0], r[2]["none"][0]) for r in table.values() if name in r[2]]
        d = np.array([a - b for a, b in pairs])
        partner = name.replace("tile head", "max-prob rule")
        cmp = ""
        if partner != name:
            q = np.array([r[2][name][0] - r[2][partner][0] for r in table.values() if name in r[2]])
            cmp = f"{q.mean():+.3f} ± {q.std():.3f} ({(q > 0).sum()} up, {(q < 0).sum()} down)"
        print(f"| {name} | {d.mean():+.3f} ± {d.std():.3f} | {(d > 0).sum()} / {(d < 0).sum()} | {cmp} |")


    print("\n### scale estimate, held-out place\n")
    print("| place | GSD (m) | crops | median abs error, log2 | within x1.5 | estimate at own size (median) |")
    print("|---|---|---|---|---|---|")
    errors = []
    for place in sorted(set(places)):
        rows = (group == place) & ~np.isnan(scale)
        if not rows.any():
            continue
        err = np.abs(crop_estimate[rows] - scale[rows])
        errors.append(err)
        own = np.median(gscale[gplace == place])
        print(f"| {place} | {gsd_of[place]} | {rows.sum()} | {np.median(err):.2f} | {np.mean(err < np.log2(1.5)):.2f} | "
              f"{0.5 * 2 ** own:.2f} m |")
    print("\nDice bought by resampling each tile to the model's 0.5 m (whole tiles resampled, probabilities restored "
          "to the tile's own size, the same 224 grid scored); the estimate is the held-out head's on the whole tile "
          f"(one pass, as predict makes it); 'dead band' resamples only where it is {DEAD_BAND:g}x or more from 0.5 m:\n")
    print("| place | GSD (m) | tiles | as they are | known GSD | estimated GSD | estimated, dead band |")
    print("|---|---|---|---|---|---|---|")
    dice_rows = []
    for place in sorted(set(places)):
        gsd = gsd_of[place]
        members = [k for k, r in enumerate(records) if places[k] == place]
        chosen = [records[k] for k in members]
        whole = pooled_vectors(model, [read_image(r.image_path) for r in chosen], batch=1)
        estimates = run_head(scale_heads[place], torch.from_numpy(whole))[:, 0].numpy()
        banded = np.where(np.abs(estimates) >= np.log2(DEAD_BAND), estimates, 0.0)
        cells = [scored_at(model, chosen, [1.0] * len(members)),
                 scored_at(model, chosen, [gsd / 0.5] * len(members)) if gsd else np.nan,
                 scored_at(model, chosen, list(2.0 ** estimates)), scored_at(model, chosen, list(2.0 ** banded))]
        dice_rows.append((place, gsd, cells))
        print(f"| {place} | {gsd} | {len(members)} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)
    table_cells = np.array([c for _, _, c in dice_rows])
    far = np.array([bool(g) and abs(np.log2(g / 0.5)) >= 1 for _, g, _ in dice_rows])
    for title, rows in (("places at least 2x from 0.5 m", far), ("the other places", ~far), ("all places", far | ~far)):
        d = table_cells[rows] - table_cells[rows, :1]
        print(f"| **{title}** ({rows.sum()}) | | | {table_cells[rows, 0].mean():.3f} | "
              + " | ".join(f"{np.nanmean(d[:, k]):+.3f} ± {np.nanstd(d[:, k]):.3f} ({(d[:, k] > 0).sum()} up, "
                           f"{(d[:, k] < 0).sum()} down)" for k in (1, 2, 3)) + " |")
    allerr = np.concatenate(errors)
    print(f"\nall held-out crops: median abs error {np.median(allerr):.2f} log2 (x{2 ** np.median(allerr):.2f}), "
          f"{np.mean(allerr < np.log2(1.5)):.2f} within x1.5, {np.mean(allerr < 1):.2f} within x2")


if __name__ == "__main__":
    main()
