"""The edge and the wire formats must import and encode without torch installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_edge_and_proto_import_without_torch(tiny_bundle):
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, Block())
        import numpy as np
        from latentcast.edge.encoder import EdgeEncoder
        from latentcast.edge import app, capture, client, config, grounding, open_vocab, sender, tasks
        import latentcast.detector
        from latentcast.proto import bitstream, entropy, grid, symbols
        enc = EdgeEncoder(bundle={str(tiny_bundle)!r})
        data = enc.compress(np.zeros((64, 64, 3), np.uint8), rate_point=0)
        assert bitstream.unpack(data).header.width == 64
        assert "torch" not in sys.modules
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
