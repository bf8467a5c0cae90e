"""The latent codec as a library: weight files, ``compress`` and ``decompress``.

::

    image (H,W,3 uint8) + ROIs ─► pad to 64 ─► g_a, h_a ─► exact entropy loop ─► symbols
        ─► proto.symbols (range coding) ─► proto.bitstream packet (bytes)

    bytes ─► packet ─► Z symbols ─► h_s ─► step by step: tables ─► Y symbols ─► ŷ
        ─► CRC check ─► g_s ─► ẑ_c (diffusion latent) ─► latent-space decoder ─► frame

A weight file (safetensors) holds the float parameters, the frozen integer
parameters of the entropy networks, the integer probability tables, the
per-rate quantization steps and, in its metadata, the codec configuration and
latent space. The ``weights_hash`` every packet names is taken over that content
(:func:`weights_content_hash`: tensor names, dtypes, shapes and bytes in name
order, then the metadata), not over the file's bytes, so re-writing the same
weights gives the same hash; a packet made with other weights is refused.

The edge encodes with the exported ONNX graphs (``latentcast.edge.encoder``);
:meth:`LatentCodec.compress` here is the PyTorch reference with the same
bit-exact output.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from latentcast.proto.bitstream import MAX_DECODE_PIXELS, Packet, SectionKind
from latentcast.proto.entropy import TableSet, gaussian_tables, quantize_pmf
from latentcast.proto.grid import coded_cells, grid_shape, padded_size
from latentcast.proto.ids import CODEC_IDS, LATENT_SPACE_IDS
from latentcast.proto.symbols import (
    RDOQ_RADIUS,
    FrameCompressor,
    LatentDecoder,
    LatentEncoder,
    check_frame,
    check_rdoq,
    codec_rdoq,
    coding_steps,
    quantize_y,
    quantize_z,
    rate_steps_of,
)
from latentcast.weights import read_tagged_file, weights_dir, weights_path

from .elic import ElicCodec, ElicConfig, channel_slice

log = logging.getLogger(__name__)

__all__ = ["WEIGHTS_DIR", "Reconstruction", "LatentCodec", "CodecError", "image_to_tensor", "Z_RADIUS",
           "gaussian_y_tables"]

WEIGHTS_DIR = weights_dir()  # the shipped weights (latentcast.weights: the one place that resolves them)
Z_RADIUS = 64  # z symbols coded directly in -64..64, escaped beyond


class CodecError(ValueError):
    """A packet this codec cannot decode (other codec or weights, corrupt symbols)."""


@dataclass
class Reconstruction:
    """What :meth:`LatentCodec.decompress` returns."""

    latent: np.ndarray  # (C, ceil(H/f), ceil(W/f)) float32: the decoded diffusion latent ẑ_c
    frame: np.ndarray | None  # (H, W, 3) uint8 RGB after the latent decoder, or None if not asked
    packet: Packet  # the parsed packet (header, ROI list, sections)
    mask: np.ndarray  # (rows, cols) bool: latent cells that were transmitted


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H,W,3) uint8 RGB -> (1,3,H,W) float in [0,1]; precise error for anything else."""
    check_frame(image)
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0


def pad_image(x: torch.Tensor, pad_to: int = 64) -> torch.Tensor:
    h, w = x.shape[2:]
    pw, ph = padded_size(w, h, pad_to=pad_to)
    if (pw, ph) == (w, h):
        return x
    return F.pad(x, (0, pw - w, 0, ph - h), mode="replicate")


def weights_content_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """First 8 bytes of SHA-256 over the tensors (sorted by name: name, dtype, shape, raw bytes)
    and the metadata (sorted keys): independent of how safetensors lays the file out."""
    h = hashlib.sha256(b"latentcast-weights-1\0")
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(metadata, sort_keys=True).encode())
    return h.digest()[:8]


def _tables_to_tensors(prefix: str, t: TableSet) -> dict[str, torch.Tensor]:
    packed, lengths, offsets = t.packed()
    return {f"{prefix}.packed": torch.from_numpy(packed), f"{prefix}.lengths": torch.from_numpy(lengths),
            f"{prefix}.offsets": torch.from_numpy(offsets)}


def _tables_from_tensors(prefix: str, sd: dict[str, torch.Tensor]) -> TableSet:
    return TableSet.from_packed(sd.pop(f"{prefix}.packed").numpy(), sd.pop(f"{prefix}.lengths").numpy(),
                                sd.pop(f"{prefix}.offsets").numpy())


_Y_TABLES: dict[ElicConfig, TableSet] = {}


def gaussian_y_tables(model: ElicCodec) -> TableSet:
    """The y tables a codec ships (:meth:`LatentCodec.save` writes them): one zero-mean discretized Gaussian per
    table scale of the model, which depend on its configuration only (built once per configuration)."""
    tables = _Y_TABLES.get(model.cfg)
    if tables is None:
        tables = _Y_TABLES[model.cfg] = TableSet.centered(gaussian_tables(model.scales().numpy()))
    return tables


class LatentCodec(FrameCompressor):
    """A trained codec with frozen integer entropy networks and its probability tables."""

    def __init__(self, *, model: ElicCodec, weights_hash: bytes, latent_space: str, y_tables: TableSet,
                 z_tables: TableSet, path: Path | None = None, meta: dict | None = None):
        self.model = model.eval()
        self.cfg: ElicConfig = model.cfg
        self.weights_hash = weights_hash
        self.latent_space_spec = latent_space
        self.y_tables, self.z_tables = y_tables, z_tables
        self.path = path
        self.meta = meta or {}
        self.codec_name = f"elic-{self.cfg.name}"
        self.synthesis_name = ""  # "" = the codec's own g_s renders (use_synthesis)
        self._own_g_s = self.model.g_s
        self._temporal_g_s = None  # temporal streams' g_s when it differs (use_synthesis(..., temporal=True))
        self.temporal_synthesis_name: str | None = None  # None: as synthesis_name
        if self.codec_name not in CODEC_IDS:
            raise ValueError(f"codec {self.codec_name!r} has no wire id (valid: {', '.join(CODEC_IDS)})")
        self.codec_id = CODEC_IDS[self.codec_name]
        family = latent_space.split(":", 1)[0]
        if family not in LATENT_SPACE_IDS:
            raise ValueError(f"latent space {latent_space!r} has no wire id (valid: {', '.join(LATENT_SPACE_IDS)})")
        self.latent_space_id = LATENT_SPACE_IDS[family]
        self._latent_space = None
        try:
            self.rdoq = codec_rdoq(self.meta)  # the encoder's λ of proto.symbols.quantize_y (0: plain rounding)
        except ValueError as exc:
            raise ValueError(f"{path or 'codec'}: metadata {exc}") from None
        self._enc = LatentEncoder(groups=self.cfg.groups, y_tables=y_tables, z_tables=z_tables,
                                  codec_id=self.codec_id, weights_hash=weights_hash,
                                  latent_space_id=self.latent_space_id)

    # ------------------------------------------------------------------ files
    @staticmethod
    def save(model: ElicCodec, path: Path | str, *, latent_space: str, meta: dict | None = None) -> bytes:
        """Freeze the integer networks, build the tables, write the weight file; returns its hash."""
        from safetensors.torch import save_file

        model = model.eval()
        for m in model.modules():
            if hasattr(m, "freeze") and hasattr(m, "w_int"):
                m.freeze()
        y_tables = gaussian_y_tables(model)
        pmfs = torch.cat([prior.pmfs(Z_RADIUS)[0] for prior in model.prior_z])  # rate point-major
        z_tables = TableSet(freqs=tuple(quantize_pmf(p) for p in pmfs.numpy()),
                            offsets=np.full(pmfs.shape[0], -Z_RADIUS, dtype=np.int64))
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        tensors.update(_tables_to_tensors("tables.y", y_tables))
        tensors.update(_tables_to_tensors("tables.z", z_tables))
        md = {"config": json.dumps(model.cfg.to_dict()), "latent_space": latent_space,
              "format": "latentcast-codec-1", "meta": json.dumps(meta or {})}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=md)
        return weights_content_hash(tensors, md)

    @classmethod
    def from_file(cls, path: Path | str) -> LatentCodec:
        path = Path(path)
        get = f"train with `latentcast train codec` or use the weights shipped in {WEIGHTS_DIR}"
        sd, md = read_tagged_file(path, "latentcast-codec-1", what="codec weights", get=get)
        weights_hash = weights_content_hash(sd, md)
        cfg_d = json.loads(md["config"])
        cfg = ElicConfig.from_dict(cfg_d)
        y_tables = _tables_from_tensors("tables.y", sd)
        z_tables = _tables_from_tensors("tables.z", sd)
        model = ElicCodec(cfg)
        model.load_state_dict(sd)
        return cls(model=model, weights_hash=weights_hash, latent_space=md["latent_space"],
                   y_tables=y_tables, z_tables=z_tables, path=path, meta=json.loads(md.get("meta", "{}")))

    @classmethod
    def load(cls, name: str = "elic-lite") -> LatentCodec:
        """A codec shipped in ``models/weights`` by name, or a path to a weight file."""
        p = Path(name)
        if p.is_file() or p.suffix == ".safetensors":
            return cls.from_file(p)
        cand = weights_path(name, "codec")
        if not cand.is_file():
            have = sorted(q.stem for q in WEIGHTS_DIR.glob("*.safetensors"))
            raise FileNotFoundError(f"no codec weights named {name!r} (shipped: {', '.join(have) or 'none'})")
        return cls.from_file(cand)

    def use_synthesis(self, name: str, *, temporal: bool = False) -> None:
        """Render with the synthesis ``name`` (``models/synthesis.py``: a cheaper g_s trained for this codec's
        packets) instead of the codec's own. ``"auto"``: the synthesis shipped for this codec if there is
        one, else the codec's own; ``"own"``: the codec's own. Entropy decoding, the packets and the
        weights hash do not change. ``temporal``: for temporal streams' renders only (:attr:`temporal_g_s`;
        until set, they render with the g_s of independent frames)."""
        from .synthesis import find_synthesis, load_synthesis

        if name == "auto":
            found = find_synthesis(self.weights_hash)
            name = str(found) if found is not None else "own"
        if name == "own":
            g_s, label = self._own_g_s, ""
        else:
            sf = load_synthesis(name, self.cfg, self.weights_hash)
            g_s, label = sf.g_s, sf.name
        if temporal:
            self._temporal_g_s, self.temporal_synthesis_name = g_s, label
        else:
            self.model.g_s, self.synthesis_name = g_s, label

    @property
    def temporal_g_s(self):
        """The g_s temporal streams render with (``use_synthesis(..., temporal=True)``, else :attr:`model.g_s`)."""
        return self.model.g_s if self._temporal_g_s is None else self._temporal_g_s

    @property
    def n_rates(self) -> int:
        return self.model.n_rates

    @property
    def M(self) -> int:
        return self.cfg.M

    @property
    def rate_deltas(self) -> list[float] | list[np.ndarray]:
        """Δ_q of each rate point: a float, or with channel gains an (M,1,1) array (one step per channel)."""
        return rate_steps_of(self.model.rate_delta.numpy())

    def latent_space(self):
        if self._latent_space is None:
            from .latent_spaces import load_latent_space

            self._latent_space = load_latent_space(self.latent_space_spec).eval()
        return self._latent_space

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def analyze(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """g_a and h_a in PyTorch: returns y (M,h,w) and z (Nz,hz,wz), float32."""
        x = pad_image(image_to_tensor(image))
        y = self.model.analyze(x)
        z = self.model.h_a(y)
        return y[0].numpy(), z[0].numpy()

    def z_symbols(self, z: np.ndarray, rate_point: int) -> np.ndarray:
        """Quantize z with the rate point's step: floor(z / Δz_q + 1/2)."""
        return quantize_z(z, float(self.model.rate_zdelta[rate_point]))

    def encode_symbols(self, y: np.ndarray, z_sym: np.ndarray, *, rate_point: int, tx_mask: np.ndarray,
                       raw_index: bool = False, cell_rate: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact entropy loop at the encoder: y symbols and table indices (M,h,w) int64.

        ``raw_index``: return the networks' scale index before the rate point's offset and clipping
        (used to calibrate the offsets). ``cell_rate`` (h,w): the rate point of each cell (default
        ``rate_point`` everywhere; ``proto.grid.coded_cells``)."""
        sym, tab, _ = self.encode_symbols_y_hat(y, z_sym, rate_point=rate_point, tx_mask=tx_mask, raw_index=raw_index,
                                                cell_rate=cell_rate)
        return sym, tab

    def _step_sizes(self, rate_point: int, cell_rate: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rate index for ``table_index``, Δ (1,1|M,1|h,1|w)) of one rate point or per cell."""
        q = (torch.tensor([rate_point]) if cell_rate is None
             else torch.from_numpy(np.asarray(cell_rate, dtype=np.int64))[None, None])
        return q, self.model.per_rate(self.model.rate_delta, q)

    @torch.no_grad()
    def encode_symbols_y_hat(self, y: np.ndarray, z_sym: np.ndarray, *, rate_point: int, tx_mask: np.ndarray,
                             raw_index: bool = False, cell_rate: np.ndarray | None = None,
                             rdoq: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`encode_symbols` and the decoded latent ŷ (M,h,w) float64, exact (the decoder's); ``rdoq``: the
        λ of the choice of symbols (None: the codec's, ``self.rdoq``)."""
        m = self.model
        q = torch.tensor([rate_point])
        yt = torch.from_numpy(y).double()[None]
        tx = torch.from_numpy(tx_mask)[None, None]
        qc, delta = self._step_sizes(rate_point, cell_rate)
        sym = torch.zeros_like(yt)
        tab = torch.zeros_like(yt)
        slices = m.group_slices()

        # table calibration of a plainly rounding encoder sees plainly rounded symbols
        lam = 0.0 if raw_index else check_rdoq(self.rdoq if rdoq is None else rdoq)
        lengths = self.y_tables.code_lengths(RDOQ_RADIUS) if lam else None

        def step(k, _is_anchor, cells, mu, idx):
            sl = slices[k]
            d = channel_slice(delta, sl)
            t = idx if raw_index else m.table_index(idx, qc, sl)
            r = (yt[:, sl] - mu) / d
            s = torch.from_numpy(quantize_y(r.numpy(), t.numpy(), lengths, lam)) if lam else torch.floor(r + 0.5)
            where = cells & tx
            sym[:, sl] = torch.where(where, s, sym[:, sl])
            tab[:, sl] = torch.where(where, t, tab[:, sl])
            return torch.where(tx, mu + d * s, mu)

        z_hat = torch.from_numpy(z_sym).double()[None] * m.rate_zdelta[q].view(1, 1, 1, 1)
        H = m.hyper_features(z_hat, exact=True)
        y_hat = m.entropy_params_loop(H, step, exact=True)
        return sym[0].numpy().astype(np.int64), tab[0].numpy().astype(np.int64), y_hat[0].numpy()

    # ------------------------------------------------------------------ decoding
    def check_packet(
        self, packet: Packet, *, sections: tuple[SectionKind, ...] = (SectionKind.Z, SectionKind.Y)
    ) -> None:
        hd = packet.header
        if hd.codec_id != self.codec_id:
            raise CodecError(f"packet codec_id {hd.codec_id} is not this codec's ({self.codec_id} = {self.codec_name})")
        if hd.weights_hash != self.weights_hash:
            raise CodecError(f"packet weights hash {hd.weights_hash.hex()} does not match the loaded weights "
                             f"{self.weights_hash.hex()}")
        if hd.latent_space_id != self.latent_space_id:
            raise CodecError(f"packet latent_space_id {hd.latent_space_id} is not {self.latent_space_id}")
        if hd.rate_point >= self.n_rates:
            raise CodecError(f"packet rate_point {hd.rate_point} out of range 0..{self.n_rates - 1}")
        # (bg_rate_point <= rate_point is checked by the bitstream parser)
        if hd.width * hd.height > MAX_DECODE_PIXELS:
            raise CodecError(f"frame {hd.width}x{hd.height} exceeds the decoder limit of {MAX_DECODE_PIXELS} pixels")
        missing = [k.name for k in sections if k not in packet.sections]
        if missing and SectionKind.T in packet.sections:
            raise CodecError("a temporal P frame depends on the frames before it: decode it in its stream "
                             "(latentcast.models.temporal.TemporalDecoder), not on its own")
        if missing:
            raise CodecError(f"packet lacks section(s) {', '.join(missing)}")

    @torch.no_grad()
    def decode_latent(self, packet: Packet) -> tuple[torch.Tensor, np.ndarray]:
        """Entropy-decode and synthesize: returns ẑ_c (1,C,h,w) cropped to the frame, and the mask."""
        y_hat, z_t, tx = self.decode_y(packet)
        hd = packet.header
        return self.synthesize(y_hat, tx, z_t, width=hd.width, height=hd.height), tx

    @torch.no_grad()
    def synthesize(self, y_hat: torch.Tensor, tx: np.ndarray, z_t: torch.Tensor, *, width: int,
                   height: int) -> torch.Tensor:
        """g_s: ŷ (1,M,h,w), the transmit mask and ẑ -> ẑ_c (1,C,h,w) cropped to the frame."""
        mask_t = torch.from_numpy(np.asarray(tx, dtype=np.float32))[None, None]
        latent = self.model.g_s(y_hat.float(), mask_t, z_t.float())
        f = self.cfg.latent_factor
        return latent[:, :, : -(-height // f), : -(-width // f)]

    @torch.no_grad()
    def decode_y(self, packet: Packet) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Entropy decoding only: ŷ (1,M,h,w) float64, ẑ (1,Nz,h/4,w/4) float64 and the transmit mask."""
        self.check_packet(packet)
        hd = packet.header
        m = self.model
        rows, cols = grid_shape(hd.width, hd.height)
        tx, cell_rate = coded_cells(hd.width, hd.height, [(r.x0, r.y0, r.x1, r.y1) for r in hd.rois],
                                    roi_only=hd.roi_only, rate_point=hd.rate_point, bg_rate_point=hd.bg_rate_point)
        dec = LatentDecoder(groups=self.cfg.groups, y_tables=self.y_tables, z_tables=self.z_tables,
                            z_bytes=packet.sections[SectionKind.Z], y_bytes=packet.sections[SectionKind.Y])
        z = dec.decode_z((self.cfg.Nz, rows // 4, cols // 4), z_table_base=hd.rate_point * self.cfg.Nz)
        q = torch.tensor([hd.rate_point])
        z_t = torch.from_numpy(z).double()[None] * m.rate_zdelta[q].view(1, 1, 1, 1)
        qc, delta = self._step_sizes(hd.rate_point, None if hd.bg_rate_point is None else cell_rate)
        steps = {(k, a): sl for k, sl, a in coding_steps(self.cfg.groups)}

        def step(k, is_anchor, cells, mu, idx):
            sl = steps[(k, is_anchor)]
            tab = m.table_index(idx, qc, sl)[0].numpy().astype(np.int64)
            vals, where = dec.decode_step(sl=sl, anchor=is_anchor, y_table=tab, tx_mask=tx)
            s = np.zeros(tab.shape, dtype=np.float64)
            s[:, where] = vals
            y = mu + channel_slice(delta, sl) * torch.from_numpy(s)[None]
            return torch.where(torch.from_numpy(tx)[None, None], y, mu)

        H = m.hyper_features(z_t, exact=True)
        y_hat = m.entropy_params_loop(H, step, exact=True)
        if dec.crc != hd.symbol_crc:
            raise CodecError(f"symbol checksum mismatch (decoded {dec.crc:#010x}, packet {hd.symbol_crc:#010x}): "
                             "the entropy parameters differ from the encoder's; frame not rendered")
        return y_hat, z_t, tx

    def decompress(self, data: bytes | Packet, *, decode_frame: bool = True) -> Reconstruction:
        """Bytes -> :class:`Reconstruction` (latent, and the frame through the latent decoder)."""
        packet = data if isinstance(data, Packet) else Packet.from_bytes(data)
        latent, tx = self.decode_latent(packet)
        frame = None
        if decode_frame:
            frame = self.latent_to_frame(latent, packet.header.width, packet.header.height)
        return Reconstruction(latent=latent[0].numpy(), frame=frame, packet=packet, mask=tx)

    @torch.no_grad()
    def latent_to_frame(self, latent: torch.Tensor, width: int, height: int) -> np.ndarray:
        """(1,C,h,w) latent -> (height, width, 3) uint8 RGB through the latent space's decoder."""
        return self.latent_space().to_rgb8(latent, width, height)
