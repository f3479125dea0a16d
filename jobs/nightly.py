"""Ray job entrypoint for one nightly run; the same flags as ``mlbatch nightly``.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/nightly.py \
        --input s3://bucket/incoming/ --model s3://bucket/models/street/current --output s3://bucket/labels/ \
        --fail-on-drift

Exit codes: 0 done, 1 a manifest could not be labeled, 2 bad arguments, 3 drift with --fail-on-drift.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a --working-dir checkout too

from mlbatch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
