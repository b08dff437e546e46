"""Write webdataset shards + manifest.json from LLaVA-format / ShareGPT JSON.

  python tools/make_shards.py llava_instruct.json --image-root images/ --source instruct --out shards/instruct \
      --max-samples-per-shard 5000 --workers 8
  python tools/make_shards.py sharegpt.json --source sharegpt --out shards/sharegpt

Re-running with the same inputs keeps intact shards and resumes after the last one; see megallava/data/shards.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megallava.data.shards import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
