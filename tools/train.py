"""``latentcast train codec|composer|temporal`` and ``latentcast release codec``: the options and the calls.

The training code and its defaults live with the models: ``train codec`` takes its options from
:class:`latentcast.models.training.TrainConfig`, ``train composer`` from
:class:`latentcast.models.composer_training.ComposerTrainConfig` (one ``--field-name`` per field, the
default and the field's comment as help: ``tools/options.py``); ``train temporal`` is
``tools/fit_temporal_tables.py``; ``release codec`` calls :func:`latentcast.models.release.release_codec`.
"""

from __future__ import annotations

import argparse
import logging

from latentcast.tools.options import add_average_options, add_dataclass_options, chosen_average, dataclass_from_args

log = logging.getLogger(__name__)

__all__ = ["add_arguments", "add_release_arguments", "train_codec", "train_composer", "release", "main"]

#: both trainers also take the old short spellings of the stage lengths
STEP_ALIASES = {"stage1_steps": ("--steps-1",), "stage2_steps": ("--steps-2",)}


def _csv_ints(option: str, text: str, example: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"error: {option} {text!r}: expected comma-separated integers, e.g. {example}") from None


def train_codec(a: argparse.Namespace) -> int:
    """``latentcast train codec``: stage I + II (resumable); prints the final checkpoint."""
    from latentcast.models.training import TrainConfig, train

    cfg = dataclass_from_args(TrainConfig, a)
    if a.rate_steps:
        cfg.overrides["rate_steps"] = _csv_ints("--rate-steps", a.rate_steps, "14,7,0,-7")
    cfg.overrides.update(_codec_overrides(a.set or []))
    print(train(cfg))
    return 0


def _codec_overrides(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items as ElicConfig overrides, each value parsed as its field's type."""
    import dataclasses

    from latentcast.config import ConfigError, coerce_value
    from latentcast.models.elic import ElicConfig

    defaults = {f.name: getattr(ElicConfig(), f.name) for f in dataclasses.fields(ElicConfig)}
    simple = {k: type(v) for k, v in defaults.items() if isinstance(v, (int, float))}
    lists = {k for k, v in defaults.items() if isinstance(v, tuple) and k != "rate_steps"}  # --rate-steps has its own
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if sep and key in lists:  # e.g. groups=16,16,32,64,32,32 (with M=192)
            out[key] = _csv_ints(f"--set {key}", value, "16,16,32,64,32,32")
            continue
        if not sep or key not in simple:
            raise SystemExit(f"error: --set {item!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(sorted(set(simple) | lists))}")
        try:
            out[key] = coerce_value(value, simple[key], f"--set {key}")
        except ConfigError as exc:
            raise SystemExit(f"error: {exc}") from None
    return out


def train_composer(a: argparse.Namespace) -> int:
    """``latentcast train composer``: ControlNet + adapter (DISCOVER sec. 3.4); prints the run folder."""
    from latentcast.models.composer_training import ComposerTrainConfig
    from latentcast.models.composer_training import train_composer as run

    d = ComposerTrainConfig()
    lo, hi = d.mask_min, d.mask_max
    if a.mask_range:
        try:
            lo, hi = (float(v) for v in a.mask_range.split(","))
        except ValueError:
            raise SystemExit(f"error: --mask-range {a.mask_range!r}: expected MIN,MAX, e.g. 0,0.5") from None
    print(run(dataclass_from_args(ComposerTrainConfig, a, mask_min=lo, mask_max=hi,
                                  local_files_only=not a.allow_download)))
    return 0


def train_temporal(a: argparse.Namespace) -> int:
    """``latentcast train temporal``: fit the P-frame tables (``tools/fit_temporal_tables.py``)."""
    from latentcast.tools.fit_temporal_tables import main as fit

    return fit(a)


def train_synthesis(a: argparse.Namespace) -> int:
    """``latentcast train synthesis``: a cheaper g_s for the cloud (resumable); prints the checkpoint."""
    from latentcast.models.synthesis_training import SynthesisTrainConfig
    from latentcast.models.synthesis_training import train_synthesis as run

    print(run(dataclass_from_args(SynthesisTrainConfig, a)))
    return 0


def release(a: argparse.Namespace) -> int:
    """``latentcast release codec|synthesis``: freeze a checkpoint into a weight file; prints its hash."""
    if a.what == "synthesis":
        from latentcast.models.synthesis import release_synthesis

        if a.rate_points or a.no_calibrate or a.rdoq is not None or chosen_average(a) is not None:
            raise SystemExit("error: --rate-points, --no-calibrate, --rdoq, --ema and --ema-slow are options of "
                             "`release codec`")
        print(f"{release_synthesis(a.checkpoint, a.out)}")
        return 0
    from latentcast.models.release import release_codec

    rate_points = [int(v) for v in a.rate_points.split(",")] if a.rate_points else None
    weights_hash = release_codec(a.checkpoint, a.out, rate_points=rate_points, calibrate=not a.no_calibrate,
                                 average=chosen_average(a), rdoq=a.rdoq)
    print(f"{a.out}: weights hash {weights_hash.hex()}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``train codec|composer|temporal|synthesis``, each with its own options."""
    from latentcast.models.composer_training import PRECISIONS, ComposerTrainConfig
    from latentcast.models.training import TrainConfig
    from latentcast.tools.fit_temporal_tables import add_arguments as temporal_arguments

    ts = p.add_subparsers(dest="train", required=True)
    c = ts.add_parser("codec", help="the codec, stage I then II on a CPU (resumable; models/training.py)",
                      description="Train the latent codec (models/training.py); resumes from OUT/last.pt.")
    add_dataclass_options(c, TrainConfig, exclude=("overrides",), aliases=STEP_ALIASES)
    c.add_argument("--rate-steps", help="table offsets k_q of the trained rate points, lowest rate first "
                                        "(Δ_q = exp(δ k_q); default: the model configuration's, 22,14,7,0 for lite)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a number or switch of the codec configuration (models/elic.py ElicConfig), e.g. "
                        "res_blocks=2 (with --init: extra g_a blocks start as the identity) or linear_path=true (a "
                        "fresh run starts as a block-PCA coder); repeatable")
    c.set_defaults(func=train_codec)

    m = ts.add_parser("composer", help="the ControlNet composer + adapter (DISCOVER sec. 3.4; "
                                       "models/composer_training.py)",
                      description="Train the ControlNet composer (models/composer_training.py).")
    add_dataclass_options(m, ComposerTrainConfig, aliases=STEP_ALIASES, choices={"precision": PRECISIONS},
                          exclude=("mask_min", "mask_max", "local_files_only", "num_workers"))
    m.add_argument("--mask-range", help="stage II fraction of y cells dropped, MIN,MAX (default 0,0.5)")
    m.add_argument("--allow-download", action="store_true", help="let hub ids download (default: cache only)")
    m.set_defaults(func=train_composer)

    t = ts.add_parser("temporal", help="fit the temporal P-frame entropy model on a video "
                                       "(tools/fit_temporal_tables.py)",
                      description="Fit the P-frame tables on a video (tools/fit_temporal_tables.py).")
    temporal_arguments(t)
    t.set_defaults(func=train_temporal)

    from latentcast.models.synthesis_training import SynthesisTrainConfig

    g = ts.add_parser("synthesis", help="a cheaper synthesis g_s for the cloud, on the codec's exact decoder "
                                        "inputs (resumable; models/synthesis_training.py)",
                      description="Train a student g_s for a codec (models/synthesis_training.py); resumes "
                                  "from OUT/last.pt. Packets and the edge do not change.")
    add_dataclass_options(g, SynthesisTrainConfig)
    g.set_defaults(func=train_synthesis)


def add_release_arguments(r: argparse.ArgumentParser) -> None:
    """``release codec|synthesis CHECKPOINT --out W.safetensors``."""
    r.add_argument("what", choices=["codec", "synthesis"])
    r.add_argument("checkpoint")
    r.add_argument("--out", required=True)
    r.add_argument("--rate-points", help="ship only these trained rate points, e.g. 1,2,3 (default: all)")
    r.add_argument("--no-calibrate", action="store_true",
                   help="keep the trained table offsets (default: calibrate them on training images for the "
                        "encoder's lowest cost)")
    r.add_argument("--rdoq", type=float, default=None, metavar="λ",
                   help="the RDOQ λ this codec is coded with (0: plain rounding): recorded in the file, where edges "
                        "whose codec.rdoq is unset take it from, and the table offsets are calibrated for it "
                        "(default: none recorded; calibrated for 0.05, what edges then use)")
    add_average_options(r, "release")
    r.set_defaults(func=release)


def main(a: argparse.Namespace) -> int:
    """Runs the ``train`` (or ``release``) subcommand the arguments name."""
    return a.func(a)
