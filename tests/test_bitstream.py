"""Tests for the LCF v1 frame-packet container (latentcast.proto.bitstream)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentcast.proto import bitstream as bs
from latentcast.proto.bitstream import (
    MAGIC,
    MAX_DIM,
    MAX_ROIS,
    MAX_SECTION_BYTES,
    MAX_SECTIONS,
    VERSION,
    BitstreamError,
    Packet,
    PacketHeader,
    Roi,
    SectionKind,
    describe,
    pack,
    unpack,
)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEWER = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MIB = 1024 * 1024


# ------------------------------------------------------------------------ strategies


@st.composite
def rois_in(draw, width: int, height: int) -> Roi:
    x0 = draw(st.integers(0, width - 1))
    x1 = draw(st.integers(x0 + 1, width))
    y0 = draw(st.integers(0, height - 1))
    y1 = draw(st.integers(y0 + 1, height))
    score = draw(
        st.one_of(
            st.floats(0.0, 1.0, allow_nan=False),
            st.integers(0, 255).map(lambda k: k / 255),
        )
    )
    return Roi(x0=x0, y0=y0, x1=x1, y1=y1, label_id=draw(st.integers(0, 0xFFFF)), score=score)


@st.composite
def packets(draw, max_rois: int = 6, max_payload: int = 48) -> Packet:
    width = draw(st.one_of(st.integers(1, 64), st.integers(1, MAX_DIM)))
    height = draw(st.one_of(st.integers(1, 64), st.integers(1, MAX_DIM)))
    rois = draw(st.lists(rois_in(width, height), max_size=max_rois))
    kinds = draw(st.sets(st.sampled_from(list(SectionKind)), min_size=1))
    sections = {k: draw(st.binary(max_size=max_payload)) for k in kinds}
    header = PacketHeader(
        codec_id=draw(st.integers(1, 0xFFFF)),
        weights_hash=draw(st.binary(min_size=8, max_size=8)),
        rate_point=draw(st.integers(0, 254)),
        latent_space_id=draw(st.integers(0, 255)),
        width=width,
        height=height,
        label_set_hash=draw(st.binary(min_size=4, max_size=4)),
        symbol_crc=draw(st.integers(0, 2**32 - 1)),
        roi_only=draw(st.booleans()),
        rois=tuple(rois),
    )
    return Packet(header=header, sections=sections)


def quantized(p: Packet) -> Packet:
    """``p`` with ROI scores rounded to the 1/255 grid, as they come back from the wire."""
    rois = tuple(dataclasses.replace(r, score=r.score_u8 / 255) for r in p.header.rois)
    return Packet(header=dataclasses.replace(p.header, rois=rois), sections=dict(p.sections))


def simple_packet(**header_overrides) -> Packet:
    kw = dict(
        codec_id=7,
        weights_hash=bytes(range(8)),
        rate_point=3,
        latent_space_id=1,
        width=64,
        height=48,
        label_set_hash=b"\x0a\x0b\x0c\x0d",
        symbol_crc=0xDEADBEEF,
        roi_only=True,
        rois=(Roi(x0=0, y0=0, x1=64, y1=48, label_id=1, score=0.5), Roi(x0=10, y0=5, x1=20, y1=9)),
    )
    kw.update(header_overrides)
    return Packet(
        header=PacketHeader(**kw),
        sections={SectionKind.Z: b"hyper", SectionKind.Y: b"latent-symbols", SectionKind.META: b"{}"},
    )


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def raw_packet(
    *,
    magic: bytes = MAGIC,
    version: int = 1,
    flags: int = 0,
    codec_id: int = 1,
    weights_hash: bytes = b"\x01" * 8,
    rate_point: int = 0,
    latent_space_id: int = 0,
    width: int = 64,
    height: int = 48,
    label_set_hash: bytes = b"\0" * 4,
    symbol_crc: int = 0,
    n_rois: int | None = None,
    n_sections: int | None = None,
    rois: tuple = (),
    sections: tuple = ((2, b"abc"),),
    lengths: tuple | None = None,
    payload: bytes | None = None,
    crc: int | None = None,
) -> bytes:
    """Assemble a packet byte by byte (no validation), with a correct CRC by default.

    ``rois`` are (x0, y0, x1, y1, label_id, score_u8, reserved) tuples; ``sections``
    are (kind, payload) pairs; ``lengths`` overrides the table lengths and ``payload``
    the concatenated payloads.
    """
    n_rois = len(rois) if n_rois is None else n_rois
    n_sections = len(sections) if n_sections is None else n_sections
    lengths = tuple(len(p) for _, p in sections) if lengths is None else lengths
    payload = b"".join(p for _, p in sections) if payload is None else payload
    body = struct.pack(
        "<4sBBH8sBBHH4sIHB",
        magic, version, flags, codec_id, weights_hash, rate_point, latent_space_id,
        width, height, label_set_hash, symbol_crc, n_rois, n_sections,
    )
    body += b"".join(struct.pack("<HHHHHBB", *r) for r in rois)
    body += b"".join(struct.pack("<BI", k, n) for (k, _), n in zip(sections, lengths))
    body += payload
    if crc is None:
        return with_crc(body)
    return body + struct.pack("<I", crc)


def parse_or_reject(data) -> Packet | None:
    """Parse; a BitstreamError is fine, anything else propagates and fails the test."""
    try:
        p = unpack(data)
    except BitstreamError as e:
        assert str(e)
        return None
    assert isinstance(p, Packet)
    return p


# ------------------------------------------------------------------------ basics


def test_constants_and_layout():
    assert MAGIC == b"LCF\x00" and VERSION == 3 and bs.VERSIONS == (1, 2, 3)
    assert (MAX_ROIS, MAX_SECTIONS, MAX_SECTION_BYTES, MAX_DIM) == (1024, 16, 64 * MIB, 16384)
    assert (bs.HEADER_BYTES, bs.ROI_ENTRY_BYTES, bs.SECTION_ENTRY_BYTES, bs.CRC_BYTES) == (33, 12, 5, 4)
    assert bs.MIN_PACKET_BYTES == 42 and bs.MIN_COMPACT_PACKET_BYTES == 26 and bs.COMPACT_HEADER_BYTES == 22
    assert issubclass(BitstreamError, ValueError)
    assert [(k.name, k.value) for k in SectionKind] == [("Z", 1), ("Y", 2), ("META", 3), ("T", 4)]
    for name in ("magic", "version", "flags", "codec_id", "weights_hash", "rate_point",
                 "latent_space_id", "width", "height", "label_set_hash", "symbol_crc",
                 "n_rois", "n_sections", "crc32"):
        assert name in bs.__doc__
    for name in bs.__all__:
        assert hasattr(bs, name)


def test_known_bytes():
    p = Packet(
        header=PacketHeader(
            codec_id=0x0102, weights_hash=b"ABCDEFGH", rate_point=5, latent_space_id=6,
            width=640, height=480, label_set_hash=b"wxyz", symbol_crc=0x11223344, roi_only=True,
            rois=(Roi(x0=1, y0=2, x1=3, y1=4, label_id=0x0506, score=1.0),),
        ),
        sections={SectionKind.Y: b"yy", SectionKind.Z: b"z"},
    )
    b = pack(p)
    expected_body = (
        b"LCF\x00" + b"\x01" + b"\x01" + b"\x02\x01" + b"ABCDEFGH" + b"\x05" + b"\x06"
        + b"\x80\x02" + b"\xe0\x01" + b"wxyz" + b"\x44\x33\x22\x11" + b"\x01\x00" + b"\x02"
        + b"\x01\x00\x02\x00\x03\x00\x04\x00\x06\x05\xff\x00"
        + b"\x01\x01\x00\x00\x00" + b"\x02\x02\x00\x00\x00"  # canonical order: Z then Y
        + b"z" + b"yy"
    )
    assert b == with_crc(expected_body)
    assert b == p.to_bytes()
    assert unpack(b) == Packet.from_bytes(b) == p


# ------------------------------------------------------------------------ round trip


@FAST
@given(packets())
def test_round_trip(p):
    b = pack(p)
    q = unpack(b)
    assert q == quantized(p)
    for r_in, r_out in zip(p.header.rois, q.header.rois):
        assert r_out.score_u8 == round(r_in.score * 255)
        assert abs(r_out.score - r_in.score) <= 0.5 / 255 + 1e-12
    assert all(type(k) is SectionKind and type(v) is bytes for k, v in q.sections.items())
    assert pack(q) == b  # parsed packets re-serialise byte for byte
    assert len(b) == 33 + 12 * len(p.header.rois) + 5 * len(p.sections) + sum(map(len, p.sections.values())) + 4


@FAST
@given(packets(), st.randoms(use_true_random=False))
def test_section_dict_order_does_not_change_bytes(p, rnd):
    items = list(p.sections.items())
    rnd.shuffle(items)
    assert pack(Packet(header=p.header, sections=dict(items))) == pack(p)


def test_round_trip_max_rois_and_all_scores():
    rois = tuple(
        Roi(x0=i % 100, y0=i % 50, x1=100, y1=50, label_id=i, score=(i % 256) / 255)
        for i in range(MAX_ROIS)
    )
    p = simple_packet(width=100, height=50, rois=rois)
    b = pack(p)
    assert len(b) > 12 * MAX_ROIS
    q = unpack(b)
    assert q == p
    assert [r.score_u8 for r in q.header.rois] == [i % 256 for i in range(MAX_ROIS)]


def test_other_bytes_like_inputs_parse():
    b = pack(simple_packet())
    expected = unpack(b)
    assert unpack(bytearray(b)) == expected
    assert unpack(memoryview(b)) == expected
    assert unpack(np.frombuffer(b, dtype=np.uint8)) == expected
    strided = bytearray(len(b) * 2)
    strided[::2] = b
    assert unpack(memoryview(strided)[::2]) == expected  # non-contiguous view


def test_numpy_scalars_are_normalised():
    h = PacketHeader(
        codec_id=np.uint16(3), weights_hash=np.arange(8, dtype=np.uint8).tobytes(),
        rate_point=np.int64(2), latent_space_id=np.uint8(0), width=np.int32(32), height=np.int32(16),
        roi_only=np.bool_(True),
        rois=[Roi(x0=np.int64(0), y0=0, x1=np.int64(32), y1=16, score=np.float32(0.25))],
    )
    assert type(h.codec_id) is int and type(h.width) is int and h.roi_only is True
    assert isinstance(h.rois, tuple) and type(h.rois[0].score) is float
    json.dumps(describe(Packet(header=h, sections={2: b"x"})))


# ------------------------------------------------------------------- corruption


@FEWER
@given(packets(max_rois=3, max_payload=16))
def test_every_single_byte_change_is_rejected(p):
    b = pack(p)
    for i in range(len(b)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(b)
            bad[i] ^= mask
            # CRC32 detects every error burst of <= 32 bits, so a single changed byte
            # can never parse (magic/version are checked first, then the CRC).
            with pytest.raises(BitstreamError):
                unpack(bytes(bad))


@FEWER
@given(packets(max_rois=3, max_payload=16), st.binary(min_size=1, max_size=64))
def test_truncation_and_appended_garbage(p, garbage):
    b = pack(p)
    for n in range(len(b)):
        parse_or_reject(b[:n])
    for n in (1, len(garbage)):
        parse_or_reject(b + garbage[:n])
    parse_or_reject(garbage + b)
    with pytest.raises(BitstreamError):
        unpack(b[:-1])
    with pytest.raises(BitstreamError):
        unpack(b + b"\0")


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_only_bitstream_error(data):
    parse_or_reject(data)


@FAST
@given(st.binary(max_size=300))
def test_random_body_with_valid_magic_version_and_crc(rest):
    # gets past magic, version and CRC, so this fuzzes the field validation
    p = parse_or_reject(with_crc(MAGIC + bytes([1]) + rest))
    if p is not None:
        assert unpack(pack(p)) == p


@FAST
@given(
    packets(max_rois=4, max_payload=24),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_mutated_fields_with_fixed_crc(p, edits):
    body = bytearray(pack(p)[:-4])
    for pos, value in edits:
        body[pos % len(body)] = value
    q = parse_or_reject(with_crc(bytes(body)))
    if q is not None:
        assert unpack(pack(q)) == q


def test_non_bytes_input_is_bitstream_error():
    for bad in (None, "LCF\x00" * 20, 12345, [1, 2, 3], 3.5, object()):
        with pytest.raises(BitstreamError, match="bytes-like"):
            unpack(bad)


# ------------------------------------------------------------- crafted bad fields


CRAFTED = [
    # (id, raw_packet kwargs, regex the message must match: field, value, valid range)
    ("magic", dict(magic=b"LCF\x01"), r"magic b'LCF\\x01' is not b'LCF\\x00'"),
    ("version 4", dict(version=4), r"version 4 out of range 1\.\.3"),
    ("version 0", dict(version=0), r"version 0 out of range 1\.\.3"),
    ("version 2 without roi_only", dict(version=2), r"bg_rate_point \d+ needs roi_only"),
    ("bad crc", dict(crc=0), r"crc32 0x00000000 does not match computed 0x[0-9a-f]{8}"),
    ("flags bit1", dict(flags=0x02), r"flags 0x02 out of range 0x00\.\.0x01"),
    ("flags bit7", dict(flags=0x81), r"flags 0x81 out of range 0x00\.\.0x01"),
    ("codec_id 0", dict(codec_id=0), r"codec_id 0 out of range 1\.\.65535"),
    ("rate_point 255", dict(rate_point=255), r"rate_point 255 out of range 0\.\.254"),
    ("width 0", dict(width=0), r"^width 0 out of range 1\.\.16384$"),
    ("width 16385", dict(width=16385), r"width 16385 out of range 1\.\.16384"),
    ("height 0", dict(height=0), r"height 0 out of range 1\.\.16384"),
    ("height 65535", dict(height=65535), r"height 65535 out of range 1\.\.16384"),
    ("n_rois 65535 few bytes", dict(n_rois=65535), r"n_rois 65535 out of range 0\.\.1024"),
    ("n_rois 1025", dict(n_rois=1025), r"n_rois 1025 out of range 0\.\.1024"),
    ("n_rois 1024 few bytes", dict(n_rois=1024), r"n_rois 1024 out of range 0\.\.0 .*12288 bytes"),
    ("n_sections 0", dict(n_sections=0, sections=(), payload=b"abcdefgh"), r"n_sections 0 out of range 1\.\.16"),
    ("n_sections 17", dict(n_sections=17), r"n_sections 17 out of range 1\.\.16"),
    ("n_sections 255", dict(n_sections=255), r"n_sections 255 out of range 1\.\.16"),
    ("n_sections 16 few bytes", dict(n_sections=16), r"n_sections 16 out of range 1\.\.1 .*80 bytes"),
    (
        "section length 2**32-1",
        dict(lengths=(2**32 - 1,)),
        r"sections\[0\]\.length 4294967295 out of range 0\.\.67108864",
    ),
    (
        "section length 64 MiB, few bytes",
        dict(lengths=(MAX_SECTION_BYTES,)),
        r"sections\[0\]\.length 67108864 out of range 0\.\.3 ",
    ),
    (
        "section lengths too short",
        dict(sections=((1, b"zz"), (2, b"abc")), lengths=(1, 2)),
        r"section lengths sum to 3 but 5 payload bytes follow",
    ),
    (
        "section lengths too long",
        dict(sections=((1, b"zz"), (2, b"abc")), lengths=(2, 4)),
        r"sections\[1\]\.length 4 out of range 0\.\.3",
    ),
    (
        "duplicate kind",
        dict(sections=((2, b"a"), (1, b"b"), (2, b"c"))),
        r"sections\[2\]\.kind 2=Y duplicates sections\[0\]",
    ),
    (
        "unknown kind 7",
        dict(sections=((7, b"abc"),)),
        r"unknown sections\[0\]\.kind 7 \(valid: 1=Z, 2=Y, 3=META, 4=T\)",
    ),
    (
        "kind 0",
        dict(sections=((2, b"a"), (0, b"b"))),
        r"unknown sections\[1\]\.kind 0 \(valid: 1=Z, 2=Y, 3=META, 4=T\)",
    ),
    (
        "x1 > width",
        dict(rois=((0, 0, 65, 10, 0, 255, 0),)),
        r"rois\[0\]\.x1 65 out of range 1\.\.64 \(need 0 <= x0 < x1 <= width\)",
    ),
    ("x0 == x1", dict(rois=((0, 0, 1, 1, 0, 0, 0), (5, 0, 5, 1, 0, 0, 0))), r"rois\[1\]\.x1 5 out of range 6\.\.64"),
    ("x0 >= width", dict(rois=((64, 0, 64, 1, 0, 0, 0),)), r"rois\[0\]\.x0 64 out of range 0\.\.63"),
    ("y0 > y1", dict(rois=((0, 9, 1, 3, 0, 0, 0),)), r"rois\[0\]\.y1 3 out of range 10\.\.48"),
    ("y1 > height", dict(rois=((0, 0, 1, 49, 0, 0, 0),)), r"rois\[0\]\.y1 49 out of range 1\.\.48"),
    ("roi reserved", dict(rois=((0, 0, 1, 1, 0, 0, 9),)), r"rois\[0\]\.reserved 9 out of range 0\.\.0"),
]


@pytest.mark.parametrize("kwargs,pattern", [c[1:] for c in CRAFTED], ids=[c[0] for c in CRAFTED])
def test_crafted_bad_fields(kwargs, pattern):
    data = raw_packet(**kwargs)
    with pytest.raises(BitstreamError, match=pattern):
        unpack(data)


def test_raw_builder_makes_valid_packets():
    # the crafted cases above differ from a valid packet only in the named field
    p = unpack(raw_packet(rois=((0, 0, 64, 48, 3, 128, 0),), sections=((1, b"z"), (3, b"m"), (2, b"yy"))))
    assert p.header.rois == (Roi(x0=0, y0=0, x1=64, y1=48, label_id=3, score=128 / 255),)
    assert p.sections == {SectionKind.Z: b"z", SectionKind.Y: b"yy", SectionKind.META: b"m"}
    assert unpack(raw_packet(flags=1)).header.roi_only is True
    assert unpack(raw_packet(sections=((2, b""),))).sections == {SectionKind.Y: b""}


def test_short_packets():
    b = pack(simple_packet())
    for n in range(bs.MIN_PACKET_BYTES):
        # below 26 bytes no version fits; a version 1 or 2 packet needs 42
        low = 26 if n < bs.MIN_COMPACT_PACKET_BYTES else 42
        with pytest.raises(BitstreamError, match=rf"packet length {n} out of range {low}\.\."):
            unpack(b[:n])


# ------------------------------------------------------------ size and allocation


def test_packet_larger_than_max_is_rejected_before_parsing():
    b = pack(simple_packet())
    assert unpack(b, max_packet_bytes=len(b)) == unpack(b)
    with pytest.raises(
        BitstreamError, match=rf"packet length {len(b)} out of range 26\.\.{len(b) - 1} \(max_packet_bytes\)"
    ):
        unpack(b, max_packet_bytes=len(b) - 1)
    # garbage that would fail on magic fails on size first
    with pytest.raises(BitstreamError, match=r"packet length 2000 .*max_packet_bytes"):
        unpack(b"\xff" * 2000, max_packet_bytes=1000)
    big = bytearray(bs.MAX_PACKET_BYTES + 1)
    big[:4] = MAGIC
    big[4] = VERSION
    with pytest.raises(BitstreamError, match=r"max_packet_bytes"):
        Packet.from_bytes(big)


def test_bad_max_packet_bytes_argument_is_a_caller_error():
    b = pack(simple_packet())
    for bad in (0, -5, "big", 1.5, True):
        with pytest.raises(ValueError):
            unpack(b, max_packet_bytes=bad)


HOSTILE = {
    "n_rois 1024 and n_sections 16": lambda: raw_packet(n_rois=1024, n_sections=16, payload=b"\0" * 50),
    "n_rois 65535": lambda: raw_packet(n_rois=65535, payload=b"\0" * 50),
    "section length 64 MiB": lambda: raw_packet(lengths=(MAX_SECTION_BYTES,), payload=b"\0" * 55),
    "section length 2**32-1": lambda: raw_packet(lengths=(2**32 - 1,), payload=b"\0" * 55),
    "two 60 MiB sections": lambda: raw_packet(
        sections=((1, b""), (2, b"")), lengths=(60 * MIB, 60 * MIB), payload=b"\0" * 50
    ),
}


@pytest.mark.parametrize("make", HOSTILE.values(), ids=HOSTILE.keys())
def test_no_huge_allocation_for_hostile_packet(make):
    data = make()
    assert len(data) <= 100
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(BitstreamError):
            unpack(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, f"parsing a {len(data)}-byte packet peaked at {peak} bytes"


# ------------------------------------------------------------- writer validation


BAD_CONSTRUCTORS = [
    ("width 0", lambda: simple_packet(width=0, rois=()), r"^width 0 out of range 1\.\.16384$"),
    ("height 20000", lambda: simple_packet(height=20000, rois=()), r"height 20000 out of range 1\.\.16384"),
    ("codec_id 0", lambda: simple_packet(codec_id=0), r"codec_id 0 out of range 1\.\.65535"),
    ("codec_id bool", lambda: simple_packet(codec_id=True), r"codec_id must be an integer"),
    ("rate_point 255", lambda: simple_packet(rate_point=255), r"rate_point 255 out of range 0\.\.254"),
    ("latent_space_id 256", lambda: simple_packet(latent_space_id=256), r"latent_space_id 256 out of range 0\.\.255"),
    (
        "symbol_crc 2**32",
        lambda: simple_packet(symbol_crc=2**32),
        r"symbol_crc 4294967296 out of range 0\.\.4294967295",
    ),
    (
        "weights_hash 7 bytes",
        lambda: simple_packet(weights_hash=b"1234567"),
        r"weights_hash must be exactly 8 bytes, got 7",
    ),
    ("weights_hash str", lambda: simple_packet(weights_hash="12345678"), r"weights_hash must be bytes-like, got str"),
    (
        "label_set_hash 5 bytes",
        lambda: simple_packet(label_set_hash=b"12345"),
        r"label_set_hash must be exactly 4 bytes, got 5",
    ),
    ("roi_only 2", lambda: simple_packet(roi_only=2), r"roi_only must be a bool"),
    ("roi outside frame", lambda: simple_packet(width=32), r"rois\[0\]\.x1 64 out of range 1\.\.32"),
    (
        "too many rois",
        lambda: simple_packet(rois=(Roi(x0=0, y0=0, x1=1, y1=1),) * 1025),
        r"n_rois 1025 out of range 0\.\.1024",
    ),
    ("roi not a Roi", lambda: simple_packet(rois=((0, 0, 1, 1),)), r"rois\[0\] must be a Roi"),
    ("empty roi", lambda: Roi(x0=3, y0=0, x1=3, y1=1), r"^x1 3 out of range 4\.\.16384"),
    ("roi beyond MAX_DIM", lambda: Roi(x0=0, y0=0, x1=1, y1=16385), r"y1 16385 out of range 1\.\.16384"),
    ("negative roi", lambda: Roi(x0=-1, y0=0, x1=1, y1=1), r"^x0 -1 out of range 0\.\.16383"),
    ("label_id", lambda: Roi(x0=0, y0=0, x1=1, y1=1, label_id=65536), r"label_id 65536 out of range 0\.\.65535"),
    ("score 1.5", lambda: Roi(x0=0, y0=0, x1=1, y1=1, score=1.5), r"score 1\.5 out of range 0\.0\.\.1\.0"),
    ("score nan", lambda: Roi(x0=0, y0=0, x1=1, y1=1, score=math.nan), r"score nan out of range 0\.0\.\.1\.0"),
    ("score str", lambda: Roi(x0=0, y0=0, x1=1, y1=1, score="0.5"), r"score must be a real number"),
    (
        "no sections",
        lambda: Packet(header=simple_packet().header, sections={}),
        r"n_sections 0 out of range 1\.\.16",
    ),
    (
        "unknown kind",
        lambda: Packet(header=simple_packet().header, sections={7: b""}),
        r"^unknown section kind 7 \(valid: 1=Z, 2=Y, 3=META, 4=T\)$",
    ),
    (
        "payload str",
        lambda: Packet(header=simple_packet().header, sections={SectionKind.Y: "abc"}),
        r"section Y must be bytes-like, got str",
    ),
]


@pytest.mark.parametrize("make,pattern", [c[1:] for c in BAD_CONSTRUCTORS], ids=[c[0] for c in BAD_CONSTRUCTORS])
def test_constructors_reject_invalid_values(make, pattern):
    with pytest.raises(BitstreamError, match=pattern):
        make()


def test_oversized_section_is_rejected():
    with pytest.raises(BitstreamError, match=r"section Y length 67108865 out of range 0\.\.67108864"):
        Packet(header=simple_packet().header, sections={SectionKind.Y: bytes(MAX_SECTION_BYTES + 1)})


def test_to_bytes_refuses_packets_made_invalid_after_construction():
    p = simple_packet()
    p.sections[7] = b"x"
    with pytest.raises(BitstreamError, match=r"unknown section kind 7"):
        p.to_bytes()

    p = simple_packet()
    p.sections[SectionKind.Y] = 42
    with pytest.raises(BitstreamError, match=r"section Y must be bytes-like, got int"):
        pack(p)

    p = simple_packet()
    p.sections.clear()
    with pytest.raises(BitstreamError, match=r"n_sections 0 out of range 1\.\.16"):
        pack(p)

    p = simple_packet()
    object.__setattr__(p.header, "width", 0)  # bypass the frozen dataclass
    with pytest.raises(BitstreamError, match=r"^width 0 out of range 1\.\.16384$"):
        p.to_bytes()

    p = simple_packet()
    object.__setattr__(p.header.rois[1], "x1", 100)  # still a valid Roi, but outside the 64-px frame
    with pytest.raises(BitstreamError, match=r"rois\[1\]\.x1 100 out of range 11\.\.64"):
        p.to_bytes()

    p = simple_packet()
    p.header = "not a header"
    with pytest.raises(BitstreamError, match=r"header must be a PacketHeader"):
        p.to_bytes()

    with pytest.raises(BitstreamError, match=r"needs a Packet"):
        pack(b"bytes")


# ------------------------------------------------------------------------ describe


@FAST
@given(packets())
def test_describe_counts_real_bytes(p):
    b = pack(p)
    d = describe(p)
    assert json.loads(json.dumps(d)) == d
    assert d["total_bytes"] == len(b)
    assert d["bpp"] == len(b) * 8 / (p.header.width * p.header.height)
    assert d["header_bytes"] == 33 + 12 * len(p.header.rois) + 5 * len(p.sections) + 4
    assert d["header_bytes"] + sum(d["section_bytes"].values()) == d["total_bytes"]
    assert d["section_bytes"] == {k.name: len(v) for k, v in p.sections.items()}
    assert d["n_rois"] == len(d["rois"]) == len(p.header.rois)
    assert describe(b) == d


def test_describe_fields():
    p = simple_packet()
    d = describe(p)
    assert d["version"] == 1 and d["flags"] == 1 and d["roi_only"] is True
    assert d["codec_id"] == 7 and d["rate_point"] == 3 and d["latent_space_id"] == 1
    assert d["width"] == 64 and d["height"] == 48
    assert d["weights_hash"] == "0001020304050607" and d["label_set_hash"] == "0a0b0c0d"
    assert d["symbol_crc"] == 0xDEADBEEF
    assert d["rois"][0] == dict(x0=0, y0=0, x1=64, y1=48, label_id=1, score_u8=128, score=128 / 255)
    assert d["section_bytes"] == {"Z": 5, "Y": 14, "META": 2}
    assert d["total_bytes"] == 33 + 24 + 15 + 21 + 4 == len(pack(p))
    assert d["bpp"] == pytest.approx(d["total_bytes"] * 8 / (64 * 48))
    assert re.fullmatch(r"[0-9a-f]{16}", d["weights_hash"])


def test_writer_refuses_a_packet_readers_would_refuse():
    p = simple_packet()
    big = Packet(header=p.header, sections={SectionKind.Z: bytes(40 << 20), SectionKind.Y: bytes(30 << 20)})
    with pytest.raises(BitstreamError, match="exceeds MAX_PACKET_BYTES"):
        big.to_bytes()


# --------------------------------------------------------------------------- version 2: a coded background


def bg_packet(bg=1, rate_point=2, **kw) -> Packet:
    return simple_packet(rate_point=rate_point, roi_only=True, bg_rate_point=bg, **kw)


def test_v1_packets_are_written_as_v1():
    b = pack(simple_packet())
    assert b[4] == 1 and unpack(b).header.bg_rate_point is None and unpack(b).header.version == 1


def test_background_packet_is_v2_and_round_trips():
    p = bg_packet(bg=1)
    b = pack(p)
    assert b[4] == 2
    assert len(b) == len(pack(simple_packet(rate_point=2, roi_only=True))) + 1  # one byte: bg_rate_point
    q = unpack(b)
    assert pack(q) == b and q.header.bg_rate_point == 1 and q.header.version == 2
    d = describe(b)
    assert d["version"] == 2 and d["bg_rate_point"] == 1 and d["rate_point"] == 2
    assert describe(pack(simple_packet()))["bg_rate_point"] is None


def test_background_finer_than_the_rois_is_rejected():
    with pytest.raises(BitstreamError, match=r"bg_rate_point 3 out of range 0\.\.2 \(the background is coded at most"):
        bg_packet(bg=3, rate_point=2)
    with pytest.raises(BitstreamError, match=r"bg_rate_point -1 out of range"):
        bg_packet(bg=-1)


def test_background_needs_roi_only():
    with pytest.raises(BitstreamError, match=r"bg_rate_point 0 needs roi_only"):
        simple_packet(rate_point=1, roi_only=False, bg_rate_point=0)


def test_v2_wire_checks():
    b = bytearray(pack(bg_packet(bg=1, rate_point=2)))
    # the bg byte (offset 33) above the rate point
    b[bs.HEADER_BYTES] = 5
    with pytest.raises(BitstreamError, match=r"bg_rate_point 5 out of range 0\.\.2"):
        unpack(with_crc(bytes(b[:-4])))
    # a v2 packet whose roi_only flag is clear
    b = bytearray(pack(bg_packet(bg=1, rate_point=2)))
    b[5] = 0
    with pytest.raises(BitstreamError, match=r"needs roi_only"):
        unpack(with_crc(bytes(b[:-4])))
    # unknown versions
    b = bytearray(pack(simple_packet()))
    b[4] = 4
    with pytest.raises(BitstreamError, match=r"version 4 out of range 1\.\.3"):
        unpack(with_crc(bytes(b[:-4])))


@FAST
@given(st.binary(max_size=300))
def test_random_v2_body_only_bitstream_error(rest):
    p = parse_or_reject(with_crc(MAGIC + bytes([2]) + rest))
    if p is not None:
        assert unpack(pack(p)) == p


# ------------------------------------------------------------ version 3: compact temporal P frames


def p_frame(frame_id=7, key_id=2, bg=1, rate_point=3, rois=(), y=b"modes+residual") -> Packet:
    t = bs.T_SECTION.pack(1, frame_id, (frame_id - 1) % 2**32, key_id, bg)
    return Packet(header=simple_packet(rate_point=rate_point, roi_only=True, rois=rois).header,
                  sections={SectionKind.T: t, SectionKind.Y: y})


def context_of(p: Packet) -> bs.StreamContext:
    return bs.StreamContext.of(p.header)


def test_compact_p_frame_known_bytes_and_round_trip():
    p = p_frame(rois=(Roi(x0=1, y0=2, x1=3, y1=4, label_id=5, score=1.0),))
    b = Packet(header=p.header, sections=p.sections, compact=True).to_bytes()
    body = (b"LCF\x00" + b"\x03" + b"\x01" + b"\x03" + b"\x01" + struct.pack("<III", 7, 2, p.header.symbol_crc)
            + b"\x01\x00" + b"\x01\x00\x02\x00\x03\x00\x04\x00\x05\x00\xff\x00" + b"modes+residual")
    assert b == with_crc(body)
    assert len(b) == len(pack(p)) - 35  # 26 bytes of container instead of 61
    q = unpack(b, stream=context_of(p))
    assert q.compact and q.header == p.header and q.sections == p.sections  # the same P frame as in LCF v1
    assert q.to_bytes() == b  # and it writes back to the same bytes
    assert unpack(pack(p), stream=context_of(p)) == p  # other versions ignore the context


def test_compact_p_frame_needs_its_stream():
    b = Packet(**{**p_frame().__dict__, "compact": True}).to_bytes()
    with pytest.raises(BitstreamError, match=r"compact P frame \(version 3\) does not name its codec.*context"):
        unpack(b)
    with pytest.raises(BitstreamError, match="stream must be a StreamContext"):
        unpack(b, stream={"width": 64})
    d = bs.describe(b)  # what the bytes themselves say
    assert d["compact"] and d["frame_id"] == 7 and d["key_id"] == 2 and d["width"] is None
    assert d["header_bytes"] == 26 and d["section_bytes"] == {"Y": len(b"modes+residual")}
    assert d["total_bytes"] == len(b)
    full = bs.describe(b, stream=context_of(p_frame()))
    assert full["width"] == 64 and full["header_bytes"] == 26 and full["total_bytes"] == len(b)


@pytest.mark.parametrize("sections,header,pattern", [
    ({SectionKind.Y: b"y"}, {}, "not exactly T\\+Y"),
    ({SectionKind.T: bs.T_SECTION.pack(1, 7, 6, 2, 0), SectionKind.Y: b"y", SectionKind.Z: b"z"}, {}, "Y\\+T|T\\+Y"),
    ({SectionKind.T: bs.T_SECTION.pack(0, 7, 7, 7, 0), SectionKind.Y: b"y"}, {}, "kind 0, not a P frame"),
    ({SectionKind.T: bs.T_SECTION.pack(1, 7, 5, 2, 0), SectionKind.Y: b"y"}, {}, "predicted from frame 5"),
    ({SectionKind.T: b"short", SectionKind.Y: b"y"}, {}, "T section is 5 bytes"),
    ({SectionKind.T: bs.T_SECTION.pack(1, 7, 6, 2, 0), SectionKind.Y: b"y"}, {"roi_only": False}, "roi_only"),
])
def test_only_a_p_frame_that_follows_its_reference_is_written_compact(sections, header, pattern):
    h = simple_packet(roi_only=True).header
    h = dataclasses.replace(h, **header)
    with pytest.raises(BitstreamError, match=pattern):
        Packet(header=h, sections=sections, compact=True)


def test_compact_p_frame_with_motion_keeps_its_kind():
    p = p_frame()
    t = bytearray(p.sections[SectionKind.T])
    t[0] = 2  # a P_MC frame: its CODE cells carry motion vectors
    p = Packet(header=p.header, sections={SectionKind.T: bytes(t), SectionKind.Y: p.sections[SectionKind.Y]})
    b = Packet(header=p.header, sections=p.sections, compact=True).to_bytes()
    assert b[5] == bs.FLAG_ROI_ONLY | bs.FLAG_MOTION
    q = unpack(b, stream=context_of(p))
    assert q.sections == p.sections and q.to_bytes() == b
    assert bs.describe(b)["kind"] == 2


def test_compact_frame_id_wraps():
    p = p_frame(frame_id=0)  # predicted from frame 2**32 - 1
    q = unpack(Packet(**{**p.__dict__, "compact": True}).to_bytes(), stream=context_of(p))
    assert bs.T_SECTION.unpack(q.sections[SectionKind.T])[1:3] == (0, 2**32 - 1)


def test_crafted_compact_packets_are_refused_with_the_field_named():
    ctx = context_of(p_frame())

    def raw(flags=1, rate_point=3, bg=1, n_rois=0, rest=b""):
        return with_crc(struct.pack("<4sBBBBIIIH", MAGIC, 3, flags, rate_point, bg, 7, 2, 0, n_rois) + rest)

    assert unpack(raw(), stream=ctx).sections[SectionKind.Y] == b""  # the shortest packet: 26 bytes
    assert len(raw()) == bs.MIN_COMPACT_PACKET_BYTES
    for kwargs, pattern in [
        ({"flags": 0}, r"flags 0x00 out of range: a compact P frame is roi_only \(0x01\), with 0x02 for motion"),
        ({"flags": 5}, r"flags 0x05"),
        ({"flags": 2}, r"flags 0x02"),
        ({"rate_point": 255}, r"rate_point 255 out of range 0\.\.254"),
        ({"bg": 255}, r"bg_rate_point 255 out of range 0\.\.254"),
        ({"n_rois": 1025}, r"n_rois 1025 out of range 0\.\.1024"),
        ({"n_rois": 2, "rest": b"\0" * 12}, r"n_rois 2 out of range 0\.\.1"),
        ({"n_rois": 1, "rest": struct.pack("<HHHHHBB", 0, 0, 65, 4, 0, 0, 0)}, r"rois\[0\]\.x1 65 out of range"),
        ({"n_rois": 1, "rest": struct.pack("<HHHHHBB", 0, 0, 6, 4, 0, 0, 1)}, r"rois\[0\]\.reserved 1"),
    ]:
        with pytest.raises(BitstreamError, match=pattern):
            unpack(raw(**kwargs), stream=ctx)
    b = bytearray(raw())
    b[8] ^= 1  # a flipped bit anywhere: the packet CRC
    with pytest.raises(BitstreamError, match="crc32"):
        unpack(bytes(b), stream=ctx)
    for n in range(bs.MIN_COMPACT_PACKET_BYTES):
        with pytest.raises(BitstreamError, match=r"out of range 26\.\."):
            unpack(raw()[:n], stream=ctx)


@FAST
@given(st.binary(max_size=200))
def test_random_compact_body_only_bitstream_error(rest):
    ctx = context_of(p_frame())
    p = None
    try:
        p = unpack(with_crc(MAGIC + bytes([3]) + rest), stream=ctx)
    except BitstreamError as e:
        assert str(e)
    if p is not None:
        assert p.compact and unpack(p.to_bytes(), stream=ctx) == p
