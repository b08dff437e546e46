"""Write webdataset shards + manifest.json from LLaVA-format / ShareGPT JSON.

  python tools/make_shards.py llava_instruct.json --image-root images/ --source instruct --out shards/instruct \
      --max-samples-per-shard 5000 --workers 8
  python tools/make_shards.py sharegpt.json --source sharegpt --out shards/sharegpt

Re-running with the same inputs keeps intact shards and resumes after the last one; see megallava/data/shards.py.
Skipped records are counted per reason in manifest.json ("skipped") with the ids of the first 100 of each reason
("skipped_ids"), and a few ids per reason are printed. Image paths must stay inside --image-root as written (symlinks
inside the root are followed); others are skipped as outside_image_root unless --allow-outside-image-root is given.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megallava.data.shards import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
