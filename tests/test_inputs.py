"""Hostile inputs to the library's entry points: one InputError line naming the argument,
never a silent cast, a NaN result or a third-party traceback."""

import os

import numpy as np
import pytest
import wordfreq

from robust_gate import config_files, data, finite, pipeline, uncertainty
from robust_gate.checks import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# data.encode


@pytest.mark.parametrize(
  "seqs, labels, domains, message",
  [
    ([[1, np.nan]], [0], ["a"], "example 0 holds float64 values such as nan: each token must be"),
    ([[1.7]], [0], ["a"], "example 0 holds float64 values such as 1.7: each token must be an"),
    ([[1], [2]], [0, 0.7], ["a"], "domain_N holds float64 values such as 0.7: each domain label"),
    ([[1]], [True], ["a"], "domain_N holds bool values such as True: each domain label must"),
    ([[1]], [0], ["a", "a"], "domain names ['a', 'a'] repeat ['a']: each domain needs its own."),
    ([[1]], [0], "ab", "domains='ab' must be a list of names, not one string."),
    ([[1]], [0], ["a", ""], "domain name '' in ['a', ''] must be a non-empty string."),
    ([[1]], [[0]], ["a"], "domain_N has shape (1, 1): one label per sequence."),
    ([[[1, 2], [3]]], [0], ["a"], "example 0 is not an array of tokens:"),
    ([[1, 2**40]], [0], ["a"], f"example 0 has token {2**40} outside the vocabulary 1..7"),
  ],
)
def test_encode_refuses_what_a_cast_would_change(seqs, labels, domains, message):
  with pytest.raises(InputError) as info:
    data.encode(seqs, labels, domains, vocab_size=8, max_len=6)
  assert str(info.value).startswith(message)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"vocab_size": 8.0}, "vocab_size=8.0 must be an int."),
    ({"vocab_size": 1}, "vocab_size=1 must be in [2, 2147483648)."),
    ({"max_len": True}, "max_len=True must be an int."),
  ],
)
def test_encode_refuses_bad_sizes(kwargs, message):
  with pytest.raises(InputError) as info:
    data.encode([[1]], [0], ["a"], **{"vocab_size": 8, "max_len": 6, **kwargs})
  assert str(info.value) == message


def test_from_data_source_passes_labels_and_tokens_uncast():
  with pytest.raises(InputError, match=r"^domain_N holds float64 values such as 0.7"):
    data.from_data_source(
      [{"tokens": [1], "domain": 0}, {"tokens": [2], "domain": 0.7}],
      domains=["a", "b"],
      vocab_size=4,
      max_len=4,
    )
  with pytest.raises(InputError, match=r"^example 0 holds float64 values such as 2.5"):
    data.from_data_source([{"tokens": [2.5], "domain": 0}], domains=["a"], vocab_size=4, max_len=4)
  with pytest.raises(InputError, match=r"^example 0 has no key 'tokens'; keys: \['domain'\]"):
    data.from_data_source([{"domain": 0}], domains=["a"], vocab_size=4, max_len=4)


# finite.solve and finite.random_instance

D = np.array([[0.5, 0.5, 0.0], [0.1, 0.1, 0.8]])
LOG_E = np.log(np.array([[0.5, 0.4, 0.1], [0.1, 0.1, 0.8]]))


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"dual_smoothing": 5}, "dual_smoothing=5 must be in [0, 1)."),
    ({"dual_smoothing": -0.1}, "dual_smoothing=-0.1 must be in [0, 1)."),
    ({"ema_decay": 1.0}, "ema_decay=1.0 must be in [0, 1)."),
    ({"ema_decay": "0.9"}, "ema_decay='0.9' must be a number."),
    (
      {"baseline": "bogus"},
      "unknown baseline 'bogus'; choose one of ('entropy', 'expert', 'none').",
    ),
    ({"steps": True}, "steps=True must be an int."),
    ({"steps": 100.0}, "steps=100.0 must be an int."),
    ({"steps": -5}, "steps=-5 must be positive."),
    ({"seed": -1}, "seed=-1 must be in [0, 4294967296)."),
    ({"seed": 2**40}, "seed=1099511627776 must be in [0, 4294967296)."),
    ({"seed": 1.5}, "seed=1.5 must be an int."),
    ({"hidden": 0}, "hidden=0 must be positive."),
    ({"batch_size": True}, "batch_size=True must be an int."),
    ({"batch_size": 4}, "batch_size=4 draws more points per step than the N=3 there are"),
    ({"primal_lr": 0.0}, "primal_lr=0.0 must be finite and > 0."),
    ({"primal_lr": float("inf")}, "primal_lr=inf must be finite and > 0."),
    ({"dual_lr": float("nan")}, "dual_lr=nan must be finite and ≥ 0."),
    ({"dual_lr": False}, "dual_lr=False must be a number."),
    ({"gate": ["tabular"]}, "unknown gate ['tabular']; choose one of ('tabular', 'mlp')."),
    ({"uncertainty": "simplex"}, "uncertainty='simplex' must be an UncertaintySet"),
    ({"uncertainty": uncertainty.simplex(3)}, "uncertainty set is over 3 domains but"),
  ],
)
def test_solve_refuses_every_argument_outside_its_domain(kwargs, message):
  with pytest.raises(InputError) as info:
    finite.solve(D, LOG_E, **kwargs)
  assert str(info.value).startswith(message)


def test_solve_refuses_the_expert_baseline_without_an_expert_per_domain():
  with pytest.raises(InputError, match=r"^baseline='expert' pairs domain k with expert k, but"):
    finite.solve(D, LOG_E[:1] * 0 + np.log([[0.4, 0.4, 0.2]]), baseline="expert")


def test_a_diverging_game_is_an_error_not_a_nan_solution():
  # Adam moves each score by ~primal_lr per step: float32 overflows within 5 steps.
  with pytest.raises(InputError, match=r"^the game diverged: after 10 steps the gate or λ holds"):
    finite.solve(D, LOG_E, steps=10, primal_lr=1e38)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"num_points": 0}, "num_points=0 must be positive."),
    ({"num_domains": 2.0}, "num_domains=2.0 must be an int."),
    ({"num_experts": 0}, "num_experts=0 must be positive."),
    ({"expert_noise": 1.5}, "expert_noise=1.5 must be in [0, 1]."),
    ({"seed": -3}, "seed=-3 must be ≥ 0."),
  ],
)
def test_random_instance_refuses_bad_arguments(kwargs, message):
  with pytest.raises(InputError) as info:
    finite.random_instance(**{"seed": 0, "num_domains": 2, "num_points": 8, **kwargs})
  assert str(info.value) == message


def test_a_large_random_instance_is_a_valid_game_and_solves():
  """At N = 10^5 every Dirichlet(0.3) mass is below 1e-3: a fixed threshold zeroed
  every domain, and normalizing 0/0 gave NaN."""
  probs, logp = finite.random_instance(0, 3, 100_000, perturbed=True)
  assert np.all(np.isfinite(probs)) and not np.any(np.isnan(logp))
  np.testing.assert_allclose(probs.sum(axis=1), 1.0)
  assert np.all((probs > 0).sum(axis=1) > 1000)  # sparse, but most of the mass kept
  sol = finite.solve(probs, logp, steps=5, batch_size=64)
  assert np.all(np.isfinite(sol.model_probs)) and abs(sol.model_probs.sum() - 1.0) < 1e-6
  assert np.isfinite(sol.worst_case)


def test_minibatch_points_are_drawn_from_each_domain():
  """sample_points draws point n of domain k with probability D_k(n), down to tiny masses."""
  import jax

  probs = np.array([[0.5, 0.3, 0.2 - 1e-5, 1e-5, 0.0], [0.0, 0.0, 0.0, 0.25, 0.75]])
  draws = 2_000_000
  idx = np.asarray(
    jax.jit(finite.sample_points, static_argnums=2)(
      jax.random.PRNGKey(0), finite.integer_cdf(probs), draws
    )
  )
  assert idx.shape == (2, draws)
  for k in range(2):
    counts = np.bincount(idx[k], minlength=5)
    expected = probs[k] * draws
    assert np.all(counts[probs[k] == 0] == 0)  # never a point outside the domain
    np.testing.assert_array_less(np.abs(counts - expected), 5 * np.sqrt(expected) + 1)
  assert np.bincount(idx[0], minlength=5)[3] > 0  # the 1e-5 point is drawn (20 expected)


# pipeline.check_config: data options reach TFDS and wordfreq only after these checks


def _wordfreq_config(**data_fields):
  config = config_files.load(os.path.join(ROOT, "launch", "configs", "wordfreq.py"))
  for key, value in data_fields.items():
    if key == "data_dir":
      config.data_dir = value
    elif key == "max_len":
      config.data.max_len = value
    else:
      config.data.options[key] = value
  return config


def _check_config_message(config) -> str:
  with pytest.raises(InputError) as info:
    pipeline.check_config(config)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_an_unknown_language_is_named_with_the_available_ones():
  message = _check_config_message(_wordfreq_config(languages=("en", "xx")))
  available = sorted(wordfreq.available_languages())
  assert message == (
    f"wordfreq dataset option languages: unknown wordfreq language 'xx'; available: {available}."
  )


@pytest.mark.parametrize(
  "fields, message",
  [
    ({"languages": ("en", "fr", "en")}, "languages=('en', 'fr', 'en') repeats ['en']"),
    ({"examples_per_split": (100, 10)}, "examples_per_split=(100, 10) must list 3 values"),
    ({"examples_per_split": (100, 0, 10)}, "examples_per_split (validation)=0 must be positive."),
    ({"examples_per_split": (1.5, 1, 1)}, "examples_per_split (train)=1.5 must be an int."),
    ({"wordlist_size": 2.5}, "wordfreq dataset option wordlist_size=2.5 must be an int."),
    ({"frequency_power": -1.0}, "frequency_power=-1.0 must be finite and > 0."),
    ({"seed": -1}, "wordfreq dataset option seed=-1 must be ≥ 0."),
    ({"max_len": 8}, "config.data.max_len=8 holds 7 tokens besides BOS/EOS but wordfreq"),
    ({"max_len": 1}, "config.data.max_len=1 must be an int ≥ 2."),
  ],
)
def test_bad_data_options_are_one_line_naming_the_option(fields, message):
  assert message in _check_config_message(_wordfreq_config(**fields))


@pytest.mark.parametrize("below", ["", "tfds"])
def test_a_data_dir_that_is_or_is_under_a_file_is_refused(tmp_path, below):
  path = tmp_path / "a_file"
  path.write_text("")
  data_dir = os.path.join(path, below) if below else str(path)
  message = _check_config_message(_wordfreq_config(data_dir=data_dir))
  assert message.startswith(
    f"config.data_dir={data_dir!r} cannot be a directory: '{path}' is a file; give a directory"
  )


@pytest.mark.parametrize(
  "options, message",
  [
    ({"groups": (0, 1)}, "digits dataset option groups=(0, 1) must be non-empty, disjoint"),
    ({"groups": 5}, "digits dataset option groups=5 must be non-empty, disjoint"),
    ({"groups": ((0, 1.0),)}, "groups=((0, 1.0),) must be non-empty, disjoint groups"),
    ({"split_fractions": (0.7, 0.3, 0.3)}, "split_fractions=(0.7, 0.3, 0.3) sums to more than 1"),
  ],
)
def test_bad_digits_options_are_one_line(options, message):
  config = config_files.load(os.path.join(ROOT, "launch", "configs", "digits.py"))
  config.data.options = options
  assert message in _check_config_message(config)


@pytest.mark.parametrize(
  "text, why",
  [
    ("{", r"damaged \(JSONDecodeError\)"),
    ("null", r"damaged \(JSON null, not an object\)"),
    ("[1, 2]", r"damaged \(JSON list, not an object\)"),
    ('{"a.b": 1}', r"damaged \(ValueError: .*a\.b"),
  ],
)
def test_a_damaged_saved_config_is_one_line(tmp_path, text, why):
  (tmp_path / "config.json").write_text(text)
  with pytest.raises(InputError, match=why + r".*run any phase there again") as e:
    pipeline.saved_config(str(tmp_path))
  assert "\n" not in str(e.value)
