"""``latentcast task``: make a task's label list once with an LLM, show and list them.

::

    latentcast task new traffic --description "count vehicles and cyclists at an intersection"
    latentcast task show traffic            # labels, source (model, prompt version, date), hash, file
    latentcast task list                    # shipped and cached lists; '*' marks the one a name resolves to

The LLM client is ``edge/task_llm.py`` (settings: :class:`~latentcast.edge.task_llm.LlmConfig`, a YAML
file with ``--config``, ``LATENTCAST_LLM__<KEY>`` variables, then these flags); the lists are
``edge/tasks.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from latentcast.edge.task_llm import (
    ENV_PREFIX,
    PROMPT_VERSION,
    LabelGenerationError,
    LlmConfig,
    generate_task,
    load_llm_config,
    safe_url,
    task_phrase,
)
from latentcast.edge.tasks import (
    TaskError,
    TaskList,
    TaskSource,
    cache_dir,
    check_task_name,
    list_tasks,
    load_task,
    load_task_file,
    shipped_dir,
)
from latentcast.tools.options import add_dataclass_options, dataclass_from_args

log = logging.getLogger(__name__)

__all__ = ["COCO80", "LLM_OPTIONS", "add_arguments", "main"]

#: the LlmConfig fields ``task new`` takes as flags (over --config and the LATENTCAST_LLM__* variables)
LLM_OPTIONS = ("url", "model", "timeout_s", "api_key_env", "min_labels")

# the 80 COCO class names in YOLOX-nano's output order: the embedded grounding backend's classes when
# the shared folder's models/coco80_labels.txt is not at hand (`task show` counts groundable labels)
COCO80 = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)


# ---------------------------------------------------------------------- commands


def _detector_classes(path: str | None) -> tuple[list[str], str]:
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"detector label file {p} not found")
        return [s.strip() for s in p.read_text().splitlines() if s.strip()], str(p)
    try:
        from latentcast.shared import shared_path

        p = shared_path("models", "coco80_labels.txt")
        return [s.strip() for s in p.read_text().splitlines() if s.strip()], "YOLOX-nano COCO-80"
    except FileNotFoundError:
        return list(COCO80), "YOLOX-nano COCO-80 (built-in names)"


def _coverage_line(tl: TaskList, classes_file: str | None) -> str:
    from latentcast.edge.grounding import label_coverage

    classes, what = _detector_classes(classes_file)
    cov = label_coverage(tl.labels, classes, strict=False)
    return (f"{what} can ground {len(cov.grounded)} of {len(tl.labels)} labels ({len(cov.shadowed)} more name a "
            f"class another label already takes, {len(cov.unknown)} unknown to it: skipped on the edge)")


def _source_text(s: TaskSource) -> str:
    parts = [s.kind, f"model {s.model}", f"prompt {s.prompt_version or '-'}"]
    if s.endpoint:
        parts.append(f"endpoint {s.endpoint}")
    parts.append(f"created {s.created}")
    return ", ".join(parts)


def cmd_new(a: argparse.Namespace) -> int:
    check_task_name(a.name)
    cfg = dataclass_from_args(LlmConfig, a, base=load_llm_config(a.config))  # flags given override the file
    dest = cache_dir() / f"{a.name}.json"
    before = None
    if dest.is_file():
        try:
            before = load_task_file(dest)
        except TaskError:
            pass
    print(f"asking {cfg.model} at {safe_url(cfg.url)} for the {task_phrase(a.name)!r} labels "
          f"(prompt {PROMPT_VERSION}, timeout {cfg.timeout_s:g} s)...", flush=True)
    try:
        tl = generate_task(a.name, a.description, cfg, task=a.task_phrase)
    except LabelGenerationError as exc:
        kept = f"; the cached list {dest} is unchanged" if dest.is_file() else "; nothing was written"
        print(f"error: {exc}{kept}", file=sys.stderr)
        return 1
    print(f"wrote {tl.path}: {len(tl.labels)} labels from {tl.source.model} at {tl.source.endpoint}, "
          f"label set hash {tl.hash}")
    if before is not None:
        print(f"  replaced the previous list ({len(before.labels)} labels, hash {before.hash}, "
              f"created {before.source.created})")
    shipped = [e for e in list_tasks() if e.name == a.name and e.origin == "shipped"]
    if shipped:
        print(f"  overrides the shipped list {shipped[0].path} (delete {tl.path} to use it again)")
    print("  " + _coverage_line(tl, None))
    print("  first labels: " + ", ".join(tl.labels[:12]) + (", ..." if len(tl.labels) > 12 else ""))
    return 0


def cmd_show(a: argparse.Namespace) -> int:
    tl = load_task_file(Path(a.name)) if a.name.endswith(".json") else load_task(a.name)
    if a.json:
        d = tl.to_dict()
        d["path"] = str(tl.path)
        print(json.dumps(d, indent=2, ensure_ascii=False))
        return 0
    origin = "shipped list" if tl.path.parent == shipped_dir() else (
        "user cache" if tl.path.parent == cache_dir() else "file")
    print(f"{tl.name}: {len(tl.labels)} labels")
    print(f"  description: {tl.description}")
    print(f"  source: {_source_text(tl.source)}")
    print(f"  label set hash: {tl.hash} (in the packet headers of streams grounded with this list)")
    print(f"  file: {tl.path} ({origin})")
    print("  " + _coverage_line(tl, a.classes))
    print("  labels:")
    line = ""
    for i, lab in enumerate(tl.labels):  # wrapped at label boundaries: a label never spans two lines
        item = lab + ("," if i < len(tl.labels) - 1 else "")
        if line and len(line) + 1 + len(item) > 96:
            print("    " + line)
            line = item
        else:
            line = f"{line} {item}" if line else item
    print("    " + line)
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    entries = list_tasks()
    if not entries:
        print(f"no task lists (cache {cache_dir()})")
        return 0
    print(f"{'':2}{'NAME':<20} {'ORIGIN':<8} {'LABELS':>6}  {'HASH':<8}  SOURCE")
    for e in entries:
        mark = "*" if e.active else " "
        try:
            tl = load_task_file(e.path)
            row = (
                f"{len(tl.labels):>6}  {tl.hash:<8}  {tl.source.model} ({tl.source.prompt_version or tl.source.kind}"
                f", {tl.source.created})"
            )
        except TaskError as exc:
            row = f"{'-':>6}  {'-':<8}  unreadable: {exc}"
        note = "" if e.active else "  (overridden by the cached list)"
        print(f"{mark} {e.name:<20} {e.origin:<8} {row}{note}")
    print(f"* = the list a task name resolves to (cache {cache_dir()} before the shipped lists)")
    return 0


def add_arguments(t: argparse.ArgumentParser) -> None:
    """``task new|show|list`` on the ``task`` command's parser."""
    ts = t.add_subparsers(dest="task_cmd", required=True)
    n = ts.add_parser("new", help="ask an OpenAI-compatible LLM once for a task's labels and cache them")
    n.add_argument("name", help="task name: lower-case letters, digits, '-' and '_' (e.g. traffic)")
    n.add_argument("--description", required=True, help="what the task is (the prompt's {Task Description})")
    n.add_argument("--task-phrase", help="the prompt's {Task} (default: the name in words + ' task')")
    n.add_argument("--config", help=f"LLM settings YAML (url, model, api_key_env, timeout_s, ...); "
                                    f"{ENV_PREFIX}__<KEY> variables override it")
    add_dataclass_options(n, LlmConfig, include=LLM_OPTIONS, rename={"timeout_s": "--timeout"}, only_given=True)
    n.set_defaults(func=cmd_new)
    s = ts.add_parser("show", help="a task list: labels, source (model, prompt version, date), hash, file")
    s.add_argument("name", help="task name (cache, then shipped) or a .json file")
    s.add_argument("--classes", help="detector class-name file to count groundable labels against "
                                     "(default: YOLOX-nano's COCO-80)")
    s.add_argument("--json", action="store_true", help="print the list as JSON")
    s.set_defaults(func=cmd_show)
    ls = ts.add_parser("list", help="shipped and cached task lists; '*' marks the one a name resolves to")
    ls.set_defaults(func=cmd_list)


def main(a: argparse.Namespace) -> int:
    """Runs the ``task`` subcommand the arguments name."""
    return a.func(a)
