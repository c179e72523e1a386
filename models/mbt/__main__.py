"""`python -m mbt COMMAND ...`: flops | export | convert-scenic | train | logmel | compare | rewrite.

Each command imports its own dependencies, so `flops` runs without torch.
"""

from __future__ import annotations

import sys

COMMANDS = {
    "flops": ("mbt.flops", "analytic FLOPs (MACs) and the paper's fusion comparison"),
    "export": ("mbt.export", "export a checkpoint or preset to ONNX with metadata + parity fixture"),
    "convert-scenic": ("mbt.convert_scenic", "convert an official scenic MBT checkpoint to ONNX"),
    "train": ("mbt.train", "train on windows written by `mbt-edge record`"),
    "logmel": ("mbt.logmel", "log-mel reference: IN.npy OUT.npy"),
    "compare": ("mbt.compare", "time one model in tract (mbt-edge bench), onnxruntime and PyTorch; parity"),
    "rewrite": ("mbt.rewrite", "rewrite an exported ONNX model so that tract runs it faster (same outputs)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m mbt {" + ",".join(COMMANDS) + "} [options]\n")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:15} {doc}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
