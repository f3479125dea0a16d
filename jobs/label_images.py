"""Ray job entrypoint for one labeling run; the same flags as ``mlbatch label``.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/label_images.py \
        --manifest s3://bucket/manifests/ --model s3://bucket/models/street/v1 --output s3://bucket/labels/run1
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a --working-dir checkout too

from mlbatch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
