"""DeepSpeed entry point for the memorisation lab, one process per GPU (or CPU rank).

    deepspeed --num_gpus 4 launch/memorize.py --config configs/dynamics/exposure.yaml \
        --deepspeed configs/ds/zero3.json
    # CPU-only machine: deepspeed --num_accelerators 2 launch/memorize.py ...
"""

import sys

from ds_unlearn.cli import main

if __name__ == "__main__":
    sys.exit(main(["memorize", *sys.argv[1:]]))
