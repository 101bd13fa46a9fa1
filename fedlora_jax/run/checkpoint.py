"""Checkpoints of a run: everything it carries between rounds, written atomically.

A checkpoint is a directory ``RUN_DIR/checkpoints/round_<r>/`` with

* ``state.safetensors``: the server state (global trainable leaves ``params/<name>``, the base
  leaves a method rewrites ``frozen/<name>`` (FedEx, FLoRA; others rebuild the base from the
  config), the method's server state ``method/<name>`` (e.g. FedSA's per-client B banks), the
  round and the PRNG key data);
* ``meta.json``: the round, a digest of the config, the privacy ledger (participations, rounds
  done) and the SHA-256 of ``state.safetensors``.

Why safetensors + JSON rather than orbax: the state is a few flat arrays written synchronously
between rounds, safetensors is the format the PEFT export uses too, both files are readable
without JAX, and the package needs no further dependency. Atomicity comes from writing into a
temporary directory and renaming it (a crash leaves either a complete checkpoint or a
``.tmp-*`` directory that is ignored and cleaned up).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from fedlora_jax.params import leaf_names
from fedlora_jax.engine import ServerState

FORMAT = 1
_PREFIX = "round_"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (missing files, corrupt, unknown format)."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint of another config or model: resuming from it would be wrong."""


def config_digest(config_dict: dict) -> str:
    """SHA-256 of the config without the keys that do not change the run's numbers (the run's
    name, checkpointing, logging sinks; a server optimiser left at null, so the run directories of
    earlier versions resume)."""
    relevant = {k: v for k, v in config_dict.items() if k not in ("checkpoint", "name", "log")}
    federation = relevant.get("federation")
    if isinstance(federation, dict) and federation.get("server_optimizer") is None:
        relevant["federation"] = {k: v for k, v in federation.items() if k != "server_optimizer"}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def path_names(tree) -> list[str]:
    """Full path names of the leaves of ``tree`` (attributes included: an optax state's ``mu`` and
    ``nu`` hold the same parameter names), in ``jax.tree.leaves`` order."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _flatten(state: ServerState, with_frozen: bool) -> dict[str, np.ndarray]:
    arrays = {f"params/{n}": np.asarray(x) for n, x in zip(leaf_names(state.params), jax.tree.leaves(state.params))}
    if with_frozen:
        arrays.update({f"frozen/{n}": np.asarray(x)
                       for n, x in zip(leaf_names(state.frozen), jax.tree.leaves(state.frozen))})
    arrays.update({f"method/{n}": np.asarray(x)
                   for n, x in zip(leaf_names(state.method_state), jax.tree.leaves(state.method_state))})
    arrays.update({f"optimizer/{n}": np.asarray(x)
                   for n, x in zip(path_names(state.optimizer_state), jax.tree.leaves(state.optimizer_state))})
    arrays.update({f"residual/{n}": np.asarray(x)
                   for n, x in zip(leaf_names(state.residuals), jax.tree.leaves(state.residuals))})
    arrays["round"] = np.asarray(state.round)
    arrays["key"] = np.asarray(jax.random.key_data(state.key))
    return arrays


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint: the state, the ledger's position and where it came from."""

    round: int
    state: ServerState
    participations: np.ndarray
    rounds_spent: int
    path: Path


class Checkpointer:
    """Writes and finds the checkpoints of one run directory.

    Args:
      run_dir: the run directory.
      digest: :func:`config_digest` of the run's config.
      keep: how many of the newest checkpoints to keep.
      with_frozen: whether the base changes during the run (it is then saved too).
      info: what else a reader needs without the data (the task and its number of labels).
    """

    def __init__(self, run_dir: Path, digest: str, keep: int, with_frozen: bool, info: dict | None = None):
        self.dir = Path(run_dir) / "checkpoints"
        self.digest, self.keep, self.with_frozen, self.info = digest, keep, with_frozen, info or {}

    def save(self, state: ServerState, participations: np.ndarray, rounds_spent: int) -> Path:
        """Writes the checkpoint of ``state`` (after round ``state.round``) atomically, with the
        ledger's participations and rounds spent (a discarded diverged round counts); prunes
        older checkpoints."""
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"{_PREFIX}{int(state.round):06d}"
        tmp = self.dir / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        # the frozen base is read only when the run changes it (split over model devices of other
        # processes, it would not be readable here)
        kept = state if self.with_frozen else state._replace(frozen=())
        save_file(_flatten(jax.device_get(kept), self.with_frozen), str(tmp / "state.safetensors"))
        meta = {"format": FORMAT, "round": int(state.round), "config_digest": self.digest,
                "participations": np.asarray(participations).tolist(), "rounds_spent": rounds_spent, **self.info,
                "state_sha256": _sha256(tmp / "state.safetensors")}
        (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._prune()
        return final

    def _prune(self) -> None:
        for stale in self.dir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for old in self.checkpoints()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def newest_meta(self) -> dict | None:
        """meta.json of the newest checkpoint (unverified), or None."""
        for path in reversed(self.checkpoints()):
            try:
                return json.loads((path / "meta.json").read_text())
            except (OSError, json.JSONDecodeError):
                continue
        return None

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))

    def load(self, path: Path, template: ServerState) -> Checkpoint:
        """Reads one checkpoint into the shapes of ``template``; raises :class:`CheckpointError`."""
        try:
            meta = json.loads((path / "meta.json").read_text())
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}, expected {FORMAT}")
            if _sha256(path / "state.safetensors") != meta["state_sha256"]:
                raise CheckpointError(f"checkpoint {path} is corrupt (state.safetensors does not match its checksum)")
            arrays = load_file(str(path / "state.safetensors"))
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from None
        if meta["config_digest"] != self.digest:
            raise CheckpointMismatch(f"checkpoint {path} was written by a different config (config.yaml changed)")

        def restore(prefix, tree, names=leaf_names):
            leaves = []
            for name, leaf in zip(names(tree), jax.tree.leaves(tree)):
                value = arrays.get(f"{prefix}/{name}")
                if value is None or value.shape != leaf.shape or value.dtype != np.dtype(leaf.dtype):
                    raise CheckpointMismatch(f"checkpoint {path} does not match the model: leaf {prefix}/{name}")
                leaves.append(jnp.asarray(value))
            return jax.tree.unflatten(jax.tree.structure(tree), leaves)

        params = restore("params", template.params)
        frozen = restore("frozen", template.frozen) if self.with_frozen else template.frozen
        method_state = restore("method", template.method_state)
        optimizer_state = restore("optimizer", template.optimizer_state, path_names)
        residuals = restore("residual", template.residuals)
        key = jax.random.wrap_key_data(jnp.asarray(arrays["key"]))
        state = ServerState(params, frozen, jnp.asarray(arrays["round"]), key, method_state, optimizer_state,
                            residuals)
        return Checkpoint(int(meta["round"]), state, np.asarray(meta["participations"], np.int64),
                          int(meta["rounds_spent"]), path)

    def latest(self, template: ServerState, warn) -> Checkpoint | None:
        """The newest usable checkpoint, falling back past corrupt ones (each reported with
        ``warn``); None when there is none. A checkpoint of another config is an error."""
        for path in reversed(self.checkpoints()):
            try:
                return self.load(path, template)
            except CheckpointMismatch:
                raise
            except CheckpointError as e:
                warn(f"{e}; falling back to the previous checkpoint")
        return None
