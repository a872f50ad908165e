"""The Q8 block format (q8kv.format) against a float64 reference and GGML's Q8_0."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from reference import QBLOCK, dequantize_ref, quantize_ref, roundf_ref, roundtrip_bound

from q8kv import format as q8

F32 = np.float32


def check_roundtrip(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``x``; assert the codes and scales equal the reference bit for bit, the
    float32 dequantization is the rounded exact product, and the per element error bound."""
    x = np.asarray(x, dtype=F32)
    codes, scales = q8.quantize(x)
    ref_codes, ref_scales = quantize_ref(x)
    assert codes.dtype == np.int8 and codes.shape == x.shape
    assert scales.dtype == F32 and scales.shape == x.shape[:-1] + (x.shape[-1] // QBLOCK,)
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(scales.view(np.uint32), ref_scales.view(np.uint32))
    assert codes.min() >= -127  # -128 is never produced
    exact = dequantize_ref(codes, scales)
    deq = q8.dequantize(codes, scales)
    assert deq.dtype == F32
    np.testing.assert_array_equal(deq, exact.astype(F32))
    error = np.abs(exact - x.astype(np.float64))
    bound = roundtrip_bound(scales, x.shape[-1])
    worst = np.argmax(error - bound)
    assert np.all(error <= bound), (x.ravel()[worst], exact.ravel()[worst], bound.ravel()[worst])
    # A code never has the opposite sign of its value.
    assert np.all(codes.astype(np.float64) * x >= 0)
    return codes, scales


def gguf_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGML Q8_0 of ``x`` [rows, D] by the gguf package: (int8 codes, fp16 scales)."""
    raw = gguf.quants.quantize(np.asarray(x, dtype=F32), gguf.GGMLQuantizationType.Q8_0)
    blocks = raw.reshape(-1, 2 + QBLOCK)  # per block: fp16 d, then 32 int8 codes
    d = blocks[:, :2].copy().view(np.float16).reshape(x.shape[0], -1)
    codes = blocks[:, 2:].copy().view(np.int8).reshape(x.shape)
    return codes, d


# -- against the float64 reference -------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("magnitude", [1e-30, 1e-3, 1.0, 7.5, 1e4, 1e30])
def test_random_blocks_match_reference(seed: int, magnitude: float) -> None:
    """Random blocks of many magnitudes: codes/scales equal the float32-rounded float64
    steps exactly, and |dequant - x| <= d/2 (1 + eps) per element."""
    rng = np.random.default_rng(1000 * seed + int(np.log10(magnitude) + 40))
    x = rng.standard_normal((16, 4 * QBLOCK)) * magnitude
    x *= rng.uniform(0.01, 100.0, size=(16, 4, 1)).repeat(QBLOCK, axis=-1).reshape(16, -1)
    check_roundtrip(x)


def test_batched_shapes_quantize_per_block() -> None:
    """Quantizing a [2, n, KVH, D] stack equals quantizing each vector on its own."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 5, 3, 256)).astype(F32)
    codes, scales = check_roundtrip(x)
    for index in np.ndindex(x.shape[:-1]):
        c, s = q8.quantize(x[index])
        np.testing.assert_array_equal(codes[index], c)
        np.testing.assert_array_equal(scales[index], s)


def test_scale_is_max_over_127_in_float32() -> None:
    """d is the float32 quotient max|x| / 127, per block (not per vector)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 128)).astype(F32)
    _, scales = q8.quantize(x)
    amax = np.abs(x.reshape(3, 4, QBLOCK)).max(axis=-1)
    np.testing.assert_array_equal(scales, amax / F32(127))


def test_rejects_head_dim_not_multiple_of_32() -> None:
    """The last dimension must be whole blocks."""
    with pytest.raises(ValueError, match="multiple of 32"):
        q8.quantize(np.ones((2, 48), dtype=F32))


# -- zero blocks -------------------------------------------------------------------------


def test_zero_blocks() -> None:
    """An all-zero block has d = 0 and codes 0, also next to nonzero blocks of one vector,
    and dequantizes to exact zeros (no NaN from 0 * inf)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 4 * QBLOCK)).astype(F32)
    x[:, QBLOCK : 2 * QBLOCK] = 0
    x[2] = 0
    x[3, 3 * QBLOCK :] = -0.0
    with np.errstate(divide="raise", over="raise", invalid="raise"):
        codes, scales = check_roundtrip(x)
    assert np.all(scales[:, 1] == 0) and np.all(scales[2] == 0) and scales[3, 3] == 0
    assert np.all(codes[:, QBLOCK : 2 * QBLOCK] == 0) and np.all(codes[2] == 0)
    assert np.all(scales[[0, 1, 3]][:, [0, 2]] > 0)
    deq = q8.dequantize(codes, scales)
    assert np.all(deq[2] == 0) and np.all(np.isfinite(deq))


# -- ties --------------------------------------------------------------------------------


def tie_block(unit: float) -> tuple[np.ndarray, np.ndarray]:
    """A block whose d is exactly ``unit`` (max 127 * unit), with values that are exact
    ties x * id = k + 0.5 of both signs; returns (block, expected codes)."""
    halves = [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 63.5, -63.5, 64.5, -64.5, 125.5, -125.5, 126.5]
    halves += [-126.5, 0.49999997, -0.49999997, 0.50000006, -0.50000006, 1.4999999, 2.5000002]
    y = np.array([127.0, -127.0] + halves, dtype=F32)
    y = np.concatenate([y, np.full(QBLOCK - y.size, 3.0, dtype=F32)])
    expected = np.array([roundf_ref(v) for v in y]).astype(np.int8)
    return (y * F32(unit)).astype(F32), expected


@pytest.mark.parametrize("unit", [1.0, 2.0, 0.25, 2.0**-20, 2.0**40])
def test_ties_round_half_away_from_zero(unit: float) -> None:
    """x * id exactly k + 0.5 rounds away from zero for both signs (C roundf, not rint), and
    0.49999997 rounds to 0 (floor(|y| + 0.5) in float32 would give 1)."""
    x, expected = tie_block(unit)
    d = np.abs(x).max() / F32(127)
    assert d == F32(unit) and np.all(x * (F32(1) / d) == x / F32(unit))  # the ties are exact
    codes, scales = check_roundtrip(x[None])
    assert scales[0, 0] == F32(unit)
    np.testing.assert_array_equal(codes[0], expected)
    spot = dict(zip(x / F32(unit), codes[0], strict=True))
    assert spot[F32(0.5)] == 1 and spot[F32(-0.5)] == -1
    assert spot[F32(2.5)] == 3 and spot[F32(-2.5)] == -3
    assert spot[F32(126.5)] == 127 and spot[F32(-126.5)] == -127
    assert spot[F32(0.49999997)] == 0 and spot[F32(-0.49999997)] == 0
    assert spot[F32(0.50000006)] == 1 and spot[F32(1.4999999)] == 1


def test_roundf_rounds_ties_away_from_zero_beside_a_nan() -> None:
    """A NaN among the values (roundf finds ties with one reduction, which a NaN poisons)
    leaves every other value rounded as C roundf: the ties away from zero."""
    rng = np.random.default_rng(7)
    y = (rng.integers(-100, 100, 64) + 0.5).astype(np.float32)
    y[rng.integers(64)] = np.nan
    got = q8.roundf(y)
    finite = ~np.isnan(y)
    np.testing.assert_array_equal(got[finite], roundf_ref(y[finite]))
    assert np.isnan(got[~finite]).all()


def test_roundf_function() -> None:
    """q8.roundf is C roundf on float32, where the naive float32 formulas fail."""
    y = np.array(
        [
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            -2.5,
            0.49999997,
            -0.49999997,
            0.0,
            -0.0,
            8388607.5,
            8388609.0,
            -8388609.0,
            1e30,
            126.49999,
            126.5,
            -127.5,
        ],
        dtype=F32,
    )
    np.testing.assert_array_equal(q8.roundf(y), roundf_ref(y).astype(F32))
    naive = np.floor(np.abs(y) + F32(0.5)) * np.sign(y)
    assert naive[6] == 1.0 and q8.roundf(y)[6] == 0.0  # why the naive formula is not used
    assert np.rint(y)[0] == 0.0 and q8.roundf(y)[0] == 1.0  # why rint is not used


# -- extremes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "amax",
    [
        3.4e38,
        3.3895314e38,
        1e30,
        65504.0,
        1.0,
        1e-20,
        1.1754944e-38 * 127 * 4,
        1e-36,
        3e-37,
        1e-37,
        1.1754944e-38,
        1e-38,
        1e-40,
        1.4e-45 * 127 * 3,
        1e-44,
        1.4e-45,
    ],
)
def test_extremes(amax: float) -> None:
    """Huge, tiny and subnormal magnitudes with mixed signs: the max element maps to
    +-127 (sign of the value) whenever d is not 0, the bound holds, nothing is NaN.

    Below max|x| ~ 3.7e-37, 1/d overflows float32 and the format divides by d instead; below
    127 * 2**-150, d rounds to 0 and the block reads back as zeros (error < 2**-142).
    (Float32 values within a few ulps of FLT_MAX read back as inf: 127 * d rounds past
    FLT_MAX. The format is fixed; 3.4e38 and bf16's max 3.3895314e38 still read back.)"""
    rng = np.random.default_rng(int(-np.log10(amax) * 100) % 2**31)
    x = (rng.uniform(-1, 1, size=(6, 2 * QBLOCK)) * amax).astype(F32)
    x[:, 5] = 0
    x[:, 7] = -x[:, 8]  # exact opposite values
    peak = rng.integers(10, 2 * QBLOCK, size=6)
    x[np.arange(6), peak] = np.where(np.arange(6) % 2, -amax, amax)
    with np.errstate(divide="raise", over="raise", invalid="raise"):
        codes, scales = check_roundtrip(x)
    assert np.all(np.isfinite(q8.dequantize(codes, scales)))
    for row in range(6):
        block = peak[row] // QBLOCK
        if scales[row, block] > 0:
            assert codes[row, peak[row]] == (-127 if row % 2 else 127)
        else:
            assert np.all(codes[row, block * QBLOCK : (block + 1) * QBLOCK] == 0)
    assert np.all(codes[:, 7] == -codes[:, 8])


def test_max_element_maps_to_127_everywhere() -> None:
    """For many random blocks, the element of largest |x| always gets code +-127."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2000, QBLOCK)) * 10.0 ** rng.uniform(-30, 30, (2000, 1))).astype(F32)
    codes, _ = q8.quantize(x)
    top = np.argmax(np.abs(x), axis=-1)
    at = (np.arange(2000), top)
    np.testing.assert_array_equal(np.abs(codes[at]), 127)
    np.testing.assert_array_equal(np.sign(codes[at]), np.sign(x[at]))


# -- property based ----------------------------------------------------------------------

# Up to 3.4e38: within a few ulps of FLT_MAX, 127 * d overflows (see test_extremes).
LIMIT = float(np.float32(3.4e38))
finite_f32 = st.floats(-LIMIT, LIMIT, width=32, allow_subnormal=True)


@settings(max_examples=300, deadline=None)
@given(
    hnp.arrays(
        F32,
        st.tuples(st.integers(1, 3), st.sampled_from([QBLOCK, 2 * QBLOCK, 4 * QBLOCK])),
        elements=finite_f32,
    )
)
def test_roundtrip_property(x: np.ndarray) -> None:
    """Any finite float32 input: exact match with the reference and the error bound."""
    with np.errstate(divide="raise", over="raise", invalid="raise"):
        check_roundtrip(x)


@settings(max_examples=200, deadline=None)
@given(
    scale=st.floats(1e-30, 1e30),
    ints=hnp.arrays(np.int64, QBLOCK, elements=st.integers(-254, 254)),
)
def test_roundtrip_property_near_ties(scale: float, ints: np.ndarray) -> None:
    """Values on a half-integer grid of d hit ties and near ties often."""
    x = (ints.astype(np.float64) / 2 * scale).astype(F32)[None]
    if not np.any(x):
        x[0, 0] = F32(scale)
    check_roundtrip(x)


# -- GGML Q8_0 ---------------------------------------------------------------------------


def ggml_blocks() -> np.ndarray:
    """Blocks GGML quantizes defined-ly (max|x| >= 1e-36): random of many magnitudes,
    ties, zero blocks, mixed signs, fp16-overflowing scales."""
    rng = np.random.default_rng(20240601)
    rows = [rng.standard_normal((64, QBLOCK)) * 10.0 ** rng.uniform(-35, 35, (64, 1))]
    rows.append(rng.uniform(-1, 1, (64, QBLOCK)) * 10.0 ** rng.uniform(-3, 3, (64, 1)))
    rows.append(np.round(rng.uniform(-254, 254, (64, QBLOCK))) / 2)  # ties of d = 1
    rows.append(np.abs(rng.standard_normal((8, QBLOCK))))
    rows.append(-np.abs(rng.standard_normal((8, QBLOCK))))
    rows.append(np.zeros((5, QBLOCK)))  # 216 blocks in all: 54 rows of 4
    rows.extend(tie_block(unit)[0][None] for unit in (1.0, 2.0**-10, 2.0**10))
    return np.concatenate(rows).astype(F32)


def test_codes_identical_to_ggml_q8_0() -> None:
    """Our codes equal the gguf package's Q8_0 codes for the same blocks, exactly; our
    float32 d rounded to fp16 equals its fp16 d bit for bit."""
    blocks = ggml_blocks()
    x = blocks.reshape(-1, 4 * QBLOCK)  # 4 blocks per row, as head_dim = 128
    codes, scales = q8.quantize(x)
    with np.errstate(all="ignore"):  # fp16 overflow of huge scales, in both
        ref_codes, ref_d = gguf_q8_0(x)
        ours_d16 = scales.astype(np.float16)
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(ours_d16.view(np.uint16), ref_d.view(np.uint16))
    # Where fp16 holds d as a normal number, it is within fp16 rounding of ours.
    normal = np.isfinite(ref_d) & (np.abs(ref_d) >= np.finfo(np.float16).tiny)
    assert normal.sum() > 100
    np.testing.assert_allclose(ref_d[normal].astype(np.float64), scales[normal], rtol=2.0**-11)


def test_ggml_dequantize_agrees_with_fp16_scale() -> None:
    """Dequantizing GGML's blocks with our float32 d differs from GGML's only by its fp16 d."""
    x = np.random.default_rng(9).standard_normal((32, 128)).astype(F32)
    codes, scales = q8.quantize(x)
    raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).reshape(x.shape)
    ours = q8.dequantize(codes, scales)
    bound = np.repeat(scales, QBLOCK, axis=-1) * 127 * 2.0**-11
    assert np.all(np.abs(theirs - ours) <= bound)


def test_format_is_self_contained() -> None:
    """q8kv.format is the contract both sides import: it loads no other q8kv module (the
    client's --verify must not pull in the server)."""
    code = (
        "import sys, q8kv.format; "
        "print(sorted(m for m in sys.modules if m.startswith('q8kv.') and m != 'q8kv.format'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_backends_share_the_one_layout_definition() -> None:
    """The server's backends use q8kv.format's layout objects, not copies of them."""
    from q8kv.server.backends import base

    for name in ("QBLOCK", "BYTES_PER_BLOCK", "DEFAULT_PAGE_CODE_BYTES", "LayerLayout",
                 "page_bytes", "tokens_per_page"):
        assert getattr(base, name) is getattr(q8, name), name
