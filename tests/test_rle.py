import numpy as np
import pytest

from buildseg.errors import RleError
from buildseg.formats import rle
from conftest import random_mask


def reference_encode(mask: np.ndarray) -> str:
    """Independent, obviously-correct encoder: walk the pixels one by one."""
    flat = mask.flatten().tolist()
    runs, start = [], None
    for i, v in enumerate(flat + [0]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs += [start + 1, i - start]
            start = None
    return " ".join(map(str, runs)) if runs else "-1"


def reference_decode(text: str, shape) -> np.ndarray:
    flat = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    if text != "-1":
        tokens = [int(t) for t in text.split()]
        for s, n in zip(tokens[0::2], tokens[1::2]):
            flat[s - 1 : s - 1 + n] = 1
    return flat.reshape(shape)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 3), (17, 31), (64, 64), (224, 224), (100, 300)])
def test_round_trip_and_reference_on_random_masks(shape):
    rng = np.random.default_rng(hash(shape) % 2**32)
    for _ in range(20):
        mask = random_mask(rng, shape)
        text = rle.encode(mask)
        assert text == reference_encode(mask)
        np.testing.assert_array_equal(rle.decode(text, shape), mask)
        np.testing.assert_array_equal(reference_decode(text, shape), mask)


def test_known_strings_row_major_one_indexed():
    mask = np.array([[0, 1, 1], [1, 0, 0], [0, 0, 1]], dtype=np.uint8)
    assert rle.encode(mask) == "2 3 9 1"  # the run 2..4 wraps from row 0 into row 1
    assert rle.encode(np.zeros((4, 4))) == "-1"
    assert rle.encode(np.ones((2, 3))) == "1 6"


@pytest.mark.parametrize("empty", ["-1", -1, "", "  ", None, float("nan"), "nan", -1.0])
def test_every_spelling_of_empty(empty):
    assert rle.decode(empty, (3, 4)).sum() == 0


def test_unordered_runs_are_accepted():
    np.testing.assert_array_equal(rle.decode("5 2 1 2", (2, 4)), rle.decode("1 2 5 2", (2, 4)))


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("1 2 3", "odd number"),
        ("1 x", "not an integer"),
        ("1.5 2", "not an integer"),
        ("0 2", "below 1"),
        ("-3 2", "below 1"),
        ("1 0", "length 0"),
        ("10 10", "ends at pixel"),
        ("1 5 3 2", "overlap"),
    ],
)
def test_bad_rle_names_the_image(text, fragment):
    with pytest.raises(RleError) as info:
        rle.decode(text, (4, 4), img_id="TRAIN_0042")
    assert "TRAIN_0042" in str(info.value) and fragment in str(info.value)


def test_encode_rejects_non_2d():
    with pytest.raises(ValueError):
        rle.encode(np.zeros((2, 2, 2)))
