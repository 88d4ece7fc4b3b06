"""Offline real and synthetic domains as TFDS datasets (array_record, no TensorFlow).

Three builders, prepared locally from data that ships inside PyPI packages:

* `RobustGateWordfreq`: words of several languages (domain = language) from the
  `wordfreq` package, sampled ∝ frequency^power (default power 0.5). Word types
  are split by a hash into train/validation/test (80/10/10), so held-out splits
  contain no training word. (With power 1 a handful of very frequent types
  carry much of a language's mass and land in one split only, which makes the
  splits' distributions differ; see BUILD_NOTES.md.)
* `RobustGateDigits`: scikit-learn's 8×8 digits as 64-token sequences of pixel
  intensities (domain = a group of digit classes).
* `RobustGateMarkov`: synthetic first-order Markov chains (domain = chain), whose
  exact per-token entropy `markov_entropy` makes KL exact.

A fourth, `RobustGateSource` (`robust_gate.datasets_source`), cuts byte windows
from the installed Python environment's source and documentation files (domain =
kind of file), and records which files in its manifest.

Every example of the first three has `tokens` (int32, values ≥ 1; 0 is reserved
for BOS/EOS) and `domain` (a ClassLabel); wordfreq also has `text`.
`build(name, data_dir, ...)` prepares one and returns the builder;
`robust_gate.data` loads them.
"""

import abc
import dataclasses
import glob
import hashlib
import os
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from robust_gate import checks, datasets_source
from robust_gate.checks import InputError

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class WordfreqConfig(tfds.core.BuilderConfig):
  languages: tuple = ("en", "de", "fr", "es", "fi", "pl")
  examples_per_split: tuple = (4000, 1000, 1000)  # per language: train, val, test
  max_bytes: int = 15  # longer words are left out
  frequency_power: float = 0.5  # words are sampled ∝ frequency ** power
  wordlist_size: int = 20000  # most frequent word types per language
  seed: int = 0

  def max_tokens(self) -> int:
    """The most tokens (UTF-8 bytes) of an example."""
    return self.max_bytes


@dataclasses.dataclass
class DigitsConfig(tfds.core.BuilderConfig):
  groups: tuple = ((0, 6), (1, 7), (2, 3), (4, 9), (5, 8))  # domains = class groups
  split_fractions: tuple = (0.7, 0.15, 0.15)
  seed: int = 0

  def max_tokens(self) -> int:
    """The most tokens of an example: 8×8 pixels."""
    return 64


@dataclasses.dataclass
class MarkovConfig(tfds.core.BuilderConfig):
  num_domains: int = 4
  num_states: int = 8  # tokens 1..num_states
  seq_len: int = 16
  concentration: float = 0.3  # Dirichlet concentration of the transition rows
  similarity: float = 0.0  # rows pulled toward shared rows: 1 = identical domains
  examples_per_split: tuple = (2000, 500, 500)
  seed: int = 0

  def max_tokens(self) -> int:
    """The most tokens of an example: every chain runs seq_len steps."""
    return self.seq_len


def _features(domains, with_text=False):
  feats = {
    "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
    "domain": tfds.features.ClassLabel(names=list(domains)),
  }
  if with_text:
    feats["text"] = tfds.features.Text()
  return tfds.features.FeaturesDict(feats)


def _word_split(word: str) -> int:
  """0/1/2 = train/validation/test, 80/10/10 by a stable hash of the word."""
  h = int(hashlib.md5(word.encode("utf-8")).hexdigest()[:8], 16) % 10
  return 0 if h < 8 else (1 if h == 8 else 2)


class _DomainBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared by the builders: a `domain` ClassLabel, the three SPLITS."""

  VERSION = tfds.core.Version("1.0.0")
  WITH_TEXT = False

  @abc.abstractmethod
  def _domain_names(self) -> list:
    """The ClassLabel names, one per domain."""

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self, features=_features(self._domain_names(), self.WITH_TEXT), description=__doc__
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {s: self._generate_examples(i) for i, s in enumerate(SPLITS)}


class RobustGateWordfreq(_DomainBuilder):
  """Words of several languages sampled by frequency; domain = language."""

  BUILDER_CONFIGS = [WordfreqConfig(name="default")]  # noqa: RUF012 (the tfds API)
  WITH_TEXT = True

  def _domain_names(self):
    return list(self.builder_config.languages)

  def _generate_examples(self, split_index):
    import wordfreq

    c = self.builder_config
    rng = np.random.default_rng([c.seed, split_index])
    for lang_index, lang in enumerate(c.languages):
      words = [
        w
        for w in wordfreq.top_n_list(lang, c.wordlist_size)
        if len(w.encode("utf-8")) <= c.max_bytes and _word_split(w) == split_index
      ]
      if not words:
        raise InputError(
          f"wordfreq language {lang!r} has no word of at most max_bytes={c.max_bytes} bytes "
          f"in split {SPLITS[split_index]} among its wordlist_size={c.wordlist_size} most "
          f"frequent; raise wordlist_size or max_bytes."
        )
      freq = np.array([wordfreq.word_frequency(w, lang) for w in words])
      weight = freq**c.frequency_power
      picks = rng.choice(
        len(words), size=c.examples_per_split[split_index], p=weight / weight.sum()
      )
      for i, w in enumerate(picks):
        text = words[w]
        yield (
          f"{lang}_{i}",
          {
            "text": text,
            "domain": lang_index,
            "tokens": np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32),
          },
        )


class RobustGateDigits(_DomainBuilder):
  """scikit-learn digits, 64 pixel intensities (tokens 1..17) per example."""

  BUILDER_CONFIGS = [DigitsConfig(name="default")]  # noqa: RUF012 (the tfds API)

  def _domain_names(self):
    return ["digits_" + "".join(map(str, g)) for g in self.builder_config.groups]

  def _generate_examples(self, split_index):
    from sklearn.datasets import load_digits

    c = self.builder_config
    digits = load_digits()
    rng = np.random.default_rng(c.seed)
    bounds = np.cumsum((0, *tuple(c.split_fractions)))
    for g, classes in enumerate(c.groups):
      idx = rng.permutation(np.flatnonzero(np.isin(digits.target, classes)))
      lo, hi = (np.round(bounds[split_index : split_index + 2] * len(idx))).astype(int)
      for i in idx[lo:hi]:
        yield int(i), {"domain": g, "tokens": digits.data[i].astype(np.int32) + 1}


def markov_chains(config: MarkovConfig):
  """(initial_KxS, transition_KxSxS): the chains, regenerated from the config."""
  rng = np.random.default_rng(config.seed)
  S = config.num_states
  trans = rng.dirichlet(np.full(S, config.concentration), size=(config.num_domains, S))
  if config.similarity:  # drawn after `trans`, so similarity 0 leaves the chains as they were
    shared = rng.dirichlet(np.full(S, config.concentration), size=S)
    trans = (1 - config.similarity) * trans + config.similarity * shared
  trans = 0.98 * trans + 0.02 / S  # every transition possible: finite KL everywhere
  initial = np.stack([_stationary(t) for t in trans])
  return initial, trans


def _stationary(trans_SxS):
  w, v = np.linalg.eig(trans_SxS.T)
  pi = np.real(v[:, np.argmin(np.abs(w - 1))])
  return pi / pi.sum()


def markov_entropy(config: MarkovConfig) -> np.ndarray:
  """Exact entropy per target token of each domain's sequences, nats, [K].

  A sequence is x_1 ~ π, x_t ~ P(x_{t-1}, ·) for t ≤ T, then EOS (deterministic
  given the length), so H = (H(π) + (T−1)·Σ_s π_s H(P_s)) / (T + 1) per token.
  """
  initial, trans = markov_chains(config)
  h_init = -np.sum(initial * np.log(initial), axis=1)
  h_rows = -np.sum(trans * np.log(trans), axis=2)
  h_rate = np.sum(initial * h_rows, axis=1)
  T = config.seq_len
  return (h_init + (T - 1) * h_rate) / (T + 1)


class RobustGateMarkov(_DomainBuilder):
  """Synthetic Markov-chain domains with known entropy."""

  BUILDER_CONFIGS = [MarkovConfig(name="default")]  # noqa: RUF012 (the tfds API)

  def _domain_names(self):
    return [f"chain_{k}" for k in range(self.builder_config.num_domains)]

  def _generate_examples(self, split_index):
    c = self.builder_config
    initial, trans = markov_chains(c)
    rng = np.random.default_rng([c.seed, 1 + split_index])
    S = c.num_states
    for k in range(c.num_domains):
      for i in range(c.examples_per_split[split_index]):
        x = np.empty(c.seq_len, np.int32)
        x[0] = rng.choice(S, p=initial[k])
        for t in range(1, c.seq_len):
          x[t] = rng.choice(S, p=trans[k, x[t - 1]])
        yield f"{k}_{i}", {"domain": k, "tokens": x + 1}


# (builder, its config class); annotated: the builders share no base class here.
BUILDERS: dict[str, tuple[type[tfds.core.GeneratorBasedBuilder], type[tfds.core.BuilderConfig]]] = {
  "wordfreq": (RobustGateWordfreq, WordfreqConfig),
  "digits": (RobustGateDigits, DigitsConfig),
  "markov": (RobustGateMarkov, MarkovConfig),
  "source": (datasets_source.RobustGateSource, datasets_source.SourceConfig),
}


def make_config(name: str, **overrides) -> tfds.core.BuilderConfig:
  """The builder config of `name` with overrides; its TFDS name encodes them.

  Raises InputError for an unknown dataset, an unknown option, or a value outside
  its option's domain (checked here, before any third-party code sees it).
  """
  if name not in BUILDERS:
    raise InputError(f"unknown local dataset {name!r}; choose one of {sorted(BUILDERS)}.")
  _, config_cls = BUILDERS[name]
  fields = {f.name for f in dataclasses.fields(config_cls)} - {
    f.name for f in dataclasses.fields(tfds.core.BuilderConfig)
  }
  unknown = set(overrides) - fields
  if unknown:
    raise InputError(f"unknown {name} dataset options {sorted(unknown)}; known: {sorted(fields)}.")
  values: dict[str, Any] = {k: _freeze(v) for k, v in overrides.items()}
  _check_options(name, values)
  digest = hashlib.sha1(repr(sorted(values.items())).encode()).hexdigest()[:10]
  return config_cls(name=f"c{digest}", **values)


def _freeze(value):
  """Lists (and lists of lists) as tuples: hashable, and one spelling per config."""
  return tuple(map(_freeze, value)) if isinstance(value, (list, tuple)) else value


# Scalar options: each checked by its own rule, with the option's name in the message.
_SCALAR_OPTIONS: dict[str, Callable[[Any, str], Any]] = {
  "max_bytes": checks.check_int,
  "wordlist_size": checks.check_int,
  "num_domains": checks.check_int,
  "num_states": checks.check_int,
  "seq_len": checks.check_int,
  "max_bytes_per_domain": checks.check_int,
  "max_bytes_per_file": checks.check_int,
  "seed": lambda v, name: checks.check_int(v, name, 0),
  "frequency_power": lambda v, name: checks.check_real(v, name, low_open=True),
  "concentration": lambda v, name: checks.check_real(v, name, low_open=True),
  "similarity": lambda v, name: checks.check_real(v, name, 0.0, 1.0, high_open=False),
}
# One value per split (train, validation, test).
_SPLIT_OPTIONS: dict[str, Callable[[Any, str], Any]] = {
  "examples_per_split": checks.check_int,
  "split_fractions": lambda v, name: checks.check_real(v, name, low_open=True),
}


def _check_options(name: str, values: dict) -> None:
  """Every option in its domain: sizes positive ints, rates finite and positive,
  one value per split, languages wordfreq has, digit groups disjoint."""
  for key, value in values.items():
    option = f"{name} dataset option {key}"
    if key in _SCALAR_OPTIONS:
      _SCALAR_OPTIONS[key](value, option)
    elif key in _SPLIT_OPTIONS:
      if not isinstance(value, tuple) or len(value) != len(SPLITS):
        raise InputError(f"{option}={value!r} must list 3 values: train, validation, test.")
      for split, v in zip(SPLITS, value):
        _SPLIT_OPTIONS[key](v, f"{option} ({split})")
    elif key == "languages":
      _check_languages(value, option)
    elif key == "groups":
      _check_groups(value, option)
  fractions = values.get("split_fractions", (0,))
  if sum(fractions) > 1 + 1e-9:
    raise InputError(f"{name} dataset option split_fractions={fractions} sums to more than 1.")
  if name == "source":  # its kinds, roots, and what its options imply together
    datasets_source.check_options(values)


def _check_languages(value, option: str) -> None:
  import wordfreq

  if not isinstance(value, tuple) or not value:
    raise InputError(f"{option}={value!r} must be a non-empty list of language codes.")
  available = sorted(wordfreq.available_languages())
  for lang in value:
    if lang not in available:
      raise InputError(f"{option}: unknown wordfreq language {lang!r}; available: {available}.")
  repeated = sorted({lang for lang in value if value.count(lang) > 1})
  if repeated:
    raise InputError(f"{option}={value!r} repeats {repeated}: each language is one domain.")


def _check_groups(value, option: str) -> None:
  groups = value if isinstance(value, tuple) else ()
  classes = [c for g in groups if isinstance(g, tuple) for c in g]
  if (
    not groups
    or not all(isinstance(g, tuple) and g for g in groups)
    or not all(isinstance(c, int) and not isinstance(c, bool) for c in classes)
    or len(set(classes)) != len(classes)
    or not set(classes) <= set(range(10))
  ):
    raise InputError(
      f"{option}={value!r} must be non-empty, disjoint groups of the digit classes 0..9, "
      f"e.g. ((0, 6), (1, 7))."
    )


def prepared_dir(name: str, data_dir: str, **overrides) -> str:
  """The directory TFDS prepares dataset `name` (with these options) into."""
  config = make_config(name, **overrides)
  builder_cls, _ = BUILDERS[name]
  return os.path.join(data_dir, builder_cls.name, config.name, str(builder_cls.VERSION))


def build(
  name: str, data_dir: str, log: Callable[[str], None] = print, **overrides
) -> tfds.core.DatasetBuilder:
  """Prepares local dataset `name` under `data_dir` (once) and returns its builder.

  What a killed preparation left behind (TFDS's `incomplete.*` directories) is
  removed first, with a line in `log`: TFDS itself leaves it there for good.
  """
  config_dir = os.path.dirname(prepared_dir(name, data_dir, **overrides))
  for leftover in sorted(glob.glob(os.path.join(config_dir, "incomplete.*"))):
    log(f"removing {leftover}, left by a {name} dataset preparation that did not finish.")
    shutil.rmtree(leftover)
  builder_cls, _ = BUILDERS[name]
  builder = builder_cls(
    config=make_config(name, **overrides), data_dir=data_dir, file_format="array_record"
  )
  builder.download_and_prepare()
  return builder
