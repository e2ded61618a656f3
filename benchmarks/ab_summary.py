"""Summary of ``benchmarks/ab_trees.sh``: tokens/s of the old and the new tree per configuration
and step kind (dense, sparse), each round, and new / old of the medians."""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def main(out: str) -> None:
    rates: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(Path(out).glob("*_*_*.json")):
        tree, cfg, _ = path.stem.split("_")
        result = json.loads(path.read_text())
        for kind in ("dense", "sparse"):
            rates[(cfg, kind)][tree].append(result[kind]["tokens_per_s"])
    summary = {}
    for (cfg, kind), trees in sorted(rates.items()):
        old, new = statistics.median(trees["old"]), statistics.median(trees["new"])
        summary[f"{cfg}/{kind}"] = {"old": trees["old"], "new": trees["new"], "new_over_old": new / old}
        print(f"{cfg:>12} {kind:>6}: old {old:,.0f} tokens/s, new {new:,.0f} tokens/s, new/old {new / old:.4f} "
              f"(rounds old {[round(x) for x in trees['old']]}, new {[round(x) for x in trees['new']]})")
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
