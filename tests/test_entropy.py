"""proto.entropy / proto.symbols / proto.grid: exact round trips, escapes, corrupt input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latentcast.proto.entropy import (
    PRECISION,
    EntropyError,
    SymbolDecoder,
    SymbolEncoder,
    TableSet,
    gaussian_tables,
    quantize_pmf,
)
from latentcast.proto.grid import anchor_mask, grid_shape, roi_mask, transmit_mask

SCALES = 0.11 * np.exp(np.arange(64) * np.log(64 / 0.11) / 63)


@pytest.fixture(scope="module")
def tables() -> TableSet:
    return TableSet.centered(gaussian_tables(SCALES))


def test_tables_are_normalised_and_positive(tables):
    for f in tables.freqs:
        assert int(f.sum()) == 1 << PRECISION
        assert f.min() >= 1
    packed = TableSet.from_packed(*tables.packed())
    assert all(np.array_equal(a, b) for a, b in zip(packed.freqs, tables.freqs))


def test_quantize_pmf_rejects_bad_input():
    with pytest.raises(ValueError, match="negative or non-finite"):
        quantize_pmf(np.array([0.5, -0.1, 0.6]))
    with pytest.raises(ValueError, match="1-D"):
        quantize_pmf(np.ones((2, 2)))


def test_round_trip_with_escapes(tables, rng):
    idx = rng.integers(0, len(tables), 5000)
    vals = np.round(rng.normal(0, SCALES[idx])).astype(np.int64)
    vals[:20] = rng.integers(-100000, 100000, 20)  # far outside every table: escape path
    idx2 = rng.integers(0, len(tables), 300)
    vals2 = rng.integers(-3, 4, 300)
    enc = SymbolEncoder()
    enc.encode(vals, idx, tables)
    enc.encode(vals2, idx2, tables)
    data = enc.to_bytes()
    dec = SymbolDecoder(data)
    assert np.array_equal(dec.decode(idx, tables), vals)
    assert np.array_equal(dec.decode(idx2, tables), vals2)


def test_rate_follows_the_model(tables, rng):
    """Real bytes come close to the ideal information content (no estimated rates)."""
    idx = np.full(20000, 30)
    vals = np.round(rng.normal(0, SCALES[30], idx.size)).astype(np.int64)
    enc = SymbolEncoder()
    enc.encode(vals, idx, tables)
    nbytes = len(enc.to_bytes())
    f = tables.freqs[30].astype(np.float64) / (1 << PRECISION)
    ideal_bits = -np.log2(f[vals - tables.offsets[30]]).sum()
    assert ideal_bits / 8 <= nbytes <= ideal_bits / 8 * 1.01 + 8


def test_truncated_stream_is_an_error(tables):
    with pytest.raises(EntropyError, match="32-bit words"):
        SymbolDecoder(b"\x01\x02\x03")


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=256).filter(lambda b: len(b) % 4 == 0))
def test_garbage_streams_decode_or_fail_cleanly(data):
    tables = TableSet.centered(gaussian_tables(SCALES[:8]))
    idx = np.arange(50) % 8
    try:
        out = SymbolDecoder(data).decode(idx, tables)
    except EntropyError:
        return
    assert out.shape == (50,)


def test_roi_mask_margin_and_bounds():
    assert grid_shape(768, 576) == (36, 48)
    def span(m):
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        return rows[0], rows[-1], cols[0], cols[-1]

    # 8 px margin: x 112..388 -> cells 7..24, y 32..308 -> cells 2..19
    assert span(roi_mask([(120, 40, 380, 300)], 768, 576)) == (2, 19, 7, 24)
    assert span(roi_mask([(120, 40, 380, 300)], 768, 576, margin_px=0)) == (2, 18, 7, 23)
    assert span(roi_mask([(4, 4, 20, 20)], 768, 576, margin_px=16)) == (0, 2, 0, 2)  # clipped at 0
    assert not roi_mask([], 768, 576).any()
    assert transmit_mask(768, 576, [], False).all()
    with pytest.raises(ValueError, match="outside"):
        roi_mask([(0, 0, 800, 10)], 768, 576)


def test_anchor_mask_is_a_checkerboard():
    a = anchor_mask(3, 4)
    assert a[0, 0] and not a[0, 1] and not a[1, 0] and a[1, 1]
    assert a.sum() == 6


def test_code_lengths_are_what_the_decoder_counts(tables):
    """``TableSet.code_lengths`` (what an RDOQ encoder weighs) equals the information the decoder accounts for
    each symbol, inside the tables' direct range and escaped beyond it."""
    from latentcast.proto.symbols import RDOQ_RADIUS

    lengths = tables.code_lengths(RDOQ_RADIUS)
    assert lengths.shape == (len(tables), 2 * RDOQ_RADIUS + 1)
    rng = np.random.default_rng(3)
    for t in (0, 5, 30, 63):  # narrow tables escape most of ±32, wide ones none
        values = rng.integers(-RDOQ_RADIUS, RDOQ_RADIUS + 1, 200)
        enc = SymbolEncoder()
        enc.encode(values, np.full(values.size, t), tables)
        dec = SymbolDecoder(enc.to_bytes())
        assert np.array_equal(dec.decode(np.full(values.size, t), tables), values)
        assert dec.info_bits == pytest.approx(float(lengths[t, values + RDOQ_RADIUS].sum()), rel=1e-12)
    with pytest.raises(ValueError, match="radius -1"):
        tables.code_lengths(-1)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 4.0))
def test_quantize_y_keeps_the_cheaper_neighbour(tables, seed, lam):
    """Each symbol is the floor or the ceiling of r, whichever has the smaller (r - s)² + λ·bits(s); λ = 0
    is plain rounding exactly."""
    from latentcast.proto.symbols import RDOQ_RADIUS, quantize_y

    rng = np.random.default_rng(seed)
    r = rng.normal(0, rng.uniform(0.1, 40), (3, 5, 7))
    table = rng.integers(0, len(tables), r.shape)
    lengths = tables.code_lengths(RDOQ_RADIUS)
    s = quantize_y(r, table, lengths, lam)
    assert np.all((s == np.floor(r)) | (s == np.floor(r) + 1))
    if lam == 0:
        assert np.array_equal(s, np.floor(r + 0.5))
    bits = lengths[table, np.clip(s, -RDOQ_RADIUS, RDOQ_RADIUS).astype(np.int64) + RDOQ_RADIUS]
    other = np.where(s == np.floor(r), np.floor(r) + 1, np.floor(r))
    bits_o = lengths[table, np.clip(other, -RDOQ_RADIUS, RDOQ_RADIUS).astype(np.int64) + RDOQ_RADIUS]
    assert np.all((r - s) ** 2 + lam * bits <= (r - other) ** 2 + lam * bits_o + 1e-12)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.05"])
def test_rdoq_lambda_is_checked(bad):
    from latentcast.proto.symbols import check_rdoq

    with pytest.raises(ValueError, match=r"rdoq .* out of range: a number >= 0 \(0 = plain rounding"):
        check_rdoq(bad)
