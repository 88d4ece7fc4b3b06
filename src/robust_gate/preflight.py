"""What a phase checks before any work: the config's values (`check_config`), and the
workdir's models against the steps the config asks for (`refuse_extensions`).

Both raise InputError with one line that says what to change. A value that reached
TFDS or wordfreq would end in their traceback, and an extension found after hours of
training would have cost them; so `pipeline` calls these first.
"""

import os

import numpy as np

from robust_gate import checkpoints, datasets, distill, layout, models, scoring
from robust_gate.checks import InputError

# Every field of the models' config sections (launch/configs/wordfreq.py sets each, and
# says what it means). A section holds these and no other: a misspelled field, which
# ml_collections would add silently from Python, is refused rather than ignored.
_ARCHITECTURE = ("d_model", "num_layers", "num_heads", "d_ff")
FIELDS = {
  "expert": (*_ARCHITECTURE, "steps", "lr", "per_domain"),
  "monolithic": ("steps", "lr", "per_domain", "dro_dual_lr"),
  "monolithic_large": (*_ARCHITECTURE, "steps", "lr", "per_domain"),
  "gate": (
    "hidden",
    "token_embed",
    "pos_embed",
    "steps",
    "lr",
    "dual_lr",
    "dual_timescale",
    "optimistic",
    "dual_holdout",
    "per_domain",
    "ema_decay",
  ),
  "distill": ("steps", "lr", "per_domain", "weights"),
}
# The fields that name one of a few choices; every other is a number.
_CHOICES = {"distill.weights": distill.DISTILL_WEIGHTS}
# The numeric fields that may be floats; every other is an int.
_FLOAT_KEYS = ("lr", "dual_lr", "dro_dual_lr", "ema_decay", "dual_holdout", "dual_timescale")


def check_config(config) -> None:
  """Positive sizes and step counts, finite positive learning rates, η ≥ 0, an EMA
  decay and a dual holdout in [0, 1), a dual timescale ≥ 0, optimism 0 or 1, a
  baseline the data has; data options in their domains, sequences that fit the
  context, a data_dir that can be a directory."""
  data = config.data
  dataset = datasets.make_config(data.name, **dict(data.options))
  if isinstance(data.max_len, bool) or not isinstance(data.max_len, int) or data.max_len < 2:
    raise InputError(f"config.data.max_len={data.max_len!r} must be an int ≥ 2.")
  if dataset.max_tokens() > data.max_len - 1:
    raise InputError(
      f"config.data.max_len={data.max_len} holds {data.max_len - 1} tokens besides BOS/EOS "
      f"but {data.name} examples have up to {dataset.max_tokens()}; set it to "
      f"{dataset.max_tokens() + 1} or more."
    )
  if not isinstance(config.data_dir, str):
    raise InputError(f"config.data_dir={config.data_dir!r} must be a path (or '').")
  existing = config.data_dir  # the path, or the nearest of its parents that exists
  while existing and not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if existing and not os.path.isdir(existing):
    raise InputError(
      f"config.data_dir={config.data_dir!r} cannot be a directory: {existing!r} is a file; "
      f"give a directory (or '' for <workdir>/tfds)."
    )
  scoring.check_baseline(config)
  if config.dtype not in models.DTYPES:
    raise InputError(f"config.dtype={config.dtype!r} must be one of {models.DTYPES}.")
  every = config.checkpoint_every
  if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
    raise InputError(f"config.checkpoint_every={every!r} must be a positive int.")
  budget = config.get("device_budget_bytes")
  if budget is not None and (
    isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0
  ):
    raise InputError(f"config.device_budget_bytes={budget!r} must be a positive int or None.")
  check_sections(config, layout.SECTIONS)


def check_sections(config, sections, example: str = "launch/configs/wordfreq.py") -> None:
  """The models' config `sections`: each has exactly its FIELDS, each field a value of
  its kind (a number in its range, or one of its choices). `example`: the config file a
  missing field's message points to, which sets every field."""
  for section in sections:
    if section not in config:
      raise InputError(f"config has no section {section!r}; it needs {FIELDS[section]}.")
    have, want = set(config[section].keys()), FIELDS[section]
    unknown = sorted(have - set(want))
    if unknown:
      raise InputError(
        f"config.{section}.{unknown[0]} is not a field of config.{section}; its fields "
        f"are {', '.join(want)}."
      )
    missing = [k for k in want if k not in have]
    if missing:
      raise InputError(
        f"config.{section} lacks the field {missing[0]!r}; {example} sets every field "
        f"of config.{section}."
      )
    for key, value in config[section].items():
      name = f"{section}.{key}"
      if value is None and name in _DEFAULTED:
        continue
      if name in _CHOICES:
        if value not in _CHOICES[name]:
          raise InputError(f"config.{name}={value!r} must be one of {_CHOICES[name]}.")
        continue
      _check_field(f"config.{name}", key, value)


# Fields that may be None, meaning another field's value.
_DEFAULTED = ("monolithic_large.per_domain",)  # None: monolithic.per_domain


def _check_field(name: str, key: str, value) -> None:
  """One field of a model's config section, by what its key says it is."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise InputError(f"{name}={value!r} must be a number.")
  if key in ("ema_decay", "dual_holdout"):
    ok, want = 0 <= value < 1, "in [0, 1)"
  elif key == "optimistic":
    ok, want = value in (0, 1), "0 or 1"
  elif key.endswith("dual_lr") or key in ("token_embed", "dual_timescale"):
    ok, want = value >= 0, "finite and ≥ 0"
  else:
    ok, want = value > 0, "finite and > 0"
  if not (np.isfinite(value) and ok):
    raise InputError(f"{name}={value!r} must be {want}.")
  if key not in _FLOAT_KEYS and not isinstance(value, int):
    raise InputError(f"{name}={value!r} must be an int.")


def refuse_extensions(config, workdir: str, names) -> None:
  """InputError, before any training, if one of the models `names` would train past
  its checkpoints while something built from its finished run is in the workdir.

  Extending it there would leave those unusable, and the run that built them could
  not be repeated; elsewhere (a new workdir with a copy of its directory) it resumes.
  """
  for name in names:
    section = layout.model(name).section
    steps = config[section].steps
    saved = checkpoints.saved_steps(os.path.join(workdir, name))
    below = [s for s in saved if s < steps]
    if steps in saved or not below:  # restored as it is, or trained from scratch
      continue
    built = [b for b in layout.built_from_it(name) if os.path.exists(os.path.join(workdir, b))]
    if built:
      raise InputError(
        f"config.{section}.steps={steps} would train {name} on from its checkpoint "
        f"at step {below[-1]}, but {', '.join(built)} in {workdir} were built from it and "
        f"would no longer load; nothing was changed. To continue {name}, copy "
        f"{os.path.join(workdir, name)} into a new --workdir and run there."
      )
