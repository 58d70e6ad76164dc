"""python reports/search/agreement.py CHECKPOINT OUT.json  (run from the repository root)

The search command against the evaluation protocol on the same detector-like queries
(vipe_ray.search.agreement): validation subjects 06 09 10 13, every 24th frame, the h36m rig's ring of camera
pairs, keypoints hidden by each pattern and pixel noise of 0 or 2% of the pose's 2D height.
"""
import json
import sys

from vipe_ray.data import load_table
from vipe_ray.search.agreement import agreement
from vipe_ray.training.checkpoint import load_checkpoint

checkpoint = load_checkpoint(sys.argv[1])
table = load_table(checkpoint.config.data.table_path()).select(list(checkpoint.config.data.val_subjects))
rows = []
for hide in (None, "group:left_arm", "group:right_leg", "independent:0.2"):
    for noise in (0.0, 0.02):
        result = agreement(checkpoint, table, "h36m", every=24, hide=hide, noise=noise)
        rows.append(result)
        d = result["difference"]["hit@1"]
        print(f"hide {hide or 'none':<16} noise {noise:<5} search {100 * result['search']['hit@1']:.1f}  "
              f"evaluation {100 * result['evaluation']['hit@1']:.1f}  difference {100 * d['mean']:+.2f} +- "
              f"{100 * d['se']:.2f}  disagreeing {100 * d['disagreeing_queries']:.1f}%", flush=True)
with open(sys.argv[2], "w") as f:
    json.dump(rows, f, indent=1)
