"""``ds-unlearn unlearn`` where one rank alone finds bad input before the output lock's collective
(run by tests/test_distributed_written_model.py under the ``deepspeed`` launcher, 2 CPU ranks):
the check after the first collective raises InputError on rank FAIL_RANK only, as a check that
reads a file another process is changing could.

    FAIL_RANK=1 deepspeed --num_accelerators 2 tests/scripts/one_rank_input_error.py UNLEARN FLAGS...
"""

import os
import sys

import ds_unlearn.unlearn.run as run
from ds_unlearn.cli import main
from ds_unlearn.core.errors import InputError

checked = run.check_resume_settings


def check_on_one_rank(config):
    if os.environ["RANK"] == os.environ["FAIL_RANK"]:
        raise InputError(f"bad input seen by rank {os.environ['RANK']} alone")
    return checked(config)


run.check_resume_settings = check_on_one_rank

if __name__ == "__main__":
    sys.exit(main(["unlearn", *sys.argv[1:]]))
