"""Adding an expert to, or removing one from, a fitted checkpoint job
(`launch/checkpoints.py --add_expert=NAME=DIR --remove_expert=NAME`).

An edit changes the experts, so the caches, every gate and the student change with
it: the edited job runs in its own workdir, `<workdir>/edits/<edit>/`, beside the
job it edits, which stays as it was. Its robust gate starts from the one fitted in
`<workdir>` (`remap_gate`): every kept expert's weights copied to its new position,
a removed expert's dropped, an added expert's set to 0. The gate's logits are
`temperature · (relative prefix log-likelihood) + correction`, so a zero correction
still weighs an added expert by how well it has predicted the prefix: it is used
from the first step. The best response starts from that robust gate, as in every
job; the ERM gate is a baseline and starts fresh.
"""

import dataclasses
import os

import flax.serialization
import jax
import ml_collections
import numpy as np

from robust_gate import checkpoint_job, experts, files, parallel, phases
from robust_gate.checks import InputError
from robust_gate.gate_edits import remap_gate

GATE_FILE = "robust_gate_params.msgpack"  # the fitted robust gate (EMA) and its experts


@dataclasses.dataclass(frozen=True)
class Edit:
  add: dict  # name: checkpoint directory
  data: dict  # name: glob patterns of an added domain's text
  remove: tuple  # names

  @classmethod
  def parse(cls, add: list[str], data: list[str], remove: list[str]) -> "Edit":
    """From the launcher's NAME=DIR, NAME=GLOB[,GLOB] and NAME flags."""

    def pairs(values, flag):
      out = {}
      for v in values:
        name, sep, rest = v.partition("=")
        if not sep or not name or not rest:
          raise InputError(f"--{flag}={v!r}: expected NAME=VALUE.")
        out[name] = rest
      return out

    globs = {k: v.split(",") for k, v in pairs(data, "add_data").items()}
    return cls(pairs(add, "add_expert"), globs, tuple(remove))

  def __bool__(self) -> bool:
    return bool(self.add or self.remove)

  def name(self) -> str:
    return "+".join([*(f"add_{n}" for n in self.add), *(f"remove_{n}" for n in self.remove)])


def edited_config(config, edit: Edit) -> ml_collections.ConfigDict:
  """`config` with the experts (and their domains' files) of `edit` added and removed."""
  named, texts = dict(config.experts), dict(config.data.files)
  for name in edit.remove:
    if name not in named:
      raise InputError(f"--remove_expert={name}: config.experts has {sorted(named)}.")
    del named[name]
    texts.pop(name, None)
  for name, path in edit.add.items():
    if name in named:
      raise InputError(f"--add_expert={name}=...: config.experts already has {name!r}.")
    if name not in edit.data and name not in texts:
      raise InputError(f"--add_expert={name}: give its text with --add_data={name}=GLOB.")
    named[name] = path
    texts[name] = edit.data.get(name, texts.get(name))
  if not named:
    raise InputError("the edit removes every expert.")
  out = config.copy_and_resolve_references()
  with out.unlocked():
    out.experts = ml_collections.ConfigDict(named)
    out.data.files = ml_collections.ConfigDict({k: list(v) for k, v in texts.items()})
  return out


def save_gate(workdir: str, names, params) -> None:
  params = jax.tree.map(np.asarray, flax.serialization.to_state_dict(params))
  state = {"names": list(names), "params": params}
  files.atomic_write(os.path.join(workdir, GATE_FILE), flax.serialization.msgpack_serialize(state))


def load_gate(workdir: str):
  """(names, params) of the robust gate `run` saved in `workdir`, or None."""
  path = os.path.join(workdir, GATE_FILE)
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    state = flax.serialization.msgpack_restore(f.read())
  return list(state["names"]), state["params"]


def warm_start(base, new_names):
  """Game → Game: the robust gate's initial parameters remapped from `base` (names,
  params), the base's digest in its spec (a resumed run checks it)."""
  old_names, old_params = base

  def apply(game: phases.Game) -> phases.Game:
    params = remap_gate(old_params, old_names, new_names, game.state.params)
    state = parallel.replicate(dataclasses.replace(game.state, params=params, ema_params=params))
    spec = {**game.spec, "warm_start": experts.params_fingerprint(old_params)}
    return dataclasses.replace(game, state=state, spec=spec)

  return apply


def run(config, workdir: str, edit: Edit, log=print):
  """The job of `config` in `workdir`, or, with an edit, the edited job in
  `<workdir>/edits/<edit>/` warm-started from `workdir`'s robust gate."""
  if not edit:
    out = checkpoint_job.run(config, workdir, log)
    save_gate(workdir, out.results["domains"], out.gates.robust_gate.params)
    return out
  base = load_gate(workdir)
  if base is None:
    raise InputError(f"{workdir} holds no fitted robust gate ({GATE_FILE}): run the job first.")
  edited = edited_config(config, edit)
  where = os.path.join(workdir, "edits", edit.name())
  log(f"edited job ({edit.name()}) in {where}, its robust gate warm-started from {workdir}")
  start = warm_start(base, list(checkpoint_job.expert_paths(edited)))
  out = checkpoint_job.run(edited, where, log, warm_start=start)
  save_gate(where, out.results["domains"], out.gates.robust_gate.params)
  return out
