"""Grounding DINO (transformers' implementation) split for the edge: text side once per label list,
image side exported to ONNX (and optionally built into a TensorRT engine).

::

    labels ─► caption "person . car . traffic light ." (split into chunks that fit max_text_len)
           ─► BERT text backbone + text projection + the special-token masks     (PyTorch, once per list)
           ─► text.npz: per chunk text_features (T,D), token mask (T,), self-attention mask (T,T),
              position ids (T,), input ids (T,); manifest.json: each label's token span [start, end)

    frame ─► letterbox to the bundle's (H, W) (top-left, zero padding after normalisation, pixel_mask)
          ─► image.onnx (Swin backbone, fusion encoder, two-stage query selection, decoder, last head)
              inputs  pixel_values (1,3,H,W) f32, pixel_mask (1,H,W) i64, text_features (1,T,D) f32,
                      text_token_mask (1,T) bool, text_self_attention_mask (1,T,T) bool, position_ids (1,T) i64
              outputs logits (1,Q,T) f32 (-inf on padding tokens), pred_boxes (1,Q,4) cx,cy,w,h in [0,1]
                      relative to the valid (unpadded) image region

T is the model's ``max_text_len`` (256 for the released checkpoints): every chunk is padded to it, so
one graph serves every label list. Padding is exact: a padding token is not a delimiter, so the
special-token mask lets it attend only to itself and every consumer masks it out (checked against the
unpadded full model in the tests).

The multi-scale deformable attention runs transformers' pure-PyTorch path (``grid_sample``); the
export refuses a model whose attention was swapped for a hub kernel.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentcast.shared import file_sha256

_INSTALL_HINT = 'pip install -e ".[grounding]"  (PyTorch and transformers are needed on this side)'
try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise ImportError(f"Grounding DINO export needs torch ({exc}); {_INSTALL_HINT}") from exc

log = logging.getLogger(__name__)

__all__ = [
    "BUNDLE_FORMAT", "DEFAULT_BOX_THRESHOLD", "DEFAULT_TEXT_THRESHOLD", "HUB_ID", "IMAGE_INPUTS", "IMAGE_OUTPUTS",
    "TextChunk", "GroundingImageSide", "load_grounding_dino", "tiny_grounding_dino", "random_grounding_dino",
    "encode_labels", "caption_of", "chunk_labels", "export_grounding", "export_labels", "model_fingerprint",
    "build_tensorrt_engine", "write_tiny_vocab",
]

BUNDLE_FORMAT = "latentcast-grounding-1"
HUB_ID = "IDEA-Research/grounding-dino-tiny"
DEFAULT_BOX_THRESHOLD = 0.35
DEFAULT_TEXT_THRESHOLD = 0.25
IMAGE_INPUTS = ("pixel_values", "pixel_mask", "text_features", "text_token_mask", "text_self_attention_mask",
                "position_ids")
IMAGE_OUTPUTS = ("logits", "pred_boxes")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _transformers():
    """``transformers``, imported on first use, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ImportError(f"Grounding DINO export needs transformers ({exc}); {_INSTALL_HINT}") from exc
    return transformers


def _tokenizer_of(tok_or_processor):
    return getattr(tok_or_processor, "tokenizer", None) or tok_or_processor


def _normalisation_of(tok_or_processor) -> tuple[list[float], list[float]]:
    ip = getattr(tok_or_processor, "image_processor", None)
    mean = getattr(ip, "image_mean", None) or IMAGENET_MEAN
    std = getattr(ip, "image_std", None) or IMAGENET_STD
    return [float(v) for v in mean], [float(v) for v in std]


# ---------------------------------------------------------------------------------------------- loading


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~", "\\")) or s.count("/") != 1 or os.sep != "/" and os.sep in s


def load_grounding_dino(model: str | Path, *, local_files_only: bool = True):
    """A ``GroundingDinoForObjectDetection`` (eval mode) and its processor, from a local folder or a hub id.

    Returns ``(model, processor)``; the processor is transformers' ``GroundingDinoProcessor`` when its
    image processor loads on this machine, else the tokenizer alone (everything here accepts either).
    Hub ids resolve from the local cache only unless ``local_files_only=False``. A missing folder is a
    ``FileNotFoundError``, an id that cannot be resolved an ``OSError``; both say how to get the weights.
    """
    transformers = _transformers()
    src = str(model)
    hint = (f"download it once on a machine with a network, e.g. `huggingface-cli download {HUB_ID} "
            f"--local-dir ./grounding-dino-tiny` (or `hf download ...`), and pass that folder")
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise FileNotFoundError(f"Grounding DINO folder {p} has no config.json: not a saved transformers model "
                                    f"({hint})")
        src, local = str(p), True
    elif isinstance(model, Path) or _looks_like_path(src):
        raise FileNotFoundError(f"Grounding DINO weights folder {p} not found; {hint}")
    else:
        local = local_files_only
    try:
        net = transformers.AutoModelForZeroShotObjectDetection.from_pretrained(src, local_files_only=local)
    except OSError as exc:
        where = "the local Hugging Face cache" if local else "the hub"
        more = " (or pass local_files_only=False to fetch it from the hub)" if local else ""
        raise OSError(f"Grounding DINO {src!r} could not be loaded from {where} ({exc.__class__.__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); {hint}{more}") from None
    if getattr(net.config, "model_type", "") != "grounding-dino":
        raise ValueError(f"{src}: model_type {net.config.model_type!r} is not grounding-dino")
    try:
        proc = transformers.AutoProcessor.from_pretrained(src, local_files_only=local)
        if not hasattr(proc, "tokenizer"):
            raise TypeError("no tokenizer on the processor")
    except Exception as exc:  # e.g. no preprocessor_config.json, or an image processor needing torchvision
        log.debug("%s: processor not loadable (%s); using the tokenizer alone", src, exc)
        try:
            proc = transformers.AutoTokenizer.from_pretrained(src, local_files_only=local)
        except OSError as exc2:
            raise OSError(f"Grounding DINO {src!r}: tokenizer files missing ({exc2.__class__.__name__}); {hint}") \
                from None
    net.eval()
    net.name_or_path_for_bundle = src if not p.exists() else p.name  # what the manifest names
    return net, proc


# --------------------------------------------------------------------------------------------- tiny model

_TINY_WORDS = (
    "person", "people", "pedestrian", "car", "truck", "bus", "bicycle", "motorcycle", "traffic", "light",
    "sign", "stop", "dog", "cat", "bird", "tree", "road", "building", "red", "blue", "green", "white", "black",
    "small", "large", "a", "the", "of", "on", "with", "bag", "backpack", "umbrella", "bench", "window", "door",
)


def _tiny_vocab_words() -> list[str]:
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"[unused{i}]" for i in range(99, 99 + 1012 - len(vocab))]
    vocab.append(".")
    vocab += [f"[unused{i}]" for i in range(1000, 1000 + 1029 - len(vocab))]
    vocab.append("?")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab += [",", "-", "'"] + letters + [f"##{c}" for c in letters] + [str(d) for d in range(10)]
    vocab += [w for w in _TINY_WORDS if w not in vocab]
    assert vocab.index(".") == 1012 and vocab.index("?") == 1029 and vocab.index("[CLS]") == 101
    return vocab


def write_tiny_vocab(folder: str | Path) -> Path:
    """A WordPiece vocabulary laid out like bert-base-uncased where Grounding DINO looks: [PAD]=0,
    [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, '.'=1012, '?'=1029 (the model's hard-coded delimiter
    ids), then the letters, their '##' continuations and a few whole words. Returns the vocab.txt path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(_tiny_vocab_words()) + "\n", encoding="utf-8")
    return path


def _random_model(cfg, seed: int, vocab_dir, name: str):
    transformers = _transformers()
    from transformers import BertTokenizerFast

    vocab_dir = Path(vocab_dir) if vocab_dir is not None else Path(tempfile.mkdtemp(prefix="gdino_vocab_"))
    words = write_tiny_vocab(vocab_dir).read_text(encoding="utf-8").splitlines()
    if cfg.text_config.vocab_size < len(words):
        raise ValueError(
            f"text vocab_size {cfg.text_config.vocab_size} < the {len(words)} words of the test vocabulary"
        )
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True,
                            model_max_length=cfg.max_text_len)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.GroundingDinoForObjectDetection(cfg)
    model.eval()
    model.name_or_path_for_bundle = name
    return model, tok


def tiny_grounding_dino(seed: int = 0, max_text_len: int = 32, *, num_queries: int = 20, d_model: int = 32,
                        vocab_dir: str | Path | None = None):
    """A tiny, randomly initialised (``seed``) Grounding DINO and a BERT tokenizer over a small vocabulary
    written to ``vocab_dir`` (a fresh temporary folder by default). Deterministic; no download.
    Returns ``(model, tokenizer)``; the model is in eval mode."""
    _transformers()
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    n_vocab = len(_tiny_vocab_words())
    backbone = SwinConfig(image_size=128, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=4, mlp_ratio=2.0, out_indices=[2, 3, 4])
    text = BertConfig(vocab_size=n_vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=max(64, max_text_len))
    cfg = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=d_model, num_queries=num_queries,
                              encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                              encoder_attention_heads=2, decoder_attention_heads=2, encoder_n_points=2,
                              decoder_n_points=2, num_feature_levels=4, max_text_len=max_text_len)
    return _random_model(cfg, seed, vocab_dir, f"tiny-random-grounding-dino-seed{seed}")


def random_grounding_dino(seed: int = 0, *, vocab_dir: str | Path | None = None):
    """The released grounding-dino-tiny architecture (transformers' default config: Swin-T backbone,
    BERT-base text encoder, d_model 256, 900 queries, 6 + 6 layers, max_text_len 256) with random
    weights, and the small test tokenizer. For cost measurements (compute does not depend on the
    weights) and full-size export checks where the real weights are absent."""
    _transformers()
    from transformers import GroundingDinoConfig

    return _random_model(GroundingDinoConfig(), seed, vocab_dir, f"random-grounding-dino-swin-t-seed{seed}")


# --------------------------------------------------------------------------------------------- text side


@dataclass(frozen=True)
class TextChunk:
    """One caption's text-side tensors, padded to ``max_text_len`` = T."""

    labels: tuple[str, ...]  # this chunk's labels, in caption order
    label_ids: tuple[int, ...]  # their indices in the full label list
    spans: tuple[tuple[int, int], ...]  # each label's token span [start, end) in input_ids
    length: int  # real tokens ([CLS] ... [SEP]); the rest is padding
    input_ids: np.ndarray  # (T,) int64
    text_features: np.ndarray  # (T, D) float32: BERT last hidden state through the text projection
    text_token_mask: np.ndarray  # (T,) bool: True on real tokens
    text_self_attention_mask: np.ndarray  # (T, T) bool: True where token i may attend to token j
    position_ids: np.ndarray  # (T,) int64: position within its phrase

    @property
    def caption(self) -> str:
        return caption_of(self.labels)


def caption_of(labels: Sequence[str]) -> str:
    """The Grounding DINO caption: lower-cased labels joined by " . ", ending with " ."."""
    return " . ".join(s.strip().lower() for s in labels) + " ."


def _check_labels(labels: Sequence[str]) -> list[str]:
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence) or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty sequence of strings, got {labels!r}")
    seen, out = set(), []
    for k, s in enumerate(labels):
        if not isinstance(s, str) or not s.strip():
            raise ValueError(f"labels[{k}] must be a non-empty string, got {s!r}")
        key = s.strip().lower()
        if key in seen:
            raise ValueError(f"labels[{k}] {s!r} is a duplicate")
        if "." in key or "?" in key:
            raise ValueError(f"labels[{k}] {s!r} contains '.' or '?', which Grounding DINO uses as phrase delimiters")
        seen.add(key)
        out.append(s)
    return out


def _special_ids(model) -> set[int]:
    return {int(v) for v in model.model.special_tokens.tolist()}


def _label_token_ids(model, tokenizer, labels: Sequence[str]) -> tuple[list[list[int]], int, int, int]:
    tok = _tokenizer_of(tokenizer)
    special = _special_ids(model)
    cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
    dot = tok(".", add_special_tokens=False)["input_ids"]
    if len(dot) != 1 or dot[0] not in special or cls_id not in special or sep_id not in special:
        raise ValueError(f"the tokenizer's [CLS] {cls_id}, [SEP] {sep_id} and '.' {dot} ids are not the model's "
                         f"phrase delimiters {sorted(special)} (Grounding DINO expects a bert-base-uncased vocabulary)")
    ids = []
    for s in labels:
        t = tok(s.strip().lower(), add_special_tokens=False)["input_ids"]
        if not t or any(i in special for i in t):
            raise ValueError(f"label {s!r} tokenizes to {t}: empty or containing a delimiter token")
        ids.append(list(t))
    return ids, cls_id, sep_id, dot[0]


def chunk_labels(model, tokenizer, labels: Sequence[str], max_text_len: int | None = None) -> list[list[int]]:
    """Label indices per chunk: consecutive labels, greedily packed so that each caption
    ([CLS] l1 . l2 . ... [SEP]) fits ``max_text_len`` (the model's by default)."""
    labels = _check_labels(labels)
    T = int(max_text_len or model.config.max_text_len)
    ids, *_ = _label_token_ids(model, tokenizer, labels)
    chunks: list[list[int]] = []
    used = T  # forces a new chunk at the first label
    for k, t in enumerate(ids):
        need = len(t) + 1  # tokens + '.'
        if 2 + need > T:
            raise ValueError(f"label {labels[k]!r} has {len(t)} tokens: it cannot fit a caption of max_text_len {T}")
        if used + need > T:
            chunks.append([])
            used = 2  # [CLS] and [SEP]
        chunks[-1].append(k)
        used += need
    return chunks


def encode_labels(model, tokenizer, labels: Sequence[str], *, max_text_len: int | None = None) -> list[TextChunk]:
    """Everything Grounding DINO computes from the text alone, once per label list (PyTorch).

    ``max_text_len`` (default: the model's) bounds each chunk's caption; the arrays are padded to the
    model's ``max_text_len`` so that one exported image graph serves every chunk."""
    from transformers.models.grounding_dino.modeling_grounding_dino import (
        generate_masks_with_special_tokens_and_transfer_map,
    )

    labels = _check_labels(labels)
    T = int(model.config.max_text_len)
    limit = int(max_text_len or T)
    if limit > T:
        raise ValueError(f"max_text_len {limit} exceeds the model's {T}")
    ids, cls_id, sep_id, dot_id = _label_token_ids(model, tokenizer, labels)
    m = model.model
    out = []
    for members in chunk_labels(model, tokenizer, labels, limit):
        seq, spans = [cls_id], []
        for k in members:
            spans.append((len(seq), len(seq) + len(ids[k])))
            seq += ids[k] + [dot_id]
        seq.append(sep_id)
        n = len(seq)
        input_ids = torch.zeros(1, T, dtype=torch.long)
        input_ids[0, :n] = torch.tensor(seq)
        token_mask = torch.zeros(1, T, dtype=torch.bool)
        token_mask[0, :n] = True
        with torch.no_grad():
            self_mask, position_ids = generate_masks_with_special_tokens_and_transfer_map(
                input_ids, m.special_tokens.to(input_ids.device))
            hidden = m.text_backbone(input_ids, self_mask[:, None], torch.zeros_like(input_ids), position_ids,
                                     return_dict=True).last_hidden_state
            feats = m.text_projection(hidden)
        out.append(TextChunk(
            labels=tuple(labels[k] for k in members), label_ids=tuple(members), spans=tuple(spans), length=n,
            input_ids=input_ids[0].numpy().astype(np.int64), text_features=feats[0].float().numpy(),
            text_token_mask=token_mask[0].numpy(), text_self_attention_mask=self_mask[0].numpy().astype(bool),
            position_ids=position_ids[0].numpy().astype(np.int64)))
    return out


def chunk_feeds(chunk: TextChunk) -> dict[str, np.ndarray]:
    """The text inputs of the image graph for one chunk (batch of 1)."""
    return {"text_features": chunk.text_features[None].astype(np.float32),
            "text_token_mask": chunk.text_token_mask[None].astype(bool),
            "text_self_attention_mask": chunk.text_self_attention_mask[None].astype(bool),
            "position_ids": chunk.position_ids[None].astype(np.int64)}


# -------------------------------------------------------------------------------------------- image side


def _inverse_sigmoid(x, eps: float = 1e-5):
    """``torch.special.logit(x, eps)`` written with exportable ops."""
    x = x.clamp(min=eps, max=1 - eps)
    return (x / (1 - x)).log()


def _encoder_reference_points(spatial_shapes_list, valid_ratios):
    """``GroundingDinoEncoder.get_reference_points`` with ``arange + 0.5`` for ``linspace(0.5, n - 0.5, n)``
    (the same values, exactly)."""
    out = []
    for level, (height, width) in enumerate(spatial_shapes_list):
        ref_y, ref_x = torch.meshgrid(torch.arange(height, dtype=valid_ratios.dtype) + 0.5,
                                      torch.arange(width, dtype=valid_ratios.dtype) + 0.5, indexing="ij")
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
        out.append(torch.stack((ref_x, ref_y), -1))
    reference_points = torch.cat(out, 1)
    return reference_points[:, :, None] * valid_ratios[:, None]


def _encoder_output_proposals(m, enc_output, padding_mask, spatial_shapes_list):
    """``GroundingDinoModel.generate_encoder_output_proposals`` with ``arange`` for ``linspace(0, n - 1, n)``."""
    batch_size = enc_output.shape[0]
    proposals = []
    current = 0
    for level, (height, width) in enumerate(spatial_shapes_list):
        mask_l = padding_mask[:, current: current + height * width].view(batch_size, height, width, 1)
        valid_height = torch.sum(~mask_l[:, :, 0, 0], 1)
        valid_width = torch.sum(~mask_l[:, 0, :, 0], 1)
        grid_y, grid_x = torch.meshgrid(torch.arange(height, dtype=enc_output.dtype),
                                        torch.arange(width, dtype=enc_output.dtype), indexing="ij")
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
        scale = torch.cat([valid_width.unsqueeze(-1), valid_height.unsqueeze(-1)], 1).view(batch_size, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(batch_size, -1, -1, -1) + 0.5) / scale
        width_height = torch.ones_like(grid) * 0.05 * (2.0 ** level)
        proposals.append(torch.cat((grid, width_height), -1).view(batch_size, -1, 4))
        current += height * width
    output_proposals = torch.cat(proposals, 1)
    valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
    output_proposals = torch.log(output_proposals / (1 - output_proposals))
    output_proposals = output_proposals.masked_fill(padding_mask.unsqueeze(-1), float("inf"))
    output_proposals = output_proposals.masked_fill(~valid, float("inf"))
    object_query = enc_output.masked_fill(padding_mask.unsqueeze(-1), float(0))
    object_query = object_query.masked_fill(~valid, float(0))
    return m.enc_output_norm(m.enc_output(object_query)), output_proposals


class GroundingImageSide(nn.Module):
    """The exportable image side of a ``GroundingDinoForObjectDetection``: everything of its ``forward``
    after the text backbone, for precomputed text tensors (the :data:`IMAGE_INPUTS`); returns the
    last decoder layer's ``logits`` and ``pred_boxes``. Mirrors ``GroundingDinoModel.forward`` of
    transformers 5.x step for step. Built in eval mode (the detector too)."""

    def __init__(self, detector) -> None:
        super().__init__()
        self.det = detector
        self.eval()

    def forward(self, pixel_values, pixel_mask, text_features, text_token_mask, text_self_attention_mask,
                position_ids):
        det = self.det
        m = det.model
        cfg = m.config
        text_token_mask = text_token_mask.to(torch.bool)
        text_self_attention_mask = text_self_attention_mask.to(torch.bool)
        batch_size = pixel_values.shape[0]

        vision_features, position_embeddings_list = m.backbone(pixel_values, pixel_mask)
        feature_maps, masks = [], []
        for level, (source, mask) in enumerate(vision_features):
            feature_maps.append(m.input_proj_vision[level](source))
            masks.append(mask)
        if cfg.num_feature_levels > len(feature_maps):
            n_src = len(feature_maps)
            for level in range(n_src, cfg.num_feature_levels):
                if level == n_src:
                    source = m.input_proj_vision[level](vision_features[-1][0])
                else:
                    source = m.input_proj_vision[level](feature_maps[-1])
                mask = F.interpolate(pixel_mask[None].float(), size=source.shape[-2:]).to(torch.bool)[0]
                pos_l = m.backbone.position_embedding(source, mask).to(source.dtype)
                feature_maps.append(source)
                masks.append(mask)
                position_embeddings_list.append(pos_l)

        query_embeds = None
        if cfg.embedding_init_target or cfg.two_stage:
            query_embeds = getattr(m, "query_position_embeddings", None)
            query_embeds = query_embeds.weight if query_embeds is not None else None

        source_flatten, mask_flatten, lvl_pos_embed_flatten, spatial_shapes_list = [], [], [], []
        for level, (source, mask, pos_embed) in enumerate(zip(feature_maps, masks, position_embeddings_list)):
            _, _, height, width = source.shape
            spatial_shapes_list.append((height, width))
            source_flatten.append(source.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            lvl_pos_embed_flatten.append(pos_embed.flatten(2).transpose(1, 2) + m.level_embed[level].view(1, 1, -1))
        source_flatten = torch.cat(source_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        lvl_pos_embed_flatten = torch.cat(lvl_pos_embed_flatten, 1)
        spatial_shapes = torch.as_tensor(spatial_shapes_list, dtype=torch.long, device=source_flatten.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([m.get_valid_ratio(mk, dtype=source_flatten.dtype) for mk in masks], 1)

        # the encoder loop of GroundingDinoEncoder.forward, with reference points built from arange
        # (its torch.linspace exports as float64 constants, which ONNX Runtime's GridSample rejects)
        reference_points = _encoder_reference_points(spatial_shapes_list, valid_ratios)
        enc_vision, enc_text = source_flatten, text_features
        for layer in m.encoder.layers:
            (enc_vision, enc_text), _ = layer(
                vision_features=enc_vision, vision_position_embedding=lvl_pos_embed_flatten,
                spatial_shapes=spatial_shapes, spatial_shapes_list=spatial_shapes_list,
                level_start_index=level_start_index, key_padding_mask=~mask_flatten,
                reference_points=reference_points, text_features=enc_text, text_attention_mask=~text_token_mask,
                text_position_embedding=None, text_self_attention_masks=~text_self_attention_mask,
                text_position_ids=position_ids)

        if cfg.two_stage:
            object_query_embedding, output_proposals = _encoder_output_proposals(
                m, enc_vision, ~mask_flatten, spatial_shapes_list)
            enc_outputs_class = m.encoder_output_class_embed(object_query_embedding, enc_text, text_token_mask)
            enc_outputs_coord_logits = m.encoder_output_bbox_embed(object_query_embedding) + output_proposals
            topk_logits = enc_outputs_class.max(-1)[0]
            topk_proposals = torch.topk(topk_logits, cfg.num_queries, dim=1)[1]
            topk_coords_logits = torch.gather(enc_outputs_coord_logits, 1,
                                              topk_proposals.unsqueeze(-1).repeat(1, 1, 4))
            reference_points = topk_coords_logits.sigmoid()
            init_reference_points = reference_points
            if query_embeds is not None:
                target = query_embeds.unsqueeze(0).repeat(batch_size, 1, 1)
            else:
                target = torch.gather(object_query_embedding, 1,
                                      topk_proposals.unsqueeze(-1).repeat(1, 1, cfg.d_model))
        else:
            target = query_embeds.unsqueeze(0).repeat(batch_size, 1, 1)
            reference_points = m.reference_points.weight.unsqueeze(0).repeat(batch_size, 1, 1).sigmoid()
            init_reference_points = reference_points

        dec = m.decoder(
            inputs_embeds=target, vision_encoder_hidden_states=enc_vision,
            vision_encoder_attention_mask=mask_flatten, text_encoder_hidden_states=enc_text,
            text_encoder_attention_mask=~text_token_mask, reference_points=reference_points,
            spatial_shapes=spatial_shapes, spatial_shapes_list=spatial_shapes_list,
            level_start_index=level_start_index, valid_ratios=valid_ratios, self_attn_mask=None,
            output_attentions=False, output_hidden_states=False, return_dict=True)

        # the detection head of the last decoder layer only (what logits / pred_boxes are)
        n_levels = dec.intermediate_hidden_states.shape[1]
        hidden = dec.intermediate_hidden_states[:, n_levels - 1]
        reference = init_reference_points if n_levels == 1 else dec.intermediate_reference_points[:, n_levels - 2]
        reference = _inverse_sigmoid(reference, 1e-5)
        logits = det.class_embed[n_levels - 1](vision_hidden_state=hidden, text_hidden_state=enc_text,
                                               text_token_mask=text_token_mask)
        delta = det.bbox_embed[n_levels - 1](hidden)
        if reference.shape[-1] == 4:
            coord_logits = delta + reference
        else:
            coord_logits = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
        return logits, coord_logits.sigmoid()


def _check_pure_pytorch_attention(model) -> None:
    from transformers.models.grounding_dino import modeling_grounding_dino as gd

    ref = gd.MultiScaleDeformableAttention.forward
    for name, mod in model.named_modules():
        if type(mod).__name__ == "MultiScaleDeformableAttention":
            fwd = getattr(type(mod), "forward", None)
            if fwd is not ref or "forward" in vars(mod):
                raise RuntimeError(f"{name}: multi-scale deformable attention was replaced (hub kernel?); the export "
                                   "needs transformers' pure-PyTorch path (do not call kernelize() before exporting)")


# ----------------------------------------------------------------------------------------------- export


def model_fingerprint(model) -> str:
    """sha256 over the model's config and state dict: ties text.npz to the image graph it feeds."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()




def _export_image_graph(model, chunk: TextChunk, path: Path, image_size: tuple[int, int], opset: int,
                        fingerprint: str, name: str) -> None:
    import onnx

    _check_pure_pytorch_attention(model)
    h, w = image_size
    wrapper = GroundingImageSide(model)
    feeds = {k: torch.from_numpy(v) for k, v in chunk_feeds(chunk).items()}
    pixel_values = torch.zeros(1, 3, h, w)
    pixel_mask = torch.ones(1, h, w, dtype=torch.long)
    args = (pixel_values, pixel_mask, feeds["text_features"], feeds["text_token_mask"],
            feeds["text_self_attention_mask"], feeds["position_ids"])
    old = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"  # shape assertions: constant for a fixed-size graph
    try:
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=opset,
                              input_names=list(IMAGE_INPUTS), output_names=list(IMAGE_OUTPUTS),
                              do_constant_folding=True)
    finally:
        if old is None:
            os.environ.pop("TRANSFORMERS_DISABLE_TORCH_CHECK", None)
        else:
            os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = old
    proto = onnx.load(str(path))
    for key, val in (("latentcast.format", BUNDLE_FORMAT), ("latentcast.model", name),
                     ("latentcast.model_fingerprint", fingerprint), ("latentcast.image_size", f"{h}x{w}"),
                     ("latentcast.max_text_len", str(model.config.max_text_len))):
        e = proto.metadata_props.add()
        e.key, e.value = key, val
    onnx.save(proto, str(path))


def export_labels(model, tokenizer, labels: Sequence[str], out_dir: str | Path, *,
                  max_text_len: int | None = None, box_threshold: float = DEFAULT_BOX_THRESHOLD,
                  text_threshold: float = DEFAULT_TEXT_THRESHOLD, fingerprint: str | None = None) -> Path:
    """(Re)write ``text.npz`` and ``manifest.json`` of a bundle for a new label list, keeping its
    ``image.onnx`` (which must come from the same model: checked by fingerprint). Returns the manifest path."""
    import onnx

    from latentcast.proto.ids import label_set_hash

    out = Path(out_dir)
    image = out / "image.onnx"
    if not image.is_file():
        raise FileNotFoundError(f"{image} not found: export the image graph first (export_grounding)")
    fingerprint = fingerprint or model_fingerprint(model)
    meta = {p.key: p.value for p in onnx.load(str(image), load_external_data=False).metadata_props}
    if meta.get("latentcast.model_fingerprint") != fingerprint:
        raise ValueError(f"{image} was exported from another model (fingerprint "
                         f"{meta.get('latentcast.model_fingerprint', '?')[:12]} != {fingerprint[:12]}); "
                         "run export_grounding for this model")
    hh, ww = (int(v) for v in meta["latentcast.image_size"].split("x"))
    chunks = encode_labels(model, tokenizer, labels, max_text_len=max_text_len)
    np.savez(out / "text.npz",
             text_features=np.stack([c.text_features for c in chunks]).astype(np.float32),
             text_token_mask=np.stack([c.text_token_mask for c in chunks]),
             text_self_attention_mask=np.stack([c.text_self_attention_mask for c in chunks]),
             position_ids=np.stack([c.position_ids for c in chunks]),
             input_ids=np.stack([c.input_ids for c in chunks]))
    mean, std = _normalisation_of(tokenizer)
    labels = list(labels)
    manifest = {
        "format": BUNDLE_FORMAT,
        "model": meta.get("latentcast.model", ""),
        "model_fingerprint": fingerprint,
        "image_size": [hh, ww],
        "resize": "letterbox-top-left",  # aspect kept; padding is 0 after normalisation, pixel_mask 0 there
        "rescale": 1.0 / 255.0,
        "mean": mean,
        "std": std,
        "max_text_len": int(model.config.max_text_len),
        "chunk_text_len": int(max_text_len or model.config.max_text_len),
        "num_queries": int(model.config.num_queries),
        "d_model": int(model.config.d_model),
        "labels": labels,
        "label_set_hash": label_set_hash(labels).hex(),
        "chunks": [{"labels": list(c.label_ids), "spans": [list(s) for s in c.spans], "length": c.length,
                    "caption": c.caption} for c in chunks],
        "box_threshold": float(box_threshold),
        "text_threshold": float(text_threshold),
        "inputs": list(IMAGE_INPUTS),
        "outputs": list(IMAGE_OUTPUTS),
        "files": {"image.onnx": file_sha256(image), "text.npz": file_sha256(out / "text.npz")},
    }
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2))
    return path


def export_grounding(model, tokenizer, labels: Sequence[str], out_dir: str | Path, *,
                     image_size: tuple[int, int] = (576, 768), opset: int = 17, max_text_len: int | None = None,
                     box_threshold: float = DEFAULT_BOX_THRESHOLD, text_threshold: float = DEFAULT_TEXT_THRESHOLD,
                     name: str | None = None) -> Path:
    """Export a grounding bundle for the edge: ``image.onnx`` (fixed ``image_size`` = (H, W), text padded
    to the model's max_text_len), ``text.npz`` (the label list's text side, one row per chunk) and
    ``manifest.json``. ``tokenizer`` may be the processor. Returns the bundle folder."""
    _transformers()
    h, w = (int(v) for v in image_size)
    if h < 32 or w < 32:
        raise ValueError(f"image_size {image_size!r} too small (at least 32x32)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    fp = model_fingerprint(model)
    name = name or getattr(model, "name_or_path_for_bundle", None) or getattr(model.config, "_name_or_path", "")
    chunks = encode_labels(model, tokenizer, labels, max_text_len=max_text_len)
    _export_image_graph(model, chunks[0], out / "image.onnx", (h, w), opset, fp, str(name))
    export_labels(model, tokenizer, labels, out, max_text_len=max_text_len, box_threshold=box_threshold,
                  text_threshold=text_threshold, fingerprint=fp)
    log.info("grounding bundle %s: %s, %dx%d, %d labels in %d chunk(s)", out, name, h, w, len(labels), len(chunks))
    return out


# --------------------------------------------------------------------------------------------- TensorRT


def build_tensorrt_engine(onnx_path: str | Path, engine_path: str | Path, fp16: bool = True,
                          workspace_gb: float = 4.0) -> Path:
    """Build a serialized TensorRT engine from ``image.onnx`` (fixed shapes). Needs the ``tensorrt``
    package and a CUDA GPU; otherwise a ``RuntimeError`` (the ONNX Runtime backend works everywhere).
    The edge can also let ONNX Runtime's TensorRT execution provider build and cache the engine
    (``OpenVocabDetector(provider="tensorrt")``)."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX graph {onnx_path} not found")
    try:
        import tensorrt as trt
    except ImportError:
        raise RuntimeError("TensorRT is not installed / no CUDA GPU: the ONNX Runtime backend works everywhere "
                           "(install TensorRT's Python package on a machine with an NVIDIA GPU to build engines)") \
            from None
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except Exception as exc:
        raise RuntimeError(f"TensorRT is installed but no CUDA GPU is usable ({exc}): the ONNX Runtime backend "
                           "works everywhere") from None
    if builder is None:
        raise RuntimeError("TensorRT is installed but no CUDA GPU is usable: the ONNX Runtime backend works everywhere")
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16 and builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(engine))
    return engine_path
