"""Python imports this at startup when tests/megatron_site is on PYTHONPATH: it installs the megatron-core CPU
redirect (tests/megatron_cpu.py), so a real `kmoe` process, the torchrun ranks it starts and `bench/` scripts
run `engine.name=megatron` on a CPU-only machine. Test and bench use only; nothing in the product imports it.

    PYTHONPATH=tests/megatron_site .venv/bin/kmoe train --config configs/train/tiny.yaml --set engine.name=megatron
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for megatron_cpu

from kmoe import quiet  # noqa: E402

quiet.install()  # before megatron-core is imported here: its known import-time warnings, as `kmoe` filters them

import megatron_cpu  # noqa: E402

megatron_cpu.install()
