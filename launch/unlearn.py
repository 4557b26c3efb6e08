"""DeepSpeed entry point for unlearning, one process per GPU (or CPU rank).

    deepspeed --num_gpus 8 launch/unlearn.py --config configs/paper/gpt_neo_125m_sga.yaml \
        --deepspeed configs/ds/zero3.json --output_dir runs/sga
    # CPU-only machine: deepspeed --num_accelerators 2 launch/unlearn.py ...
    # two nodes: deepspeed --hostfile launch/hostfile.example launch/unlearn.py ...
"""

import sys

from ds_unlearn.cli import main

if __name__ == "__main__":
    sys.exit(main(["unlearn", *sys.argv[1:]]))
