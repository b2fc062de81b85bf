"""``python -m backbones``: table of every registered backbone with measured params and GFLOPs."""

from __future__ import annotations

import argparse
from typing import Sequence

from .profile import profile_table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="backbone names (default: all registered)")
    args = parser.parse_args(argv)
    rows = profile_table(args.names or None)
    print(f"{'name':<22} {'params(M)':>9} {'GFLOPs':>7} {'GMACs':>7}  {'compatible layout':<40} trained on")
    for name, p, layout, order in rows:
        print(f"{name:<22} {p.params_m:>9.2f} {p.gflops:>7.3f} {p.gmacs:>7.3f}  {layout:<40} {order.upper()}")
    print("Per 112x112 image, 1e9. GMACs: conv+linear multiply-accumulates (ViT: + attention matmuls). GFLOPs:\n"
          "the published (ptflops) convention = GMACs + bias, BN/LayerNorm (2/elem), PReLU/ReLU and pooling\n"
          "element ops. Our default build is RGB;\n"
          "'trained on' is the channel order of the published checkpoints (build with channel_order='bgr' for BGR).")
    return 0


if __name__ == "__main__":
    main()
