"""Audited lower bound vs accounted epsilon on the quickstart: record-level DP-SGD at target
epsilon 1, 3 and 8 and user-level DP-FedAvg at 8 (fixed and Poisson cohorts), 1000 canaries each.

Writes docs/audit_quickstart.png and prints one line per audit (the numbers docs/privacy.md
quotes):

  python scripts/audit_figure.py                     # about a minute on 2 CPU cores
  python scripts/audit_figure.py --canaries 2000 --out /tmp/audit.png
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--out", default=str(ROOT / "docs" / "audit_quickstart.png"))
    args = parser.parse_args()
    rows = []
    for label, overrides in AUDITS.items():
        (result,) = audit(load_config(ROOT / "configs" / "quickstart.yaml", overrides), args.canaries).values()
        rows.append({"label": label, **result})
        print(f"{label}: sigma {result['noise_multiplier']:.4f}, accounted {result['epsilon_accounted']:.3f}, "
              f"lower bound {result['epsilon_lower_bound']:.3f} (95%), largest certifiable "
              f"{result['largest_certifiable']:.3f}", flush=True)
    path = plot_audit_bounds(rows, args.out, f"Quickstart: canary audit ({args.canaries} canaries) vs accountant")
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
