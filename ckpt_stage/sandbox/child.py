"""Child entry point: read a LoadJob (JSON) on stdin, write the LoadResult (JSON) to argv[1]."""

from __future__ import annotations

import json
import sys


def main() -> None:
    from ckpt_stage.sandbox.job import LoadJob
    from ckpt_stage.sandbox.loader import load_and_check

    job = LoadJob.from_dict(json.load(sys.stdin))
    result = load_and_check(job)
    with open(sys.argv[1], "w") as fh:
        json.dump(result.to_dict(), fh)


if __name__ == "__main__":
    main()
