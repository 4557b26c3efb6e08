"""DeepSpeed entry point for auditing, sharded over ranks.

    deepspeed --num_gpus 8 launch/audit.py --model DIR --forget F --holdout H --out DIR \
        --deepspeed configs/ds/zero3.json
    # on a CPU-only machine: deepspeed --num_accelerators 2 launch/audit.py ...
"""

import sys

from ds_unlearn.cli import main

if __name__ == "__main__":
    sys.exit(main(["audit", *sys.argv[1:]]))
