"""Running experiments: plan, build, the loop, the run directory, reports, export."""

from fedlora_jax.run.build import Experiment, build_data, build_experiment, build_model
from fedlora_jax.run.loop import RunResult, run
from fedlora_jax.run.plan import Plan

__all__ = ["Experiment", "Plan", "RunResult", "build_data", "build_experiment", "build_model", "run"]
