"""DeepSpeed entry point for scoring, sharded over ranks.

    deepspeed --num_gpus 8 launch/score.py --model DIR --data FILE --out scores.jsonl \
        --deepspeed configs/ds/zero3.json
    # on a CPU-only machine: deepspeed --num_accelerators 2 launch/score.py ...
"""

import sys

from ds_unlearn.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
