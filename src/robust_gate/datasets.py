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

Every example has `tokens` (int32, values ≥ 1; 0 is reserved for BOS/EOS) and
`domain` (a ClassLabel); wordfreq also has `text`. `build(name, data_dir, ...)`
prepares one and returns the builder; `robust_gate.data` loads them.
"""

import abc
import dataclasses
import hashlib
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

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


@dataclasses.dataclass
class DigitsConfig(tfds.core.BuilderConfig):
  groups: tuple = ((0, 6), (1, 7), (2, 3), (4, 9), (5, 8))  # domains = class groups
  split_fractions: tuple = (0.7, 0.15, 0.15)
  seed: int = 0


@dataclasses.dataclass
class MarkovConfig(tfds.core.BuilderConfig):
  num_domains: int = 4
  num_states: int = 8  # tokens 1..num_states
  seq_len: int = 16
  concentration: float = 0.3  # Dirichlet concentration of the transition rows
  similarity: float = 0.0  # rows pulled toward shared rows: 1 = identical domains
  examples_per_split: tuple = (2000, 500, 500)
  seed: int = 0


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
        raise ValueError(f"wordfreq language {lang!r} has no words in split {SPLITS[split_index]}.")
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


BUILDERS = {
  "wordfreq": (RobustGateWordfreq, WordfreqConfig),
  "digits": (RobustGateDigits, DigitsConfig),
  "markov": (RobustGateMarkov, MarkovConfig),
}


def make_config(name: str, **overrides) -> tfds.core.BuilderConfig:
  """The builder config of `name` with overrides; its TFDS name encodes them."""
  if name not in BUILDERS:
    raise InputError(f"unknown local dataset {name!r}; choose one of {sorted(BUILDERS)}.")
  _, config_cls = BUILDERS[name]
  fields = {f.name for f in dataclasses.fields(config_cls)} - {
    f.name for f in dataclasses.fields(tfds.core.BuilderConfig)
  }
  unknown = set(overrides) - fields
  if unknown:
    raise InputError(f"unknown {name} dataset options {sorted(unknown)}; known: {sorted(fields)}.")
  values: dict[str, Any] = {
    k: tuple(map(tuple, v)) if k == "groups" else (tuple(v) if isinstance(v, (list, tuple)) else v)
    for k, v in overrides.items()
  }
  _check_options(name, values)
  digest = hashlib.sha1(repr(sorted(values.items())).encode()).hexdigest()[:10]
  return config_cls(name=f"c{digest}", **values)


def _check_options(name: str, values: dict) -> None:
  """Sizes must be positive ints, rates positive finite floats, lists non-empty."""
  for key, value in values.items():
    items = value if isinstance(value, tuple) else (value,)
    if not items:
      raise InputError(f"{name} dataset option {key} is empty.")
    for v in items:
      if key in ("languages", "groups"):
        continue
      if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise InputError(f"{name} dataset option {key}={value!r} must be numeric.")
      if key == "similarity":
        if not 0 <= v <= 1:
          raise InputError(f"{name} dataset option similarity={v!r} must be in [0, 1].")
      elif key != "seed" and not (np.isfinite(v) and v > 0):
        raise InputError(f"{name} dataset option {key}={value!r} must be positive.")
  if name == "digits" and "groups" in values:
    classes = [c for g in values["groups"] for c in g]
    if (
      not all(g for g in values["groups"])
      or len(set(classes)) != len(classes)
      or not set(classes) <= set(range(10))
    ):
      raise InputError(
        f"digits groups {values['groups']} must be non-empty, disjoint sets of the classes 0..9."
      )


def build(name: str, data_dir: str, **overrides) -> tfds.core.DatasetBuilder:
  """Prepares local dataset `name` under `data_dir` (once) and returns its builder."""
  config = make_config(name, **overrides)
  builder_cls, _ = BUILDERS[name]
  builder = builder_cls(config=config, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return builder
