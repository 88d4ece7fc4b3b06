"""The main job's workdir: one table of the models it trains, and what derives from it.

Each trained model owns the workdir directory of its name (checkpoints, metrics.jsonl,
spec.json, provenance.json). The table says which phase trains it, the config section
whose `steps` it trains for, and what it is built from: the models whose digests its
spec records, so that training one of those further leaves it unusable. Which models
a phase trains, what a phase may not extend (robust_gate.preflight), whose training
provenance a result carries (robust_gate.provenance) and which runs' λ evaluation
plots are all read from here.

The names are also the models' `phases.Game` names and the fields of their records
(robust_gate.records); tests check that they agree.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Model:
  name: str  # its directory in the workdir
  phase: str  # the phase that trains it (one of PHASES)
  section: str  # the config section whose `steps` it trains for
  built_from: tuple[str, ...] = ()  # the models whose digests its spec records


# The phases, in the order `pipeline.run` runs them; each is also a launcher.
PHASES = ("train_experts", "train_gate", "distill", "train_baselines", "evaluate")

MODELS = (
  Model("experts", "train_experts", "expert"),
  Model("robust_gate", "train_gate", "gate", ("experts",)),
  Model("erm_gate", "train_gate", "gate", ("experts",)),
  # The best response to the robust gate's λ̄, warm-started from it (docs/math.md §7.1).
  Model("best_response", "train_gate", "gate", ("experts", "robust_gate")),
  Model("student", "distill", "distill", ("experts", "robust_gate")),
  Model("monolithic", "train_baselines", "monolithic", ("experts",)),
  Model("monolithic_dro", "train_baselines", "monolithic", ("experts",)),
  Model("monolithic_large", "train_baselines", "monolithic_large", ("experts",)),
)

# The experts' scores of validation and test, which train_gate writes: a file
# `<stem>.npz` while it fits config.device_budget_bytes, else row shards in the
# directory `<stem>` (robust_gate.experts.stored_scores). Each records a fingerprint of
# the experts' parameters, so they are built from the experts too.
CACHE_STEMS = ("cache_validation", "cache_test")
CACHES = tuple(p for stem in CACHE_STEMS for p in (f"{stem}.npz", stem))
CACHES_BUILT_FROM = "experts"

# The workdir's model directories, in the table's order.
MODEL_DIRS = tuple(m.name for m in MODELS)
# The config sections of the models' training (steps, learning rates, batch sizes).
SECTIONS = tuple(dict.fromkeys(m.section for m in MODELS))

_BY_NAME = {m.name: m for m in MODELS}


def model(name: str) -> Model:
  """The table's row of model `name`."""
  return _BY_NAME[name]


def trained_by(phase: str) -> tuple[str, ...]:
  """The models `phase` trains (the directories it writes), in the table's order."""
  if phase not in PHASES:
    raise ValueError(f"unknown phase {phase!r}; the phases are {PHASES}.")
  return tuple(m.name for m in MODELS if m.phase == phase)


def built_from_it(name: str) -> tuple[str, ...]:
  """What the workdir builds from model `name`: the caches (for the experts) and the
  models whose specs record its digest, which training it further makes refuse to load."""
  caches = CACHES if name == CACHES_BUILT_FROM else ()
  return caches + tuple(m.name for m in MODELS if name in m.built_from)
