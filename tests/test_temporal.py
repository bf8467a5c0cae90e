"""Temporal coding: T section, edge encoder and cloud decoder in lockstep, loss recovery, fitting, rate control."""

from __future__ import annotations

import numpy as np
import pytest

from latentcast.proto.bitstream import BitstreamError, Packet, Roi, SectionKind, StreamContext
from latentcast.proto.temporal import (
    BG,
    BGCODE,
    CAMERA_RANGE,
    CODE,
    KEEP,
    KIND_KEY,
    KIND_P,
    KIND_P_MC,
    MV_RANGE,
    Motion,
    TemporalError,
    TemporalInfo,
    TemporalState,
    TemporalTables,
    choose_modes,
    choose_motion,
    code_lengths,
    decode_p,
    encode_p,
    interior_cells,
    motion_predict,
    rd_prune,
    search_camera,
    search_motion,
)

W = H = 128
BOX = 32


def _background(seed: int = 0) -> np.ndarray:
    r = np.random.default_rng(seed)
    small = r.integers(40, 200, size=(H // 16, W // 16, 3)).astype(np.uint8)
    return np.kron(small, np.ones((16, 16, 1), dtype=np.uint8))


def _frame(t: int, bg: np.ndarray) -> tuple[np.ndarray, list[Roi]]:
    """A textured background with a bright square moving right 4 px per frame; its ROI."""
    f = bg.copy()
    x = 8 + 4 * t
    f[40:40 + BOX, x:x + BOX] = (250, 240, 20)
    return f, [Roi(x0=x, y0=40, x1=x + BOX, y1=40 + BOX, label_id=0, score=0.9)]


def _flat_tables(M: int, n_rates: int, scale: int = 30) -> TemporalTables:
    return TemporalTables.flat(M=M, n_rates=n_rates, scale=scale)


@pytest.fixture(scope="module")
def edge_encoder(loud_bundle):
    """The loud tiny codec's edge (conftest ``loud_codec``): the moving square codes cells, so the edge/cloud
    tests compare latents that P frames changed. Tests that take it decode with ``loud_codec``."""
    from latentcast.edge.encoder import EdgeEncoder

    return EdgeEncoder(bundle=loud_bundle)


def _pair(edge_encoder, loud_codec, tables=None, **cfg):
    from latentcast.edge.temporal import TemporalConfig, TemporalEncoder
    from latentcast.models.temporal import TemporalDecoder

    tables = tables or _flat_tables(loud_codec.M, loud_codec.n_rates)
    config = TemporalConfig(mode="temporal", **({"refresh_s": 0.0} | cfg))
    return (TemporalEncoder(compressor=edge_encoder, tables=tables, config=config, fps=10.0),
            TemporalDecoder(codec=loud_codec, tables=tables))


# ----------------------------------------------------------------------------- wire format


def test_info_round_trip_and_errors():
    info = TemporalInfo(kind=KIND_P, frame_id=7, ref_id=6, key_id=0, bg_rate_point=1)
    assert TemporalInfo.from_bytes(info.to_bytes()) == info
    with pytest.raises(TemporalError, match="kind 9"):
        TemporalInfo(kind=9, frame_id=0, ref_id=0, key_id=0)
    with pytest.raises(TemporalError, match="keyframe depends on nothing"):
        TemporalInfo(kind=KIND_KEY, frame_id=3, ref_id=2, key_id=3)
    with pytest.raises(TemporalError, match="frame_id -1"):
        TemporalInfo(kind=KIND_P, frame_id=-1, ref_id=0, key_id=0)
    with pytest.raises(TemporalError, match="expected 14"):
        TemporalInfo.from_bytes(b"\0" * 5)


def test_p_symbols_round_trip_with_every_mode(tiny_codec, rng):
    M, h, w = tiny_codec.M, 4, 6
    state = TemporalState.from_key(rng.normal(size=(M, h, w)).round(2), frame_id=0)
    state.fg[0, :2] = True
    roi = np.zeros((h, w), bool)
    roi[1:3, 1:4] = True
    changed = roi.copy()
    changed[3, 4:] = True  # a background change outside the ROI
    y = state.y + np.where(changed[None], rng.normal(scale=3.0, size=state.y.shape), 0.0)
    modes, sym = choose_modes(state, y, roi, step=1.0, bg_step=2.0, threshold=1, bg_threshold=M // 2)
    assert set(np.unique(modes)) >= {CODE, BG, BGCODE} and (modes[roi] != BG).all()
    tables = _flat_tables(M, tiny_codec.n_rates)
    data, crc = encode_p(state, modes, sym, tables=tables, y_tables=tiny_codec.y_tables, rate_point=1, bg_rate_point=0)
    m2, s2, crc2, mv2 = decode_p(state, data, tables=tables, y_tables=tiny_codec.y_tables, rate_point=1,
                                 bg_rate_point=0)
    assert mv2 is None
    assert crc2 == crc and np.array_equal(m2, modes) and np.array_equal(s2, sym)
    before = state.copy()
    state.apply(modes, sym, step=1.0, bg_step=2.0, frame_id=1)
    assert np.array_equal(state.y[:, modes == KEEP], before.y[:, modes == KEEP])
    assert np.array_equal(state.y[:, modes == BG], before.bg[:, modes == BG])
    assert np.abs(state.y[:, modes == CODE] - y[:, modes == CODE]).max() <= 0.5  # quantized with step 1
    assert not state.fg[modes == BG].any() and state.fg[modes == CODE].all()


# ----------------------------------------------------------------------------- motion (P_MC frames)


def _smooth_latent(rng, M=8, h=12, w=16) -> np.ndarray:
    """A latent that varies smoothly over the cells (so a shifted copy is predictable), on the 2**-8 grid."""
    base = rng.normal(size=(M, h // 4 + 2, w // 4 + 2))
    up = np.kron(base, np.ones((1, 4, 4)))[:, :h, :w]
    k = np.ones(3) / 3
    for ax in (1, 2):
        up = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), ax, up)
    return np.round(up * 4 * 256) / 256


def test_motion_predict_moves_cells_exactly(rng):
    y = _smooth_latent(rng)
    mv = np.zeros((2, *y.shape[1:]), dtype=np.int64)
    assert np.array_equal(motion_predict(y, mv), y)  # no vector: the latent itself
    mv[0, 5, 6], mv[1, 5, 6] = 4, -4  # one whole cell down and one left: the content of cell (4, 7)
    mv[0, 0, 0] = 4  # from above the grid: the edge row repeats
    mv[1, 2, 3] = 2  # half a cell: the mean of cells (2, 2) and (2, 3), rounded to 8 fractional bits
    p = motion_predict(y, mv)
    assert np.array_equal(p[:, 5, 6], y[:, 4, 7]) and np.array_equal(p[:, 0, 0], y[:, 0, 0])
    assert np.array_equal(p[:, 2, 3], np.floor((y[:, 2, 2] + y[:, 2, 3]) / 2 * 256 + 0.5) / 256)
    untouched = np.ones(y.shape[1:], bool)
    untouched[5, 6] = untouched[0, 0] = untouched[2, 3] = False
    assert np.array_equal(p[:, untouched], y[:, untouched])
    assert np.array_equal(p * 256, np.round(p * 256))  # dyadic: the same on every machine


def test_search_finds_the_shift_that_made_the_frame(rng):
    y_prev = _smooth_latent(rng)
    true = np.zeros((2, *y_prev.shape[1:]), dtype=np.int64)
    true[0], true[1] = 3, -2  # everything moved 3/4 cell down, half a cell left
    y = motion_predict(y_prev, true)
    (dy, dx), l1 = search_motion(y_prev, y, (3, 9, 4, 12), step=0.25)
    assert (dy, dx) == (3, -2) and l1.shape == (6, 8) and l1.max() < 0.01  # only the rounding to 2**-8
    with pytest.raises(ValueError, match="mv_range 9 out of range 0..4"):
        search_motion(y_prev, y, (3, 9, 4, 12), step=0.25, mv_range=9)


def test_motion_frames_round_trip_and_save_bits(tiny_codec, rng):
    """A closed loop over frames where the ROI's content moves: edge and cloud states stay identical,
    the vectors decode as sent, and P_MC frames are smaller than P frames of the same content."""
    from latentcast.proto.grid import transmit_mask

    M = tiny_codec.M
    tables = _flat_tables(M, tiny_codec.n_rates)
    world = _smooth_latent(rng, M=M, h=12, w=40)
    sizes = {}
    for use_motion in (False, True):
        edge = TemporalState.from_key(world[:, :, :16].copy(), frame_id=0)
        cloud = edge.copy()
        total = 0
        for t in range(1, 6):
            y = edge.y.copy()
            y[:, 2:10, 4:12] = world[:, 2:10, 4 + t:12 + t]  # an object whose texture slides one cell left a frame
            roi = transmit_mask(16 * 16, 12 * 16, [(4 * 16, 2 * 16, 12 * 16, 10 * 16)], True)
            mv = choose_motion(edge, y, roi, [(2, 10, 4, 12)], step=0.5) if use_motion else None
            modes, sym = choose_modes(edge, y, roi, step=0.5, bg_step=1.0, threshold=1, bg_threshold=M, mv=mv)
            motion = None
            if mv is not None:
                mv = np.where((modes == CODE)[None], mv, 0)
                assert np.abs(mv).max() <= MV_RANGE and mv.any()
                motion = Motion(cells=mv)
            data, crc = encode_p(edge, modes, sym, tables=tables, y_tables=tiny_codec.y_tables, rate_point=0,
                                 bg_rate_point=0, motion=motion)
            m2, s2, crc2, motion2 = decode_p(cloud, data, tables=tables, y_tables=tiny_codec.y_tables, rate_point=0,
                                             bg_rate_point=0, motion=mv is not None)
            assert crc2 == crc and np.array_equal(m2, modes) and np.array_equal(s2, sym)
            assert (motion2 is None) == (mv is None)
            assert mv is None or (np.array_equal(motion2.cells, mv) and motion2.camera == (0, 0))
            edge.apply(modes, sym, step=0.5, bg_step=1.0, frame_id=t, motion=motion)
            cloud.apply(m2, s2, step=0.5, bg_step=1.0, frame_id=t, motion=motion2)
            np.testing.assert_array_equal(cloud.y, edge.y)  # exact, not close
            total += len(data)
        sizes[use_motion] = total
    assert sizes[True] < 0.8 * sizes[False], sizes


@pytest.mark.parametrize("junk", [b"\xff" * 8, b"\x00" * 8, b"\x7f\x13\x88\x01" * 4, b"\x01\x02\x03"])
def test_junk_motion_sections_are_refused_or_decode_in_range(tiny_codec, junk):
    """Bytes that are no P_MC frame: a precise error, or values a state can take (the packet's symbol CRC
    is what catches the rest)."""
    from latentcast.proto.entropy import EntropyError

    tables = _flat_tables(tiny_codec.M, tiny_codec.n_rates)
    state = TemporalState.from_key(np.zeros((tiny_codec.M, 3, 3)), frame_id=0)
    try:
        modes, sym, _, mv = decode_p(state, junk, tables=tables, y_tables=tiny_codec.y_tables, rate_point=0,
                                     bg_rate_point=0, motion=True)
    except (TemporalError, EntropyError) as exc:
        assert str(exc)
        return
    assert np.abs(mv.cells).max() <= MV_RANGE and not mv.cells[:, modes != CODE].any()
    state.apply(modes, sym, step=1.0, bg_step=1.0, frame_id=1, motion=mv)


def test_edge_and_cloud_hold_the_same_latent_with_motion(edge_encoder, loud_codec):
    """The shipped encoder with motion on (the default) against the cloud's decoder: identical latents every
    frame; its P frames are P or P_MC frames."""
    enc, dec = _pair(edge_encoder, loud_codec, motion=True)
    bg = _background()
    for t in range(8):
        f, rois = _frame(t, bg)
        data = enc.encode(f, rois)
        info = TemporalInfo.from_bytes(_parse(data, loud_codec).sections[SectionKind.T])
        assert info.kind in ((KIND_KEY,) if t == 0 else (KIND_P, KIND_P_MC))
        dec.decompress(data)
        np.testing.assert_array_equal(dec.state.y, enc.state.y)
    assert enc.counts["p"] == 7 and 0 <= enc.counts["p_mc"] <= 7


def test_camera_motion_moves_the_whole_state(tiny_codec, rng):
    """A panning camera: the edge finds the camera's vector, both latents move by it, the cloud follows exactly."""
    M = tiny_codec.M
    tables = _flat_tables(M, tiny_codec.n_rates)
    world = _smooth_latent(rng, M=M, h=12, w=40)
    edge = TemporalState.from_key(world[:, :, 8:24].copy(), frame_id=0)
    cloud = edge.copy()
    roi = np.zeros(edge.fg.shape, bool)
    for t in range(1, 4):
        y = world[:, :, 8 - t:24 - t]  # the camera pans left one cell a frame: the content moves right
        camera = search_camera(edge.y, y, step=1.0)
        assert camera == (0, 4)
        moved = edge.moved(camera)
        modes, sym = choose_modes(moved, y, roi, step=0.5, bg_step=1.0, threshold=1, bg_threshold=M // 2)
        motion = Motion(camera=camera)
        data, crc = encode_p(moved, modes, sym, tables=tables, y_tables=tiny_codec.y_tables, rate_point=0,
                             bg_rate_point=0, motion=motion)
        m2, s2, crc2, motion2 = decode_p(cloud, data, tables=tables, y_tables=tiny_codec.y_tables, rate_point=0,
                                         bg_rate_point=0, motion=True)
        assert crc2 == crc and motion2.camera == camera and not motion2.cells.any()
        assert (modes == KEEP).mean() > 0.8  # only the column that entered the frame changed
        edge.apply(modes, sym, step=0.5, bg_step=1.0, frame_id=t, motion=motion)
        cloud.apply(m2, s2, step=0.5, bg_step=1.0, frame_id=t, motion=motion2)
        np.testing.assert_array_equal(cloud.y, edge.y)
        np.testing.assert_array_equal(cloud.bg, edge.bg)
    with pytest.raises(TemporalError, match="camera vector"):
        Motion(camera=(CAMERA_RANGE + 1, 0))
    with pytest.raises(ValueError, match="camera_range 9"):
        search_camera(edge.y, edge.y, step=1.0, camera_range=9)


def test_edge_and_cloud_follow_a_panning_camera(edge_encoder, loud_codec):
    """temporal.camera_motion with the shipped encoder and the cloud's decoder: identical latents. (The tiny
    random codec's latents are below one quantization step, so what it finds is not asserted: the exact
    following of a camera's vector is test_camera_motion_moves_the_whole_state's.)"""
    enc, dec = _pair(edge_encoder, loud_codec, camera_motion=True, scene_change=1.0)
    wide = np.concatenate([_background(1), _background(2)], axis=1)
    for t in range(6):
        f = np.ascontiguousarray(wide[:, 16 * t: 16 * t + W])  # one cell a frame
        data = enc.encode(f, [])
        dec.decompress(data)
        np.testing.assert_array_equal(dec.state.y, enc.state.y)
        np.testing.assert_array_equal(dec.state.bg, enc.state.bg)
    assert enc.counts["key"] == 1 and enc.counts["p"] == 5


def test_rd_prune_keeps_the_cells_that_pay_for_their_bits(tiny_codec, rng):
    M = tiny_codec.M
    tables = _flat_tables(M, tiny_codec.n_rates)
    lengths = code_lengths(tiny_codec.y_tables)
    state = TemporalState.from_key(np.zeros((M, 2, 3)), frame_id=0)
    y = np.zeros((M, 2, 3))
    y[:, 0, 0] = rng.normal(scale=4.0, size=M)  # a large change
    y[0, 0, 1] = 0.6  # one symbol just over half a step
    roi = np.ones((2, 3), bool)
    modes, sym = choose_modes(state, y, roi, step=1.0, bg_step=1.0, threshold=1, bg_threshold=M)
    assert modes[0, 0] == CODE and modes[0, 1] == CODE and (modes[1] == KEEP).all()
    args = dict(step=1.0, tables=tables, lengths=lengths, rate_point=0)
    same = rd_prune(state, y, modes, sym, weight=0.0, **args)
    assert np.array_equal(same[0], modes) and np.array_equal(same[1], sym)
    m2, s2 = rd_prune(state, y, modes, sym, weight=0.02, **args)
    assert m2[0, 0] == CODE and m2[0, 1] == KEEP and not s2[:, 0, 1].any()  # 0.36 - 0.16 < 0.02 * its bits
    assert np.array_equal(s2[:, 0, 0], sym[:, 0, 0])
    m3, _ = rd_prune(state, y, modes, sym, weight=100.0, **args)
    assert (m3 == KEEP).all()


def test_interior_cells_are_a_whole_cell_inside_their_box():
    got = interior_cells([(0, 0, 64, 64), (136, 8, 200, 72)], (6, 14))
    want = np.zeros((6, 14), dtype=bool)
    want[1:3, 1:3] = True  # cells 0..3 are whole inside the first box; its border ring is not interior
    want[2, 10:11] = True  # the second: whole cells 9..11 x 1..3, less the ring: (2, 10)
    np.testing.assert_array_equal(got, want)
    assert not interior_cells([(0, 0, 40, 40)], (6, 14)).any()  # too small to have an inside
    assert interior_cells([(0, 0, 96, 96)], (4, 4)).sum() == 9  # clipped to the grid: rows and cols 1..3


def test_interior_threshold_codes_fewer_cells_inside_boxes(edge_encoder, loud_codec):
    """The task-aware rule: inside a box a cell needs ``interior_threshold`` nonzero symbols, on its border
    ``threshold``; the cloud decodes the stream unchanged and holds the edge's latent."""
    from latentcast.edge.config import TemporalConfig

    bg = _background()
    rng = np.random.default_rng(4)
    texture = np.kron(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), np.ones((16, 16, 1), dtype=np.uint8))
    coded = {}
    for interior in (0, 10**6):
        enc, dec = _pair(edge_encoder, loud_codec, interior_threshold=interior, scene_change=1.0)  # no cuts
        inside = border = 0
        for t in range(6):
            f, x = bg.copy(), 8 + 6 * t
            f[32:96, x:x + 80] = texture  # a large object (it has an inside) moving 6 px a frame
            box = Roi(x0=x, y0=32, x1=x + 80, y1=96, label_id=0, score=0.9)
            dec.decompress(enc.encode(f, [box]))
            np.testing.assert_array_equal(dec.state.y, enc.state.y)
            if t:
                mask = interior_cells([(box.x0, box.y0, box.x1, box.y1)], enc.state.coded.shape)
                inside += int((enc.state.coded & mask).sum())
                border += int((enc.state.coded & ~mask).sum())
        coded[interior] = inside, border
    print(coded)
    assert coded[0][0] > 0 and coded[10**6][0] == 0  # inside: coded by the plain rule, never with the high one
    assert coded[10**6][1] > 0  # the border still is
    with pytest.raises(ValueError, match="interior_threshold -1 must be an integer >= 0"):
        TemporalConfig(interior_threshold=-1)


def test_keyframes_with_a_coarser_background(edge_encoder, loud_codec):
    """``temporal.key_background``: a keyframe codes the cells outside the ROIs at a coarser rate point (an LCF v2
    packet with both levels); it is smaller, and the cloud holds the edge's latent through it and the P frames."""
    from latentcast.cloud.decode import describe_packet
    from latentcast.edge.config import TemporalConfig

    bg = _background()
    sizes = {}
    for key_bg in (-1, 0):
        enc, dec = _pair(edge_encoder, loud_codec, key_rate_point=3, key_background=key_bg, refresh_s=0.3)
        out = []
        for t in range(5):  # keyframes at 0 and 3
            data = enc.encode(*_frame(t, bg))
            pk = _parse(data, loud_codec)
            out.append(len(data))
            if t in (0, 3):
                assert pk.header.bg_rate_point == (None if key_bg < 0 else 0) and pk.header.rate_point == 3
                assert describe_packet(pk) == "temporal key q3" + ("" if key_bg < 0 else " bg q0")
            dec.decompress(data)
            np.testing.assert_array_equal(dec.state.y, enc.state.y)
            np.testing.assert_array_equal(dec.state.bg, enc.state.bg)
        sizes[key_bg] = out
    assert sizes[0][0] < 0.8 * sizes[-1][0] and sizes[0][3] < 0.8 * sizes[-1][3]
    with pytest.raises(ValueError, match="key_background -2 must be a rate point index >= 0, or -1"):
        TemporalConfig(key_background=-2)


def test_edge_and_cloud_hold_the_same_latent_with_rd(edge_encoder, loud_codec):
    enc, dec = _pair(edge_encoder, loud_codec, rd=0.05)
    bg = _background()
    for t in range(6):
        f, rois = _frame(t, bg)
        dec.decompress(enc.encode(f, rois))
        np.testing.assert_array_equal(dec.state.y, enc.state.y)


def test_tables_save_load_and_wrong_codec(tmp_path, tiny_codec):
    t = _flat_tables(tiny_codec.M, tiny_codec.n_rates)
    p = tmp_path / "t.safetensors"
    t.save(p, weights_hash=tiny_codec.weights_hash)
    back = TemporalTables.load(p, weights_hash=tiny_codec.weights_hash)
    assert np.array_equal(back.mode_freqs, t.mode_freqs) and np.array_equal(back.res_scale, t.res_scale)
    with pytest.raises(TemporalError, match="refit"):
        TemporalTables.load(p, weights_hash=b"\1" * 8)
    with pytest.raises(FileNotFoundError, match="latentcast train temporal"):
        TemporalTables.load(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------- edge + cloud


def _parse(data: bytes, codec) -> Packet:
    """A packet of a test stream: compact P frames are read in the stream's context (the tiny codec, W x H)."""
    return Packet.from_bytes(data, stream=StreamContext(codec_id=codec.codec_id, weights_hash=codec.weights_hash,
                                                        latent_space_id=codec.latent_space_id, width=W, height=H))


def test_edge_and_cloud_hold_the_same_latent(edge_encoder, loud_codec):
    enc, dec = _pair(edge_encoder, loud_codec)
    bg = _background()
    sizes, coded = [], 0
    for t in range(10):
        f, rois = _frame(t, bg)
        data = enc.encode(f, rois)
        pk = _parse(data, loud_codec)
        info = TemporalInfo.from_bytes(pk.sections[SectionKind.T])
        assert (info.kind == KIND_KEY) == (t == 0) and info.frame_id == t
        assert (SectionKind.Z in pk.sections) == (t == 0)
        rec = dec.decompress(data)
        assert rec.frame.shape == (H, W, 3)
        np.testing.assert_array_equal(dec.state.y, enc.state.y)  # exact, not close
        np.testing.assert_array_equal(dec.state.bg, enc.state.bg)
        sizes.append(len(data))
        coded += int(enc.state.coded.sum()) if t else 0
    assert coded >= 9  # the square's cells were coded: the latents compared are ones P frames changed
    assert max(sizes[1:]) < sizes[0] / 2  # only the moving square's cells after the keyframe
    assert enc.counts["key"] == 1 and enc.counts["p"] == 9 and enc.counts["p_mc"] > 0  # P_MC: the square moved


def test_channel_gains_code_over_time_too(tiny_gain_codec, tiny_gain_bundle):
    """A codec with per-channel steps: P frames quantize each channel with its own step, edge and cloud alike."""
    from latentcast.edge.encoder import EdgeEncoder

    enc, dec = _pair(EdgeEncoder(bundle=tiny_gain_bundle), tiny_gain_codec)
    assert enc.steps[0].shape == (tiny_gain_codec.M, 1, 1)
    bg = _background()
    for t in range(6):
        data = enc.encode(*_frame(t, bg))
        assert dec.decompress(data).frame.shape == (H, W, 3)
        np.testing.assert_array_equal(dec.state.y, enc.state.y)
    assert enc.counts["p"] == 5


def test_a_compact_p_frame_before_any_keyframe_is_a_missing_reference(edge_encoder, loud_codec):
    """A cloud that restarted (or a new subscriber's decoder) gets a compact P frame first: it asks for a keyframe
    instead of failing to parse, and the keyframe that follows decodes."""
    from latentcast.models.temporal import MissingReference

    enc, _ = _pair(edge_encoder, loud_codec)
    bg = _background()
    enc.encode(*_frame(0, bg))
    p_frame = enc.encode(*_frame(1, bg))
    _, fresh = _pair(edge_encoder, loud_codec)
    with pytest.raises(MissingReference, match="compact P frame .* no keyframe"):
        fresh.decompress(p_frame)
    assert fresh.counts["missing_reference"] == 1
    enc.request_refresh()
    assert fresh.decompress(enc.encode(*_frame(2, bg))).frame.shape == (H, W, 3)


def test_a_static_scene_codes_no_cell(edge_encoder, loud_codec):
    enc, dec = _pair(edge_encoder, loud_codec)
    f, rois = _frame(0, _background())
    key = enc.encode(f, rois)
    dec.decompress(key)
    y0 = dec.state.y.copy()
    for _ in range(3):
        data = enc.encode(f, rois)
        pk = _parse(data, loud_codec)
        # flat mode tables: 2 bits per cell and no residual
        assert len(pk.sections[SectionKind.Y]) <= dec.state.fg.size // 4 + 8, len(pk.sections[SectionKind.Y])
        rec = dec.decompress(data)
        assert rec.mask.all() and not dec.last_coded.any()
        np.testing.assert_array_equal(dec.state.y, y0)


def test_periodic_and_scene_change_keyframes(edge_encoder, loud_codec):
    enc, _ = _pair(edge_encoder, loud_codec, refresh_s=0.3)  # 3 frames at 10 fps
    bg = _background()
    kinds = [TemporalInfo.from_bytes(_parse(enc.encode(*_frame(t, bg)), loud_codec).sections[SectionKind.T]).kind
             for t in range(7)]
    assert [k == KIND_KEY for k in kinds] == [True, False, False, True, False, False, True]  # P or P_MC between
    enc, _ = _pair(edge_encoder, loud_codec, scene_change=0.3, bg_rate_point=3, bg_threshold=1)
    enc.encode(*_frame(0, bg))
    f, rois = _frame(1, _background(seed=5))  # another scene
    assert TemporalInfo.from_bytes(_parse(enc.encode(f, rois), loud_codec).sections[SectionKind.T]).is_key
    assert enc.counts["scene_change"] == 1


def test_loss_never_renders_from_a_missing_reference_and_recovers_on_refresh(edge_encoder, loud_codec):
    """Drop random packets: from a loss until the next keyframe that arrives, every frame is refused (never
    rendered from a missing reference); each refusal asks for a keyframe, and the next packet is one."""
    from latentcast.models.temporal import MissingReference

    enc, dec = _pair(edge_encoder, loud_codec)
    bg = _background()
    lost = set(np.random.default_rng(3).choice(np.arange(2, 40), size=8, replace=False).tolist())
    broken, refused_at, kinds, rendered = False, [], [], 0
    for t in range(40):
        data = enc.encode(*_frame(t % 20, bg))
        info = TemporalInfo.from_bytes(_parse(data, loud_codec).sections[SectionKind.T])
        kinds.append(info.kind)
        if t in lost:
            broken = True
            continue
        if info.is_key:
            broken = False
        try:
            rec = dec.decompress(data)
        except MissingReference:
            assert broken, f"frame {t} refused although nothing it depends on was lost"
            refused_at.append(t)
            enc.request_refresh()  # the cloud's refresh request over the back channel
            continue
        assert not broken, f"frame {t} was rendered although a frame it depends on was lost"
        np.testing.assert_array_equal(dec.state.y, enc.state.y)  # exactly the edge's own reconstruction
        assert rec.frame is not None
        rendered += 1
    assert refused_at and all(kinds[t + 1] == KIND_KEY for t in refused_at if t + 1 < len(kinds))
    assert rendered + len(refused_at) + len(lost) == 40 and enc.counts["refresh_requested"] == len(refused_at)


def test_p_frame_with_another_size_or_codec_is_refused(edge_encoder, loud_codec):
    from latentcast.models.codec import CodecError
    from latentcast.models.temporal import MissingReference

    enc, dec = _pair(edge_encoder, loud_codec)
    bg = _background()
    dec.decompress(enc.encode(*_frame(0, bg)))
    p = _parse(enc.encode(*_frame(1, bg)), loud_codec)
    bad = Packet(header=type(p.header)(**{**p.header.__dict__, "weights_hash": b"\2" * 8}), sections=p.sections)
    with pytest.raises(CodecError, match="weights hash"):
        dec.decompress(bad)
    other = TemporalInfo(kind=KIND_P, frame_id=5, ref_id=4, key_id=0)
    forged = Packet(header=p.header, sections={**p.sections, SectionKind.T: other.to_bytes()})
    with pytest.raises(MissingReference, match="predicted from frame 4"):
        dec.decompress(forged)
    dec.decompress(p)  # the real one still applies: a refused packet changes nothing
    with pytest.raises(BitstreamError, match="compact P frame .* stream's context"):
        loud_codec.decompress(enc.encode(*_frame(2, bg)))  # a P frame on its own: nothing says its codec
    with pytest.raises(CodecError, match="decode it in its stream"):
        loud_codec.decompress(Packet(header=p.header, sections=p.sections).to_bytes())  # the same in LCF v1


# ----------------------------------------------------------------------------- fitting and rate control


def test_fitted_tables_code_in_fewer_bytes_than_flat_ones(edge_encoder, loud_codec, tmp_path):
    from latentcast.tools.fit_temporal_tables import fit_tables

    bg = _background()

    def frames():
        for t in range(12):
            f, rois = _frame(t, bg)
            yield t, f, [(r.x0, r.y0, r.x1, r.y1) for r in rois]

    tables, stats = fit_tables(loud_codec, frames(), train=lambda i: i % 4 != 0, key_rate_point=2)
    assert stats["train_frames"] == 9 and stats["residual_symbols"] > 0
    assert tables.meta["motion"] is True  # fitted as the edge codes by default
    tables.save(tmp_path / "t.safetensors", weights_hash=loud_codec.weights_hash)  # its metadata is plain JSON
    totals = {}
    for name, t in (("flat", _flat_tables(loud_codec.M, loud_codec.n_rates)), ("fitted", tables)):
        enc, dec = _pair(edge_encoder, loud_codec, tables=t)
        n = 0
        for i in range(12):
            data = enc.encode(*_frame(i, bg))
            dec.decode_state(data)
            n += len(data) if i else 0
        totals[name] = n
    assert totals["fitted"] < 0.9 * totals["flat"], totals


def test_rate_controller_moves_toward_the_target():
    from latentcast.edge.temporal import LEVELS, RateController

    cost = [4000, 2500, 1800, 1200, 800, 500, 300]  # bytes per frame at each level, finest first
    rc = RateController(target_kbps=8 * 10 * 900 / 1000, fps=10.0, level=0)  # 900 B/frame
    seen = []
    for _ in range(300):
        rc.update(cost[rc.level])
        seen.append(rc.level)
    tail = [cost[lv] for lv in seen[-100:]]
    assert 500 <= np.mean(tail) <= 1300 and set(seen[-100:]) <= {3, 4, 5}
    assert len(LEVELS) == len(cost)
    rc = RateController(target_kbps=8 * 10 * 2000 / 1000, fps=10.0, level=len(LEVELS) - 1)  # 2000 B/frame: finer
    seen = []
    for _ in range(1000):
        rc.update(cost[rc.level])
        seen.append(rc.level)
    tail = seen[-500:]
    assert set(tail) <= {1, 2} and 1600 <= np.mean([cost[lv] for lv in tail]) <= 2400  # around the target
    with pytest.raises(ValueError, match="target_kbps > 0"):
        RateController(target_kbps=0, fps=10)


def test_encoder_under_rate_control_stays_near_its_target(edge_encoder, loud_codec):
    enc, dec = _pair(edge_encoder, loud_codec, target_kbps=1.5)
    bg = _background()
    sizes = []
    for t in range(40):
        data = enc.encode(*_frame(t % 20, bg))
        dec.decode_state(data)
        sizes.append(len(data))
    assert enc.rate.level > 4  # 1.5 kbit/s at 10 fps = 19 B/frame: pushed to the coarse end of the ladder
    enc.request_refresh()
    key = Packet.from_bytes(enc.encode(*_frame(0, bg)))
    assert SectionKind.Z in key.sections and key.header.rate_point < 2  # coarse levels: cheaper keyframes


def test_shipped_tables_match_the_shipped_codec():
    from latentcast.models.codec import LatentCodec
    from latentcast.models.temporal import default_tables_path

    codec = LatentCodec.load("elic-lite")
    t = TemporalTables.load(default_tables_path(codec), weights_hash=codec.weights_hash)
    assert t.M == codec.M and t.n_rates == codec.n_rates
    assert "held_out" in t.meta and t.meta["train_frames"] > 0


def test_bench_temporal_runs_rate_control_and_loss(tmp_path, tiny_codec_path, tiny_codec, tiny_bundle):
    """`latentcast bench temporal` end to end on 16 vtest frames with the tiny codec."""
    import json

    from latentcast.tools.cli import main
    from tests.conftest import shared_or_skip

    shared_or_skip()
    tables = tmp_path / "t.safetensors"
    _flat_tables(tiny_codec.M, tiny_codec.n_rates).save(tables, weights_hash=tiny_codec.weights_hash)
    out = tmp_path / "tb.json"
    assert main(["bench", "temporal", "--weights", str(tiny_codec_path), "--bundle", str(tiny_bundle), "--tables",
                 str(tables), "--max-frames", "16", "--targets", "20", "--loss", "0.2", "--threads", "1",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    runs = {r["run"]: r for r in res["runs"]}
    assert set(runs) == {"fixed q0/t1", "target 20 kbit/s", "fixed q0/t1, 20% loss", "target 20 kbit/s, 20% loss"}
    clean = runs["fixed q0/t1"]
    assert clean["frames"] == 16 and clean["keyframes"] == 1 and clean["lost"] == clean["refused"] == 0
    lossy = runs["fixed q0/t1, 20% loss"]
    assert lossy["lost"] > 0 and lossy["keyframes"] > 1 and lossy["refused"] > 0
    cost = {(r["cost"]["edge"], r["cost"]["cloud"]): r for r in res["cost_runs"]}
    assert set(cost) == {(e, c) for e in ("whole frame", "changed cells") for c in ("whole frame", "changed cells")
                         } | {("changed cells, halo crops", "changed cells")}  # the older bundles' edge too
    staged, crops = cost[("changed cells", "changed cells")], cost[("changed cells, halo crops", "changed cells")]
    assert staged["kbps"] > 0 and crops["kbps"] > 0
    for r in cost.values():
        assert r["frames"] == 16 and r["cost"]["rendered"] == 16 and r["cost"]["edge_ms_p50"] > 0
    ref = cost[("whole frame", "whole frame")]
    assert "psnr_vs_reference_db" not in ref["cost"]
    assert cost[("changed cells", "changed cells")]["cost"]["psnr_vs_reference_db"]["min"] > 20
    assert out.with_suffix(".md").read_text().count("\n| ") >= 5 + 6


def test_info_shows_the_temporal_section(tmp_path, edge_encoder, loud_codec, capsys):
    import json

    from latentcast.tools.cli import main

    enc, _ = _pair(edge_encoder, loud_codec)
    bg = _background()
    enc.encode(*_frame(0, bg))
    p = tmp_path / "p.lcf"
    p.write_bytes(enc.encode(*_frame(1, bg)))
    assert main(["info", str(p)]) == 0
    out = json.loads(capsys.readouterr().out)
    t = out["temporal"]
    assert (t["kind"], t["frame_id"], t["ref_id"], t["key_id"]) == ("P", 1, 0, 0)
    # the default P frame is the compact one: 26 bytes around its Y section, its stream's fields left out
    assert out["compact"] and out["version"] == 3 and out["width"] is None and out["header_bytes"] == 26



def test_edge_ignores_a_refresh_request_older_than_its_last_keyframe():
    """The cloud asks about a frame sent before a keyframe that is already on its way: no second keyframe."""
    from latentcast.edge.app import EdgeApp
    from latentcast.edge.config import EdgeConfig
    from latentcast.proto import latentcast_v1_pb2 as pb

    class _Enc:
        asked = 0

        def request_refresh(self, reason="requested"):
            self.asked += 1

    app = EdgeApp(EdgeConfig())
    app.temporal, app._last_key_seq = _Enc(), 10
    app._on_refresh(pb.RefreshRequest(seq=7, reason="lost"))
    assert app.temporal.asked == 0 and app.refresh_ignored == 1
    app._on_refresh(pb.RefreshRequest(seq=12, reason="lost"))
    assert app.temporal.asked == 1 and app.refresh_requests == 2


# ----------------------------------------------------------------------------- rendering what changed


def _big_frame(t: int) -> tuple[np.ndarray, list[Roi]]:
    """384 x 384 (a 24 x 24 cell grid): a textured background and a square moving 6 px per frame (the edge
    recomputes y within g_a's reach of it, so the grid is big enough for that to be a part of it)."""
    r = np.random.default_rng(3)
    f = np.kron(r.integers(40, 200, size=(24, 24, 3)), np.ones((16, 16, 1))).astype(np.uint8)
    x = 30 + 6 * t
    f[96:128, x:x + 32] = (250, 240, 20)
    return f, [Roi(x0=x, y0=96, x1=x + 32, y1=128, label_id=0, score=0.9)]


def test_tiled_render_is_the_whole_render_within_a_band(edge_encoder, loud_codec):
    from latentcast.models.temporal import TemporalDecoder
    from latentcast.tools.eval.metrics import psnr

    enc, tiled = _pair(edge_encoder, loud_codec, rate_point=3, bg_rate_point=3, bg_threshold=1, scene_change=1.0)
    whole = TemporalDecoder(codec=loud_codec, tables=tiled.tables, tiled=False)
    for t in range(8):
        data = enc.encode(*_big_frame(t))
        a, b = whole.decompress(data), tiled.decompress(data)
        np.testing.assert_array_equal(whole.state.y, tiled.state.y)  # the state is exact either way
        assert psnr(a.frame, b.frame) >= 40.0, t
        assert np.abs(a.latent - b.latent).max() < 0.05 * np.ptp(a.latent), (t, np.ptp(a.latent))
    n = tiled.counts["render_tiled"]
    assert tiled.counts["render_whole"] + n == 8 and n >= 5  # the keyframe (and a frame with much change) whole
    assert 0 < tiled.counts["render_cells"] < n * 24 * 24 * 0.6
    assert whole.counts["render_tiled"] == 0


def test_a_tiled_frame_is_its_latent_converted_whole(edge_encoder, loud_codec):
    """A pixel latent space's frame is pasted where the latent was (the rest kept from the last render): the
    same bytes as converting the frame's whole latent, in order, skipped and out of order."""
    import torch

    enc, tiled = _pair(edge_encoder, loud_codec, rate_point=3, bg_rate_point=3, bg_threshold=1, scene_change=1.0)
    packets = [enc.encode(*_big_frame(t)) for t in range(8)]
    tiled.decompress(packets[0])
    renders = [tiled.prepare(p) for p in packets[1:]]
    for k in (0, 1, 3, 2, 4, 5, 6):  # frame 3 (after 2 was skipped), then 2 (behind: whole), then on
        rec = renders[k](True)
        want = loud_codec.latent_to_frame(torch.from_numpy(rec.latent)[None], 384, 384)
        np.testing.assert_array_equal(rec.frame, want)
        assert rec.frame.flags.owndata and rec.frame.flags.writeable  # the caller's own array
        rec.frame[:] = 0  # ... which it may write: the next frame is unaffected
    assert tiled.counts["render_tiled"] >= 4, tiled.counts


def test_renders_out_of_order_or_skipped_stay_correct(edge_encoder, loud_codec):
    from latentcast.models.temporal import TemporalDecoder
    from latentcast.tools.eval.metrics import psnr

    enc, tiled = _pair(edge_encoder, loud_codec, rate_point=3, bg_rate_point=3, bg_threshold=1, scene_change=1.0)
    whole = TemporalDecoder(codec=loud_codec, tables=tiled.tables, tiled=False)
    packets = [enc.encode(*_big_frame(t)) for t in range(6)]
    tiled.decompress(packets[0])
    whole.decompress(packets[0])
    renders = [tiled.prepare(p) for p in packets[1:]]
    wanted = [whole.decompress(p) for p in packets[1:]]
    # frame 3 first (frames 1 and 2 never rendered: their changes are rendered with it), then frame 1 (behind:
    # whole, and it does not replace the newer latent), then frame 5
    out3 = renders[2](True)
    assert psnr(out3.frame, wanted[2].frame) >= 40.0
    before = tiled.counts["render_whole"]
    out1 = renders[0](True)
    assert tiled.counts["render_whole"] == before + 1
    np.testing.assert_allclose(out1.latent, wanted[0].latent, atol=1e-5)
    out5 = renders[4](True)
    assert psnr(out5.frame, wanted[4].frame) >= 40.0
    assert tiled.counts["render_tiled"] >= 1, tiled.counts  # frame 5 at least renders only what changed since 3


def test_a_render_whose_changes_left_the_history_is_whole(edge_encoder, loud_codec):
    from latentcast.models import temporal as tm

    enc, tiled = _pair(edge_encoder, loud_codec, rate_point=3, bg_rate_point=3, bg_threshold=1, scene_change=1.0)
    whole = tm.TemporalDecoder(codec=loud_codec, tables=tiled.tables, tiled=False)
    packets = [enc.encode(*_big_frame(t % 20)) for t in range(tm._HISTORY + 4)]
    tiled.decompress(packets[0])
    renders = [tiled.prepare(p) for p in packets[1:]]  # none rendered: the history overflows
    for p in packets:
        want = whole.decompress(p)
    before = tiled.counts["render_whole"]
    got = renders[-1](True)
    assert tiled.counts["render_whole"] == before + 1
    np.testing.assert_allclose(got.latent, want.latent, atol=1e-5)


def test_a_forged_motion_flag_is_refused_and_leaves_the_state(edge_encoder, loud_codec):
    """A client that sets the compact P frame's motion flag on a frame coded without motion (CRC fixed up):
    the cloud refuses the frame, its state is untouched (apply runs in place, after every check), and the
    stream goes on once the edge sends a keyframe."""
    import struct
    import zlib

    from latentcast.models.codec import CodecError
    from latentcast.proto.bitstream import FLAG_MOTION, FLAG_ROI_ONLY

    enc, dec = _pair(edge_encoder, loud_codec, motion=False)
    bg = _background()
    dec.decompress(enc.encode(*_frame(0, bg)))
    data = bytearray(enc.encode(*_frame(1, bg)))
    assert data[5] == FLAG_ROI_ONLY
    data[5] = FLAG_ROI_ONLY | FLAG_MOTION
    body = bytes(data[:-4])
    forged = body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)
    before = dec.state.copy()
    with pytest.raises((CodecError, TemporalError, ValueError)):
        dec.decompress(forged)
    np.testing.assert_array_equal(dec.state.y, before.y)
    np.testing.assert_array_equal(dec.state.bg, before.bg)
    assert dec.state.frame_id == before.frame_id
    enc.request_refresh()
    dec.decompress(enc.encode(*_frame(2, bg)))  # the keyframe the cloud asks for
    dec.decompress(enc.encode(*_frame(3, bg)))
    np.testing.assert_array_equal(dec.state.y, enc.state.y)


def _choose_modes_whole_grid(state, y, roi, *, step, bg_step, threshold, bg_threshold, deadzone=0.0, mv=None):
    """choose_modes' definition, quantizing the whole grid both ways (what the edge did before it quantized
    each cell once)."""
    def q(r, s):
        if deadzone == 0.0:
            return np.floor(r / s + 0.5)
        return np.sign(r) * np.maximum(np.floor(np.abs(r) / s + 0.5 - deadzone), 0.0)

    y = np.asarray(y, dtype=np.float64)
    s_fg, s_bg = q(y - state.y, step), q(y - state.bg, bg_step)
    code = roi & ((s_fg != 0).sum(0) >= threshold)
    if mv is not None and code.any():
        moved = motion_predict(state.y, np.where(code[None], mv, 0))
        s_fg = np.where(code[None], q(y - moved, step), s_fg)
    bgcode = ~roi & ((s_bg != 0).sum(0) >= bg_threshold)
    modes = np.full(roi.shape, KEEP)
    modes[~roi & state.fg] = BG
    modes[code] = CODE
    modes[bgcode] = BGCODE
    return modes, np.where(code[None], s_fg, np.where(bgcode[None], s_bg, 0.0)).astype(np.int64)


@pytest.mark.parametrize("gains", [False, True])
@pytest.mark.parametrize("deadzone", [0.0, 0.25])
def test_choose_modes_equals_its_whole_grid_definition(rng, gains, deadzone):
    """Each cell quantized once, against what its mode codes it from, gives the modes and symbols of
    quantizing the whole grid against both latents: with and without motion, scalar and per-channel steps."""
    M, h, w = 12, 9, 11
    for trial in range(4):
        state = TemporalState.from_key(rng.normal(size=(M, h, w)).round(3), frame_id=0)
        state.bg = state.y + rng.normal(scale=0.5, size=state.y.shape).round(3)
        state.fg = rng.random((h, w)) < 0.3
        y = (state.y + rng.normal(scale=1.5, size=state.y.shape) * (rng.random((1, h, w)) < 0.6)).astype(np.float32)
        roi = rng.random((h, w)) < 0.4
        step = rng.uniform(0.5, 2.0, size=(M, 1, 1)) if gains else 0.75
        bg_step = rng.uniform(1.0, 3.0, size=(M, 1, 1)) if gains else 1.5
        mv = rng.integers(-MV_RANGE, MV_RANGE + 1, size=(2, h, w)) if trial % 2 else None
        threshold = 1 + trial if trial < 3 else rng.integers(1, 5, size=(h, w))  # one per cell (interior_threshold)
        kw = dict(step=step, bg_step=bg_step, threshold=threshold, bg_threshold=M // 3, deadzone=deadzone, mv=mv)
        modes, sym = choose_modes(state, y, roi, **kw)
        want_modes, want_sym = _choose_modes_whole_grid(state, y, roi, **kw)
        assert np.array_equal(modes, want_modes) and np.array_equal(sym, want_sym)
        assert set(np.unique(modes)) >= {KEEP, CODE}
