"""robust_gate.hf against transformers' own numbers, on the checkpoints that
launch/make_hf_fixtures.py wrote into tests/fixtures/hf (no network, no PyTorch)."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from tolerances import F32_RTOL

import robust_gate.hf as hf
from robust_gate import data, experts, gating, models, sampling
from robust_gate.checks import InputError
from robust_gate.hf import checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAMES = ("gpt2", "llama_tied", "llama_untied")
TOLERANCE = 1e-4  # float32 against transformers' float32, per token


@pytest.fixture(scope="module")
def loaded():
  return {name: hf.load(str(FIXTURES / name)) for name in NAMES}


def _reference(name: str, model: hf.Model, pad: int = 3):
  """The reference rows as a DomainData (data ids, padded past EOS) and transformers'
  log-probs of their targets [B, n + 1]."""
  ref = np.load(FIXTURES / name / "reference.npz")
  ids_BxT = ref["ids_BxT"]
  eos = model.tokenizer.eos_id
  assert np.all(ids_BxT[:, 0] == model.tokenizer.bos_id) and np.all(ids_BxT[:, -1] == eos)
  body = [hf.tokenizer.swap_eos(row[1:-1], eos) for row in ids_BxT]
  B, T = ids_BxT.shape
  d = data.encode(body, np.zeros(B, int), ["all"], model.config.vocab_size, T - 1 + pad)
  return d, ref["logp_BxT"]


@pytest.mark.parametrize("name", NAMES)
def test_token_logprobs_match_transformers(loaded, name):
  model = loaded[name]
  d, want_BxT = _reference(name, model)
  cache = experts.build_cache([hf.expert(model, name)], d, batch_size=4)
  got_BxT = cache[..., 0][d.mask_NxT].reshape(want_BxT.shape)
  error = np.abs(got_BxT - want_BxT).max()
  print(f"{name}: max |Δ log-prob| against transformers {error:.2e}")
  assert error < TOLERANCE
  assert want_BxT.std() > 1.0  # sharp distributions: a wrong forward pass would not agree


@pytest.mark.parametrize("name", NAMES)
def test_next_token_distributions_normalize_and_agree(loaded, name):
  model = loaded[name]
  d, _ = _reference(name, model)
  logp_BxTxV = jax.jit(hf.next_token_logprobs)(model, d.inputs_NxT)
  assert logp_BxTxV.shape == (*d.inputs_NxT.shape, model.config.vocab_size)
  np.testing.assert_allclose(jax.nn.logsumexp(logp_BxTxV, axis=-1), 0.0, atol=1e-5)
  at_targets = jnp.take_along_axis(logp_BxTxV, jnp.asarray(d.targets_NxT)[..., None], -1)[..., 0]
  direct = hf.token_logprobs(model, d.inputs_NxT, d.targets_NxT)
  np.testing.assert_allclose(at_targets, direct, rtol=F32_RTOL)  # jitted vs eager rounding


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_is_close(name):
  model = hf.load(str(FIXTURES / name), dtype="bfloat16")
  assert {leaf.dtype for leaf in jax.tree.leaves(model)} == {jnp.dtype(jnp.bfloat16)}
  d, want_BxT = _reference(name, model)
  got_BxT = np.asarray(hf.token_logprobs(model, d.inputs_NxT, d.targets_NxT))[d.mask_NxT]
  error = np.abs(got_BxT.reshape(want_BxT.shape) - want_BxT)
  assert error.mean() < 0.1 and error.max() < 0.5  # bfloat16 matmuls: 8 bits of mantissa


def _with_kv_heads(model: hf.Model, num_kv_heads: int, order: str) -> hf.Model:
  """The Llama `model` with its key/value heads copied out to `num_kv_heads`, each
  copied next to itself (`order="repeat"`) or the whole set cycled ("tile")."""
  c = model.config
  copies = num_kv_heads // c.num_kv_heads
  layers = dict(model.params["layers"])
  for key in ("k", "v"):
    w_LxDxGxK = layers[key].reshape(c.num_layers, c.d_model, c.num_kv_heads, c.head_dim)
    w = (
      np.repeat(w_LxDxGxK, copies, 2)
      if order == "repeat"
      else np.tile(w_LxDxGxK, (1, 1, copies, 1))
    )
    layers[key] = jnp.asarray(w.reshape(c.num_layers, c.d_model, -1))
  config = dataclasses.replace(c, num_kv_heads=num_kv_heads)
  return dataclasses.replace(model, config=config, params={**model.params, "layers": layers})


def test_grouped_query_attention_shares_each_kv_head_among_consecutive_query_heads(loaded):
  model = loaded["llama_tied"]
  assert model.config.num_kv_heads == 2 < model.config.num_heads == 4
  d, _ = _reference("llama_tied", model)
  grouped = hf.token_logprobs(model, d.inputs_NxT, d.targets_NxT)
  multi_head = _with_kv_heads(model, model.config.num_heads, "repeat")
  np.testing.assert_allclose(
    hf.token_logprobs(multi_head, d.inputs_NxT, d.targets_NxT), grouped, atol=1e-5
  )
  wrong_heads = _with_kv_heads(model, model.config.num_heads, "tile")  # the check can fail
  assert np.abs(hf.token_logprobs(wrong_heads, d.inputs_NxT, d.targets_NxT) - grouped).max() > 0.1


def test_sharded_single_file_and_unindexed_checkpoints_read_alike(tmp_path, loaded):
  source = FIXTURES / "llama_untied"
  assert (source / checkpoint.INDEX).exists()  # the fixture is sharded
  tensors = {}
  for file in sorted(source.glob("*.safetensors")):
    with safe_open(str(file), framework="numpy") as f:
      tensors |= {name: f.get_tensor(name) for name in sorted(f.keys())}
  single, unindexed = tmp_path / "single", tmp_path / "unindexed"
  shutil.copytree(source, unindexed)
  os.remove(unindexed / checkpoint.INDEX)
  shutil.copytree(source, single, ignore=shutil.ignore_patterns("*.safetensors*"))
  save_file(tensors, str(single / checkpoint.SINGLE))
  for path in (single, unindexed):
    reread = hf.load(str(path))
    jax.tree.map(np.testing.assert_array_equal, reread.params, loaded["llama_untied"].params)


def _edit_json(file: Path, edit) -> None:
  value = json.loads(file.read_text())
  edit(value)
  file.write_text(json.dumps(value))


def _error(path) -> str:
  with pytest.raises(InputError) as e:
    hf.load(str(path))
  message = str(e.value)
  assert "\n" not in message
  return message


def test_checkpoint_errors_are_one_line(tmp_path):
  assert "does not exist" in _error(tmp_path / "nowhere")
  assert "has no config.json" in _error(tmp_path)

  def variant(name: str, source: str = "gpt2", config=lambda c: None) -> Path:
    path = tmp_path / name
    shutil.copytree(FIXTURES / source, path)
    _edit_json(path / "config.json", config)
    return path

  assert "model_type 'mistral' is not supported" in _error(
    variant("mistral", config=lambda c: c.update(model_type="mistral"))
  )
  wider = _error(variant("wider", config=lambda c: c.update(vocab_size=400)))
  assert "wte.weight" in wider and "[384, 64]; config.json implies [400, 64]" in wider
  assert "has no tensor h.2.ln_1.weight" in _error(
    variant("deeper", config=lambda c: c.update(n_layer=3))
  )
  assert "does not use, such as h.1" in _error(
    variant("shallower", config=lambda c: c.update(n_layer=1))
  )
  assert "rope type 'llama3' is not supported" in _error(
    variant("llama3", "llama_tied", lambda c: c.update(rope_parameters={"rope_type": "llama3"}))
  )
  no_weights = variant("no_weights")
  os.remove(no_weights / "model.safetensors")
  assert "has no model.safetensors or model.safetensors.index.json" in _error(no_weights)
  no_shard = variant("no_shard", "llama_untied")
  os.remove(no_shard / "model-00002-of-00006.safetensors")
  assert "shard model-00002-of-00006.safetensors" in _error(no_shard)
  no_tokenizer = variant("no_tokenizer")
  os.remove(no_tokenizer / "tokenizer.json")
  assert "has no tokenizer.json" in _error(no_tokenizer)
  with pytest.raises(InputError, match="dtype must be one of"):
    hf.load(str(FIXTURES / "gpt2"), dtype="float16")


def test_gpt2_refuses_sequences_past_its_positions(loaded):
  model = loaded["gpt2"]
  too_long = jnp.ones((1, model.config.max_len + 1), jnp.int32)
  with pytest.raises(InputError, match="exceed this GPT-2's n_positions=64"):
    hf.token_logprobs(model, too_long, too_long)


def test_tokenizer_round_trip_and_refusals(loaded):
  tok = loaded["llama_tied"].tokenizer
  texts = ["def encode(text):\n    return text.split()", "<unk> stays a token"]
  ids = hf.tokenizer.encode(tok, texts)
  assert all(seq.min() >= 1 for seq in ids)  # 0 is the data's BOS/EOS
  assert tok.eos_id in ids[1]  # the checkpoint's token 0, <unk>, as a data id
  assert [hf.tokenizer.decode(tok, seq) for seq in ids] == texts
  with pytest.raises(InputError, match="text 1 contains the end-of-sequence token '</s>'"):
    hf.tokenizer.encode(tok, ["fine", "not </s> here"])
  with pytest.raises(InputError, match="text 0 is a bytes"):
    hf.tokenizer.encode(tok, [b"bytes"])


def _drop_last_token(spec: dict) -> None:
  model = spec["model"]
  last = max(model["vocab"], key=model["vocab"].get)
  del model["vocab"][last]
  model["merges"] = model["merges"][:-1]  # the merge that made it


TOKENIZER_EDITS = {
  "vocabulary size 384 vs 383": ("tokenizer.json", _drop_last_token),
  "added/special tokens": (
    "tokenizer.json",
    lambda s: s["added_tokens"][1].update(special=False),
  ),
  "vocabulary and merges": ("tokenizer.json", lambda s: s["model"]["merges"].pop()),
  "normalizer and pre-tokenizer": (
    "tokenizer.json",
    lambda s: s.update(normalizer={"type": "Lowercase"}),
  ),
  r"BOS/EOS ids \(1, 2\) vs \(2, 2\)": ("config.json", lambda c: c.update(bos_token_id=2)),
}


@pytest.mark.parametrize("what", TOKENIZER_EDITS)
def test_experts_with_different_tokenizers_are_refused(tmp_path, what):
  file, edit = TOKENIZER_EDITS[what]
  other = tmp_path / "llama"
  shutil.copytree(FIXTURES / "llama_tied", other)
  _edit_json(other / file, edit)
  paths = {"gpt2": str(FIXTURES / "gpt2"), "llama": str(other)}
  with pytest.raises(InputError, match=f"'gpt2' and 'llama' have different tokenizers: {what}"):
    hf.load_experts(paths)


def test_gate_mixes_gpt2_and_llama_experts_into_normalized_distributions():
  paths = {"gpt2": str(FIXTURES / "gpt2"), "llama": str(FIXTURES / "llama_untied")}
  group, tok = hf.load_experts(paths)
  texts = ["import json", "return text", "class Fraction:", "heap = []"]
  d = hf.tokenizer.encode_domains(tok, texts, [0, 1, 0, 1], ["a", "b"], 384, max_len=12)
  cache_NxTxM = experts.build_cache(group, d, batch_size=4)
  gate_cfg = models.GateConfig(num_experts=2, vocab_size=384, max_len=12)
  gate_params = models.init_gate(gate_cfg, jax.random.PRNGKey(0))
  prefix = models.prefix_loglik(jnp.asarray(cache_NxTxM), jnp.asarray(d.mask_NxT))
  log_gate_NxTxM = models.gate_log_weights(gate_cfg, gate_params, d.inputs_NxT, prefix)
  ckpts = hf.load_models(paths)
  next_fn = jax.jit(hf.next_token_logprobs)
  logp_NxTxMxV = jnp.stack([next_fn(m, d.inputs_NxT) for m in ckpts.values()], 2)
  mixture_NxTxV = gating.causal_mixture_next_token(log_gate_NxTxM, logp_NxTxMxV)
  np.testing.assert_allclose(jax.nn.logsumexp(mixture_NxTxV, -1), 0.0, atol=1e-5)
  targets = jnp.asarray(d.targets_NxT)[..., None]
  observed_NxT = jnp.take_along_axis(mixture_NxTxV, targets, -1)[..., 0]
  direct_NxT = gating.causal_mixture_logp(log_gate_NxTxM, jnp.asarray(cache_NxTxM))
  np.testing.assert_allclose(observed_NxT[d.mask_NxT], direct_NxT[d.mask_NxT], atol=1e-5)
  mixed = np.exp(np.asarray(log_gate_NxTxM))[d.mask_NxT]
  assert np.all(mixed.min(-1) > 0.0) and np.any(mixed.max(-1) < 0.99)  # both experts used


def test_sampling_from_a_checkpoint(loaded):
  model = loaded["llama_tied"]
  next_fn = lambda x: hf.next_token_logprobs(model, x)
  tokens_BxT, mask_BxT = jax.jit(lambda k: sampling.sample(next_fn, k, 3, 6))(jax.random.key(0))
  assert np.all((tokens_BxT >= 0) & (tokens_BxT < model.config.vocab_size))
  assert all(
    isinstance(hf.tokenizer.decode(model.tokenizer, t, m), str)
    for t, m in zip(tokens_BxT, mask_BxT)
  )


def test_the_gated_model_samples_token_by_token_from_checkpoint_experts():
  """Sampling from the gated mixture of a GPT-2 and a Llama checkpoint: its next-token
  distributions are the gate's mixture of the experts' (normalized), and the draws are
  sequences of the shared tokenizer that decode."""
  paths = {"gpt2": str(FIXTURES / "gpt2"), "llama": str(FIXTURES / "llama_untied")}
  ckpts = list(hf.load_models(paths).values())
  V = ckpts[0].config.vocab_size
  gate_cfg = models.GateConfig(num_experts=2, vocab_size=V, max_len=8, pos_embed=4)
  gate_params = models.init_gate(gate_cfg, jax.random.PRNGKey(0))
  next_fn = sampling.checkpoint_gated_next_fn(ckpts, gate_cfg, gate_params)
  tokens_BxT, mask_BxT = jax.jit(lambda k: sampling.sample(next_fn, k, 4, 8))(jax.random.key(1))
  assert np.all((tokens_BxT >= 0) & (tokens_BxT < V)) and mask_BxT[:, 0].all()
  assert all(
    isinstance(hf.tokenizer.decode(ckpts[0].tokenizer, t, m), str)
    for t, m in zip(tokens_BxT, mask_BxT)
  )
  inputs_BxT = jnp.concatenate([jnp.zeros((4, 1), jnp.int32), tokens_BxT[:, :-1]], axis=1)
  mixture_BxTxV = next_fn(inputs_BxT)
  np.testing.assert_allclose(jax.nn.logsumexp(mixture_BxTxV, -1), 0.0, atol=1e-5)
  experts_BxTxMxV = jnp.stack([hf.next_token_logprobs(m, inputs_BxT) for m in ckpts], 2)
  # A mixture's probability of every token lies between the experts' lowest and highest.
  assert np.all(mixture_BxTxV <= experts_BxTxMxV.max(2) + 1e-5)
  assert np.all(mixture_BxTxV >= experts_BxTxMxV.min(2) - 1e-5)


def test_fingerprints_tell_models_and_dtypes_apart(loaded):
  prints = {hf.fingerprint(m) for m in loaded.values()}
  prints.add(hf.fingerprint(hf.load(str(FIXTURES / "gpt2"), dtype="bfloat16")))
  assert len(prints) == len(NAMES) + 1
  assert hf.fingerprint(hf.load(str(FIXTURES / "gpt2"))) == hf.fingerprint(loaded["gpt2"])
