"""Regenerate the committed gRPC stubs from ``latentcast_v1.proto`` (needs ``grpcio-tools``).

    python -m latentcast.proto.generate            # rewrite the stubs in this folder
    python -m latentcast.proto.generate --out DIR  # write them elsewhere (the drift test does)

The .proto is staged as ``latentcast/proto/latentcast_v1.proto`` so the generated
``_pb2_grpc`` module imports ``from latentcast.proto import latentcast_v1_pb2``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "latentcast_v1.proto"
STUBS = ("latentcast_v1_pb2.py", "latentcast_v1_pb2.pyi", "latentcast_v1_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    """Compile the .proto into ``out``; returns the written stub paths."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - dev dependency
        raise ImportError("regenerating stubs needs grpcio-tools: pip install -e '.[dev]'") from exc
    import grpc_tools

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src" / "latentcast" / "proto"
        src.mkdir(parents=True)
        shutil.copy(PROTO, src / PROTO.name)
        gen = Path(tmp) / "gen"
        gen.mkdir()
        include = Path(grpc_tools.__file__).resolve().parent / "_proto"
        rc = protoc.main(["protoc", f"-I{Path(tmp) / 'src'}", f"-I{include}", f"--python_out={gen}",
                          f"--pyi_out={gen}", f"--grpc_python_out={gen}", f"latentcast/proto/{PROTO.name}"])
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        written = []
        for name in STUBS:
            dst = out / name
            shutil.copy(gen / "latentcast" / "proto" / name, dst)
            written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE, help="output folder (default: this package)")
    a = p.parse_args(argv)
    for path in generate(a.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
