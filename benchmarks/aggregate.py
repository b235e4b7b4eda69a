"""From per-rank results to one row per measurement: the group moves at its slowest rank."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional

RATIO_PAIRS = (
    # (name in the row, numerator peer, denominator peer): "how many times slower is A than B"
    ("syncbn_vs_batchnorm", "syncbn", "BatchNorm"),
    ("naive_vs_syncbn", "naive", "syncbn"),
    ("torch_syncbn_vs_syncbn", "torch.nn.SyncBatchNorm", "syncbn"),
    ("guard_on_vs_off", "syncbn debug=True", "syncbn"),
)


def slowest_rank_peers(per_rank: List[Dict]) -> Dict[str, Dict]:
    """Per peer, the summary of the rank with the largest median time, with the collective
    counts seen on any rank."""
    peers: Dict[str, Dict] = {}
    for name in per_rank[0]["peers"]:
        summaries = [rank["peers"][name] for rank in per_rank]
        slowest = dict(max(summaries, key=lambda s: s["ms"]))
        if "collectives_per_step" in slowest:
            seen = {n for s in summaries for n in s["collectives_per_step"]}
            slowest["collectives_per_step"] = sorted(seen)
        peers[name] = slowest
    return peers


def ratios(peers: Dict[str, Dict]) -> Dict[str, float]:
    """Time ratios of the peers measured side by side (absent peers give no ratio)."""
    return {key: peers[a]["ms"] / peers[b]["ms"]
            for key, a, b in RATIO_PAIRS if a in peers and b in peers}


def combine_peers(per_rank: List[Dict]) -> Dict:
    """The slowest rank's summary of each peer, and the ratios between them."""
    peers = slowest_rank_peers(per_rank)
    return {"threads_per_rank": per_rank[0]["threads_per_rank"], "peers": peers,
            "ratios": ratios(peers)}


def combine_layer(per_rank: List[Dict]) -> Dict:
    first = per_rank[0]
    return {
        **combine_peers(per_rank),
        "torch_syncbn_note": first["torch_syncbn_note"],
        "train_payloads": first["train_payloads"],
        "collectives_eval": max(rank["collectives_eval"] for rank in per_rank),
    }


def combine_model(per_rank: List[Dict], batch_per_rank: int) -> Dict:
    row = combine_peers(per_rank)
    global_batch = batch_per_rank * len(per_rank)
    for summary in row["peers"].values():
        summary["images_per_s"] = global_batch / (summary["ms"] / 1e3)
    return {**row, "norm_layers": per_rank[0]["norm_layers"]}


def combine_comm(per_rank: List[List[Dict]]) -> List[Dict]:
    """Per payload, the slowest rank's latency."""
    rows = []
    for rank_rows in zip(*per_rank):
        row = dict(rank_rows[0])
        for key in ("forward_us", "backward_us"):
            row[key] = max(r[key] for r in rank_rows)
        rows.append(row)
    return rows


def geometric_mean(values: Iterable[float]) -> Optional[float]:
    values = list(values)
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))
