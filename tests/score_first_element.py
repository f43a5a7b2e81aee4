"""An evaluation command for the sweep tests: prints a score of a merged folder as its last line.

Plain Python (no torch import) so that each evaluation is quick: the score is the first float32
element of one tensor, read straight from the safetensors file.
"""

import json
import struct
import sys

with open(f"{sys.argv[1]}/model.safetensors", "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    entry = json.loads(f.read(n))["layer.0.weight"]
    f.seek(8 + n + entry["data_offsets"][0])
    print("evaluating", sys.argv[1])
    print(struct.unpack("<f", f.read(4))[0])
