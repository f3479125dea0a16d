"""The host path from decoded pixels to the device (issue 39, item 6): the pixels of a batch reach the
model as a view of the Arrow buffer they arrived in, not through Python lists and ``np.stack``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mlbatch.label.stages import stacked_pixels

S = 4


def _pictures(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (S, S, 3), dtype=np.uint8).tobytes() for _ in range(n)]


def _expected(values: list[bytes | None]) -> np.ndarray:
    return np.stack([np.frombuffer(v, np.uint8).reshape(S, S, 3) for v in values if v is not None])


def test_decoded_pixels_are_a_view_of_the_arrow_buffer_with_error_rows_left_out():
    values = _pictures(5)
    values[1] = values[3] = None                      # error rows: no pixels
    column = pa.chunked_array([pa.array(values, pa.binary())])
    pixels = stacked_pixels(column, S)
    np.testing.assert_array_equal(pixels, _expected(values))
    assert np.shares_memory(pixels, np.frombuffer(column.chunk(0).buffers()[2], np.uint8))   # no copy made


@pytest.mark.parametrize("shape", ["sliced", "chunked", "large", "all errors", "a null holding bytes"])
def test_every_arrow_layout_of_a_pixels_column_gives_the_decoded_rows_in_order(shape):
    values = _pictures(6)
    values[2] = None
    if shape == "sliced":                               # a batch cut out of a larger block: a non-zero offset
        column, values = pa.chunked_array([pa.array(values, pa.binary()).slice(1, 4)]), values[1:5]
    elif shape == "chunked":
        column = pa.chunked_array([pa.array(values[:3], pa.binary()), pa.array(values[3:], pa.binary())])
    elif shape == "large":
        column = pa.chunked_array([pa.array(values, pa.large_binary())])
    elif shape == "all errors":
        values = [None] * 3
        column = pa.chunked_array([pa.array(values, pa.binary())])
    else:                                               # Arrow allows a null's slot to hold bytes
        whole = pa.array([v or values[0] for v in values], pa.binary())
        validity = pa.array([v is not None for v in values]).buffers()[1]
        column = pa.chunked_array([pa.Array.from_buffers(pa.binary(), len(values), [validity, *whole.buffers()[1:]])])
    pixels = stacked_pixels(column, S)
    assert pixels.shape == (sum(v is not None for v in values), S, S, 3) and pixels.dtype == np.uint8
    if pixels.size:
        np.testing.assert_array_equal(pixels, _expected(values))
