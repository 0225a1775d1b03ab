"""One node of a two-node data-parallel run (tests/engine/test_distributed.py starts two).

    python -m tests.engine.parallel_node RENDEZVOUS CHECKPOINTS WEIGHTS_OUT
"""

from __future__ import annotations

import sys

from safetensors.torch import save_file

from tests.engine.test_distributed import _parallel


def main(rendezvous: str, checkpoints: str, weights_out: str) -> None:
    model, _, run = _parallel("binary", checkpoints, nodes=2, processes=1, rendezvous=rendezvous)
    run()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights_out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
