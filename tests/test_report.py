"""``buildseg report``: the page's content, and a render in headless Chromium when installed."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from buildseg.cli import main
from buildseg.data.synth import write_dataset
from buildseg.formats import rle
from buildseg.formats.tables import read_rle_table, write_submission

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A synthetic test set and a deliberately imperfect submission: erased, shifted, specks."""
    root = tmp_path_factory.mktemp("report")
    write_dataset(root, n_train=1, train_size=64, n_test=16, test_size=64, seed=2, progress=False)
    truth = read_rle_table(root / "test_truth.csv")
    rng = np.random.default_rng(0)
    ids, rles = [], []
    for k, (img_id, code) in enumerate(truth.items()):
        mask = rle.decode(code, (64, 64))
        if k % 4 == 1:
            mask = np.roll(mask, 6, axis=1)
        elif k % 4 == 2:
            mask = np.zeros_like(mask)
        if k % 5 == 0:
            y, x = rng.integers(0, 60, 2)
            mask[y : y + 3, x : x + 3] = 1
        ids.append(img_id)
        rles.append(rle.encode(mask))
    write_submission(root / "sub.csv", ids, rles)
    return root


def test_report_rows_worst_tiles_and_sections(scored, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", "--pred", str(scored / "sub.csv"), "--truth", str(scored / "test_truth.csv"),
                 "--out", str(out), "--worst", "3"]) == 0
    page = out.read_text()
    from buildseg.report import score_images

    scores = score_images(scored / "sub.csv", scored / "test_truth.csv")
    n_scored = sum(not np.isnan(s.dice) for s in scores)
    assert page.count("class='image-row'") == n_scored
    lowest = sorted((s for s in scores if not np.isnan(s.dice)), key=lambda s: (s.dice, s.img_id))[:3]
    worst_section = page.split("id='worst-tiles'>")[1].split("<h2")[0]
    assert re.findall(r"<b>([^<]+)</b>", worst_section) == [s.img_id for s in lowest]
    assert "http://" not in page and "https://" not in page  # self-contained
    assert page.count("data:image/png;base64,") == 1 + 3 * page.count('class="case"')  # histogram + 3 per case


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(scored, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", "--pred", str(scored / "sub.csv"), "--truth", str(scored / "test_truth.csv"),
                 "--out", str(out)]) == 0
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                           "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    assert images > 3 and 'data-broken-images="0"' in dom  # every embedded picture decoded
    assert dom.count('class="image-row"') >= 10
