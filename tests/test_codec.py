"""models.codec: compress/decompress round trips on a tiny seeded codec (no training, no download)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from latentcast.models.codec import CodecError, LatentCodec  # noqa: E402
from latentcast.proto.bitstream import BitstreamError, Packet, Roi, SectionKind  # noqa: E402


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, (13, 19, 3)).astype(np.float32)
    import cv2

    return cv2.resize(base, (300, 200), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)


def test_full_frame_round_trip_all_rates(tiny_codec, image):
    sizes = []
    for q in range(tiny_codec.n_rates):
        data = tiny_codec.compress(image, rate_point=q)
        rec = tiny_codec.decompress(data, decode_frame=False)
        assert rec.latent.shape == (48, 50, 75)
        assert rec.mask.all()
        assert rec.packet.header.rate_point == q
        sizes.append(len(data))
    assert sizes == sorted(sizes), f"higher rate points must cost more bytes: {sizes}"


def test_decoding_is_deterministic(tiny_codec, image):
    data = tiny_codec.compress(image, rate_point=3)
    a = tiny_codec.decompress(data, decode_frame=False).latent
    b = tiny_codec.decompress(data, decode_frame=False).latent
    assert np.array_equal(a, b)
    assert tiny_codec.compress(image, rate_point=3) == data


def test_roi_packet_is_smaller_and_keeps_z(tiny_codec, image):
    full = tiny_codec.compress(image, rate_point=3)
    roi = [Roi(x0=20, y0=30, x1=120, y1=110, label_id=3, score=0.9)]
    part = tiny_codec.compress(image, roi, rate_point=3)
    pf, pr = Packet.from_bytes(full), Packet.from_bytes(part)
    assert pr.header.roi_only and pr.header.rois[0].label_id == 3
    assert pr.sections[SectionKind.Z] == pf.sections[SectionKind.Z]
    assert len(pr.sections[SectionKind.Y]) < 0.6 * len(pf.sections[SectionKind.Y])
    rec = tiny_codec.decompress(part, decode_frame=False)
    assert 0 < rec.mask.sum() < rec.mask.size
    # the full-frame packet may still carry the ROI list for analytics
    both = tiny_codec.compress(image, roi, rate_point=3, roi_only=False)
    assert Packet.from_bytes(both).header.rois == pr.header.rois
    assert tiny_codec.decompress(both, decode_frame=False).mask.all()


def test_coded_background_sits_between_roi_only_and_full_frame(tiny_codec, image):
    """ROI cells at rate point 3, the rest at a coarser one (LCF v2); every level decodes exactly."""
    roi = [Roi(x0=20, y0=30, x1=120, y1=110, label_id=3, score=0.9)]
    full = tiny_codec.compress(image, rate_point=3)
    only = tiny_codec.compress(image, roi, rate_point=3)
    rec_full = tiny_codec.decompress(full, decode_frame=False)
    sizes = []
    for bg in range(4):
        data = tiny_codec.compress(image, roi, rate_point=3, background=bg)
        p = Packet.from_bytes(data)
        assert p.header.version == 2 and p.header.bg_rate_point == bg and p.header.roi_only
        assert p.sections[SectionKind.Z] == Packet.from_bytes(full).sections[SectionKind.Z]
        rec = tiny_codec.decompress(data, decode_frame=False)  # raises on any symbol mismatch
        assert rec.mask.all()
        sizes.append(len(data))
        # the encoder's ŷ is the decoder's, cell for cell
        y, z = tiny_codec.analyze(image)
        from latentcast.proto.grid import coded_cells
        h, w = image.shape[:2]
        tx, cr = coded_cells(w, h, [(r.x0, r.y0, r.x1, r.y1) for r in roi], roi_only=True, rate_point=3,
                             bg_rate_point=bg)
        assert (cr[~tx] == 3).all() and set(np.unique(cr)) <= {bg, 3}
    assert len(only) < sizes[0] < sizes[2] and sizes[3] <= len(full) + 16
    # the background at the ROIs' own rate point codes exactly the full frame's symbols
    rec_same = tiny_codec.decompress(tiny_codec.compress(image, roi, rate_point=3, background=3), decode_frame=False)
    assert np.array_equal(rec_same.latent, rec_full.latent)
    assert Packet.from_bytes(tiny_codec.compress(image, roi, rate_point=3, background=3)).header.symbol_crc == \
        Packet.from_bytes(full).header.symbol_crc


def test_background_arguments_are_checked(tiny_codec, image):
    roi = [Roi(x0=20, y0=30, x1=120, y1=110)]
    for bad in (4, -1, 1.5, "0", True):
        with pytest.raises(ValueError, match=r"background .* out of range: None \(ROIs only\) or a rate point 0\.\.2"):
            tiny_codec.compress(image, roi, rate_point=2, background=bad)
    # a full-frame packet codes every cell at its rate point: the background level does not apply
    assert tiny_codec.compress(image, roi, rate_point=2, roi_only=False, background=0) == \
        tiny_codec.compress(image, roi, rate_point=2, roi_only=False)


def test_symbol_corruption_is_detected_not_rendered(tiny_codec, image):
    data = tiny_codec.compress(image, rate_point=1)
    p = Packet.from_bytes(data)
    y = bytearray(p.sections[SectionKind.Y])
    y[len(y) // 2] ^= 0x5A
    bad = Packet(header=p.header, sections={SectionKind.Z: p.sections[SectionKind.Z], SectionKind.Y: bytes(y)})
    with pytest.raises((CodecError, ValueError)):
        tiny_codec.decompress(bad.to_bytes(), decode_frame=False)
    flipped = bytearray(data)
    flipped[40] ^= 1
    with pytest.raises(BitstreamError):
        tiny_codec.decompress(bytes(flipped), decode_frame=False)


def test_foreign_weights_are_refused(tiny_codec, image):
    import dataclasses

    data = tiny_codec.compress(image, rate_point=0)
    p = Packet.from_bytes(data)
    other = dataclasses.replace(p.header, weights_hash=b"\x00" * 8)
    with pytest.raises(CodecError, match="weights hash"):
        tiny_codec.decompress(Packet(header=other, sections=p.sections).to_bytes())
    other = dataclasses.replace(p.header, codec_id=2)
    with pytest.raises(CodecError, match="codec_id 2"):
        tiny_codec.decompress(Packet(header=other, sections=p.sections).to_bytes())


def test_bad_arguments_name_the_value(tiny_codec, image):
    with pytest.raises(ValueError, match="rate_point 9 out of range 0..3"):
        tiny_codec.compress(image, rate_point=9)
    with pytest.raises(ValueError, match="uint8 RGB"):
        tiny_codec.compress(image.astype(np.float32))
    with pytest.raises(FileNotFoundError, match="no codec weights named"):
        LatentCodec.load("no-such-codec")


def test_weight_file_round_trip(tiny_codec_path, tiny_codec):
    again = LatentCodec.from_file(tiny_codec_path)
    assert again.weights_hash == tiny_codec.weights_hash
    for a, b in zip(again.y_tables.freqs, tiny_codec.y_tables.freqs):
        assert np.array_equal(a, b)


def test_oversized_frame_is_refused_before_decoding(tiny_codec, image):
    import dataclasses

    p = Packet.from_bytes(tiny_codec.compress(image, rate_point=0))
    huge = dataclasses.replace(p.header, width=16384, height=16384)
    with pytest.raises(CodecError, match="16384x16384"):
        tiny_codec.decompress(Packet(header=huge, sections=p.sections).to_bytes(), decode_frame=False)


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_sections_never_crash_the_decoder(tiny_codec, image, data):
    """Valid container, hostile payload: only codec/entropy errors, never a crash or a hang."""
    from latentcast.proto.entropy import EntropyError

    small = image[:64, :96]
    p = Packet.from_bytes(tiny_codec.compress(small, rate_point=3))
    kind = data.draw(st.sampled_from([SectionKind.Z, SectionKind.Y]))
    payload = bytearray(p.sections[kind])
    n = data.draw(st.integers(1, 8))
    for _ in range(n):
        if payload:
            i = data.draw(st.integers(0, len(payload) - 1))
            payload[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        payload = payload[: data.draw(st.integers(0, len(payload))) // 4 * 4]
    sections = dict(p.sections)
    sections[kind] = bytes(payload)
    try:
        rec = tiny_codec.decompress(Packet(header=p.header, sections=sections).to_bytes(), decode_frame=False)
    except (CodecError, EntropyError):
        return
    assert np.isfinite(rec.latent).all()


def test_weights_hash_is_over_content_not_file_layout(tiny_codec_path, tmp_path):
    """Re-writing the same weights (another file layout) keeps the hash; changing one value changes it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from latentcast.models.codec import weights_content_hash

    with safe_open(str(tiny_codec_path), framework="pt") as f:
        md = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}
    again = tmp_path / "again.safetensors"
    save_file(dict(reversed(list(sd.items()))), str(again), metadata=md)
    assert LatentCodec.from_file(again).weights_hash == LatentCodec.from_file(tiny_codec_path).weights_hash
    key = next(k for k in sorted(sd) if sd[k].is_floating_point() and sd[k].numel())
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] += 1
    assert weights_content_hash(sd, md) != LatentCodec.from_file(tiny_codec_path).weights_hash
    assert weights_content_hash(sd, {**md, "meta": "{}x"}) != weights_content_hash(sd, md)
