import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import F32_RTOL

from robust_gate import data, experts, models
from robust_gate.checks import InputError

V = 9


def _data():
  rng = np.random.default_rng(0)
  seqs = [rng.integers(1, V, size=rng.integers(1, 6)) for _ in range(30)]
  return data.encode(seqs, np.arange(30) % 3, ["a", "b", "c"], vocab_size=V, max_len=8)


def unigram(probs_V, name="unigram"):
  """A user-supplied expert of another kind: a pure unigram model."""
  logp_V = jnp.log(jnp.asarray(probs_V, jnp.float32))
  return experts.Expert(
    names=(name,), vocab_size=len(probs_V), logprob_fn=lambda x, y: logp_V[y], fingerprint=name
  )


def test_cache_matches_direct_scoring_and_mixes_kinds():
  d = _data()
  cfg = models.LMConfig(vocab_size=V, max_len=8, d_model=16, num_layers=1, num_heads=2, d_ff=16)
  params = models.init_stacked_lm(cfg, jax.random.PRNGKey(0), 2)
  group = experts.transformer_experts(cfg, params, ["lm0", "lm1"])
  uni = unigram(np.full(V, 1.0 / V))
  cache = experts.build_cache([group, uni], d, batch_size=8)  # 30 = 3·8 + 6: padded
  assert cache.shape == (30, 8, 3)
  direct = models.stacked_token_logprobs(cfg, params, d.inputs_NxT, d.targets_NxT)
  np.testing.assert_allclose(cache[..., :2][d.mask_NxT], np.asarray(direct)[d.mask_NxT], atol=1e-5)
  np.testing.assert_allclose(cache[..., 2][d.mask_NxT], -np.log(V), rtol=F32_RTOL)
  assert np.all(cache[~d.mask_NxT] == 0.0)


def test_cache_file_is_tied_to_data_and_experts(tmp_path):
  d = _data()
  uni = unigram(np.full(V, 1.0 / V))
  path = str(tmp_path / "cache.npz")
  first = experts.cached_scores(path, [uni], d)
  np.testing.assert_array_equal(experts.cached_scores(path, [uni], d), first)
  with pytest.raises(InputError, match="built for other data or other experts"):
    experts.cached_scores(path, [uni], d.subset(np.arange(20)))
  with pytest.raises(InputError, match="built for other data or other experts"):
    experts.cached_scores(path, [unigram(np.full(V, 1.0 / V), "other")], d)
  assert np.array_equal(np.load(path)["cache"], first)  # nothing overwritten


def test_bad_experts_are_clear_errors():
  d = _data()
  with pytest.raises(InputError, match="vocabularies differ"):
    experts.build_cache([unigram(np.full(V, 1 / V)), unigram(np.full(V + 1, 1 / (V + 1)))], d)
  with pytest.raises(InputError, match="vocabulary size 10 but the data has 9"):
    experts.build_cache([unigram(np.full(V + 1, 1 / (V + 1)))], d)
  with pytest.raises(InputError, match="M = 0"):
    experts.build_cache([], d)
  nan = experts.Expert(("nan",), V, lambda x, y: jnp.full(y.shape, jnp.nan))
  with pytest.raises(InputError, match="is NaN"):
    experts.build_cache([nan], d)
  pos = experts.Expert(("pos",), V, lambda x, y: jnp.full(y.shape, jnp.inf))
  with pytest.raises(InputError, match="not the log-probability"):
    experts.build_cache([pos], d)
  # -inf for some tokens is legal if another expert covers them; not if none does.
  probs = np.full(V, 1.0 / (V - 1))
  probs[3] = 0.0
  partial = unigram(probs)
  cache = experts.build_cache([partial, unigram(np.full(V, 1 / V))], d)
  threes = d.mask_NxT & (d.targets_NxT == 3)
  assert threes.sum() > 0  # the data has the token only the second expert covers
  np.testing.assert_array_equal(cache[..., 0][threes], -np.inf)
  np.testing.assert_allclose(cache[..., 0][d.mask_NxT & ~threes], np.log(probs[0]), rtol=F32_RTOL)
  np.testing.assert_allclose(cache[..., 1][d.mask_NxT], -np.log(V), rtol=F32_RTOL)
  with pytest.raises(InputError, match="-inf under every expert"):
    experts.build_cache([partial], d)


def test_parameters_that_do_not_match_the_architecture_are_refused():
  cfg = models.LMConfig(vocab_size=V, max_len=6, d_model=8, num_layers=1, num_heads=2, d_ff=16)
  params = jax.jit(lambda key: models.init_stacked_lm(cfg, key, 2))(jax.random.PRNGKey(0))
  experts.transformer_experts(cfg, params, ["a", "b"])  # matches
  wide = dataclasses.replace(cfg, d_model=16)
  with pytest.raises(InputError, match="do not match the architecture"):
    experts.transformer_experts(wide, params, ["a", "b"])
  with pytest.raises(InputError, match="do not match the architecture"):
    experts.transformer_experts(cfg, params, ["a", "b", "c"])  # 2 stacked, 3 names
  deeper = dataclasses.replace(cfg, num_layers=2)
  with pytest.raises(InputError, match="missing"):
    experts.transformer_experts(deeper, params, ["a", "b"])


def _truncated(path, cache, fingerprint):
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flipped(path, cache, fingerprint):
  """One bit of a stored value flipped: still a valid float, caught by the zip's CRC."""
  raw = bytearray(path.read_bytes())
  raw[raw.index(cache.tobytes()) + 100] ^= 0x01
  path.write_bytes(bytes(raw))


def _emptied(path, cache, fingerprint):
  path.write_bytes(b"")


def _rewritten(change):
  """The cache changed by `change` and saved again with the right fingerprint."""
  return lambda path, cache, fingerprint: experts.save_cache(str(path), change(cache), fingerprint)


def _nan(cache):
  return np.where(np.arange(cache.size).reshape(cache.shape) == 5, np.nan, cache)


@pytest.mark.parametrize(
  "damage, problem",
  [
    (_truncated, "unreadable: BadZipFile"),
    (_flipped, "unreadable: BadZipFile: Bad CRC-32"),
    (_emptied, "unreadable: EOFError"),
    (_rewritten(_nan), "cache[0, 2, 1] is NaN"),
    (_rewritten(lambda c: c[:20]), "shape (20, 8, 2) float32, expected (30, 8, 2) float32"),
    (_rewritten(lambda c: c.astype(np.float64)), "float64, expected (30, 8, 2) float32"),
    (_rewritten(lambda c: -c), "> 0: not the log-probability of a token"),
    (_rewritten(lambda c: c - 1.0), "nonzero where the mask is off"),
  ],
)
def test_a_damaged_cache_is_announced_and_rebuilt(tmp_path, damage, problem):
  d = _data()
  ramp = np.linspace(1.0, 2.0, V)
  group = [unigram(np.full(V, 1.0 / V)), unigram(ramp / ramp.sum(), "ramp")]
  path = str(tmp_path / "cache_validation.npz")
  fresh = experts.cached_scores(path, group, d, log=pytest.fail)  # built: nothing to announce
  damage(tmp_path / "cache_validation.npz", fresh, experts.cache_fingerprint(d, group))
  lines = []
  again = experts.cached_scores(path, group, d, log=lines.append)
  assert len(lines) == 1 and lines[0].startswith(f"cache {path} is damaged (")
  assert problem in lines[0] and lines[0].endswith("; rebuilding it.")
  np.testing.assert_array_equal(again, fresh)
  np.testing.assert_array_equal(
    experts.load_cache(path, experts.cache_fingerprint(d, group), d, 2), fresh
  )  # the file itself is whole again
