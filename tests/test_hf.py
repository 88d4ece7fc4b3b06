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
from robust_gate.hf.llama import Rope, config_from_json, inverse_frequencies

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAMES = ("gpt2", "llama_tied", "llama_untied")
TOLERANCE = 1e-4  # float32 against transformers' float32, per token
# Scaled rotary embeddings, by fixture name (launch/make_hf_fixtures.py --only ...).
ROPE_FIXTURES = {"llama_rope_llama3": "llama3", "llama_rope_linear": "linear"}


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
  assert "rope type 'dynamic', which is not supported" in _error(
    variant("dynamic", "llama_tied", lambda c: c.update(rope_scaling={"type": "dynamic"}))
  )
  assert "rope_parameters of rope type 'llama3' has no 'factor'" in _error(
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


LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


def _llama_config(**edits) -> dict:
  """llama_tied's config.json with `edits` (None: the key removed)."""
  config = json.loads((FIXTURES / "llama_tied" / "config.json").read_text())
  config.update(edits)
  return {key: value for key, value in config.items() if value is not None}


def test_rope_records_read_alike_from_either_generation_of_keys():
  llama3 = {"rope_type": "llama3", **LLAMA3, "original_max_position_embeddings": 8192}
  want = Rope(500000.0, "llama3", 8.0, 1.0, 4.0, 8192)
  readings = {
    "transformers ≥ 5": _llama_config(rope_parameters={**llama3, "rope_theta": 500000}),
    "transformers < 5": _llama_config(
      rope_parameters=None, rope_scaling=llama3, rope_theta=500000.0
    ),
    "both, as exported": _llama_config(
      rope_parameters={**llama3, "rope_theta": 5e5}, rope_scaling=llama3, rope_theta=5e5
    ),
  }
  for what, config in readings.items():
    assert config_from_json(config, "ckpt").rope == want, what
  legacy = _llama_config(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2})
  assert config_from_json(legacy, "ckpt").rope == Rope(10000.0, "linear", factor=2.0)
  assert config_from_json(_llama_config(rope_parameters=None), "ckpt").rope == Rope(10000.0)
  assert want.scaling() == llama3 and want.parameters() == {**llama3, "rope_theta": 500000.0}


def test_scalings_that_change_no_frequency_are_the_default_rotary_embedding(tmp_path):
  default_K2 = inverse_frequencies(Rope(500.0), 16)
  np.testing.assert_array_equal(inverse_frequencies(Rope(500.0, "linear", 1.0), 16), default_K2)
  unit = Rope(500.0, "llama3", 1.0, 1.0, 4.0, 8192)  # each band's ω·(1 − s + s), rounded
  np.testing.assert_allclose(inverse_frequencies(unit, 16), default_K2, rtol=1e-6)
  # A pre-training context far above every wavelength (2π·500^(7/8) ≈ 1440): all
  # frequencies are "high" and kept whatever the factor.
  long = Rope(500.0, "llama3", 8.0, 1.0, 4.0, 10**6)
  np.testing.assert_array_equal(inverse_frequencies(long, 16), default_K2)
  # Through a checkpoint: the same log-probs as its default rotary embedding, until a
  # scaling changes frequencies.
  model = hf.load(str(FIXTURES / "llama_untied"))
  d, _ = _reference("llama_untied", model)
  default_BxT = hf.token_logprobs(model, d.inputs_NxT, d.targets_NxT)
  scalings = {
    "linear_one": ({"rope_type": "linear", "factor": 1.0}, 0.0),
    "llama3_one": (
      {"rope_type": "llama3", **LLAMA3, "factor": 1.0, "original_max_position_embeddings": 64},
      1e-5,
    ),
    "llama3_long": (
      {"rope_type": "llama3", **LLAMA3, "original_max_position_embeddings": 10**6},
      0.0,
    ),
  }
  for name, (scaling, atol) in scalings.items():
    path = tmp_path / name
    shutil.copytree(FIXTURES / "llama_untied", path)
    _edit_json(path / "config.json", lambda c, s=scaling: c["rope_parameters"].update(s))
    scaled = hf.load(str(path))
    assert scaled.config.rope.rope_type == scaling["rope_type"]
    got_BxT = hf.token_logprobs(scaled, d.inputs_NxT, d.targets_NxT)
    np.testing.assert_allclose(got_BxT, default_BxT, rtol=0, atol=atol, err_msg=name)
  changed = dataclasses.replace(model.config, rope=Rope(500.0, "llama3", 8.0, 1.0, 4.0, 64))
  changed_BxT = hf.token_logprobs(
    dataclasses.replace(model, config=changed), d.inputs_NxT, d.targets_NxT
  )
  assert np.abs(changed_BxT - default_BxT).max() > 0.01  # the check can fail


def test_llama3_frequencies_follow_the_closed_form_in_each_band():
  """ω_i = 10000^(−i/8) for head_dim 16, wavelengths λ_i = 2π·10^(i/2) = 6.3, 19.9,
  62.8, 199, ...; pre-training context L = 128, band [L/8, L] = [16, 128]: ω_0 kept,
  ω_1 and ω_2 mixed, ω_3 .. ω_7 divided by the factor 8."""
  rope = Rope(
    10000.0,
    "llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=8.0,
    original_max_position_embeddings=128,
  )
  i = np.arange(8)
  omega = 10.0 ** (-i / 2.0)
  wavelength = 2 * np.pi * 10.0 ** (i / 2.0)
  assert wavelength[0] < 16 < wavelength[1] < wavelength[2] < 128 < wavelength[3]
  s1, s2 = (128 / wavelength[1:3] - 1.0) / (8.0 - 1.0)  # 1 at λ = 16, 0 at λ = 128
  scale = np.array([1.0, (1 - s1) / 8 + s1, (1 - s2) / 8 + s2, 1 / 8, 1 / 8, 1 / 8, 1 / 8, 1 / 8])
  np.testing.assert_allclose(inverse_frequencies(rope, 16), omega * scale, rtol=2e-6)


REFUSED_ROPE = {
  "dynamic": (
    dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
    "rope_parameters has rope type 'dynamic', which is not supported; supported: default, "
    "linear, llama3.",
  ),
  "yarn": (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope type 'yarn', which is not"),
  "longrope": (dict(rope_scaling={"rope_type": "longrope"}), "rope type 'longrope', which is not"),
  "no factor": (
    dict(rope_parameters={"rope_type": "linear"}),
    "rope_parameters of rope type 'linear' has no 'factor'",
  ),
  "zero factor": (
    dict(rope_parameters={"rope_type": "linear", "factor": 0}),
    "rope_parameters.factor=0 must be a positive float",
  ),
  "negative factor": (
    dict(rope_scaling={"rope_type": "llama3", **LLAMA3, "factor": -8.0}),
    "rope_scaling.factor=-8.0 must be a positive float",
  ),
  "string factor": (
    dict(rope_parameters={"rope_type": "linear", "factor": "4"}),
    "rope_parameters.factor='4' must be a positive float",
  ),
  "no context": (
    dict(rope_parameters={"rope_type": "llama3", **LLAMA3}),
    "rope type 'llama3' has no 'original_max_position_embeddings'",
  ),
  "fractional context": (
    dict(
      rope_parameters={"rope_type": "llama3", **LLAMA3, "original_max_position_embeddings": 8192.5}
    ),
    "rope_parameters.original_max_position_embeddings=8192.5 must be a positive int",
  ),
  "low ≥ high": (
    dict(
      rope_parameters={
        "rope_type": "llama3",
        **LLAMA3,
        "low_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
      }
    ),
    "rope_parameters.low_freq_factor=4.0 must be less than rope_parameters.high_freq_factor=4.0",
  ),
  "not an object": (
    dict(rope_parameters="llama3"),
    "rope_parameters='llama3' must be a JSON object",
  ),
  "theta": (dict(rope_parameters=None, rope_theta=0), "rope_theta=0 must be a positive float"),
  "theta twice": (
    dict(rope_theta=500.0),
    "rope_theta=500.0 disagrees with rope_parameters.rope_theta=10000.0",
  ),
  "two embeddings": (
    dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "rope_parameters {'rope_type': 'default', 'rope_theta': 10000.0} and rope_scaling",
  ),
  "partial": (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5 is not supported"),
  "per layer type": (
    dict(rope_parameters={"full_attention": {"rope_type": "default"}}),
    "rope_parameters holds one rotary embedding per layer type",
  ),
  "context twice": (
    dict(
      rope_parameters={"rope_type": "llama3", **LLAMA3, "original_max_position_embeddings": 8192},
      original_max_position_embeddings=4096,
    ),
    "original_max_position_embeddings=4096 disagrees with "
    "rope_parameters.original_max_position_embeddings=8192",
  ),
}


@pytest.mark.parametrize("what", REFUSED_ROPE)
def test_unsupported_or_malformed_rotary_embeddings_are_refused_in_one_line(what):
  edits, message = REFUSED_ROPE[what]
  with pytest.raises(InputError) as e:
    config_from_json(_llama_config(**edits), "ckpt")
  assert str(e.value).startswith("ckpt/config.json: ") and "\n" not in str(e.value)
  assert message in str(e.value)


def test_export_writes_a_scaled_rotary_embedding_back_for_every_transformers_version(tmp_path):
  model = hf.load(str(FIXTURES / "llama_untied"))
  rope = Rope(500.0, "llama3", 8.0, 1.0, 4.0, 64)
  scaled = dataclasses.replace(model, config=dataclasses.replace(model.config, rope=rope))
  out = Path(hf.export.save(scaled, str(tmp_path / "out")))
  config = json.loads((out / "config.json").read_text())
  llama3 = {"rope_type": "llama3", **LLAMA3, "original_max_position_embeddings": 64}
  assert config["rope_parameters"] == {**llama3, "rope_theta": 500.0}
  assert config["rope_scaling"] == llama3 and config["rope_theta"] == 500.0
  again = hf.load(str(out))
  assert again.config == scaled.config and hf.fingerprint(again) == hf.fingerprint(scaled)
  d, _ = _reference("llama_untied", model)
  np.testing.assert_array_equal(
    hf.token_logprobs(again, d.inputs_NxT, d.targets_NxT),
    hf.token_logprobs(scaled, d.inputs_NxT, d.targets_NxT),
  )
  # Each generation's keys alone describe the same embedding.
  for dropped in (("rope_scaling", "rope_theta"), ("rope_parameters",)):
    alone = {k: v for k, v in config.items() if k not in dropped}
    assert config_from_json(alone, str(out)).rope == rope, dropped
  # Exported back to the default rotary embedding, it has no rope_scaling.
  plain = hf.export.config_json(dataclasses.replace(again, config=model.config))
  assert "rope_scaling" not in plain and plain["rope_parameters"] == model.config.rope.parameters()


@pytest.mark.parametrize("name", ROPE_FIXTURES)
def test_scaled_rotary_embeddings_match_transformers(name):
  if not (FIXTURES / name).is_dir():
    pytest.skip(
      f"tests/fixtures/hf/{name} is not written yet: run `python launch/make_hf_fixtures.py "
      f"--only {name}` where torch and transformers are installed"
    )
  model = hf.load(str(FIXTURES / name))
  assert model.config.rope.rope_type == ROPE_FIXTURES[name]
  d, want_BxT = _reference(name, model)
  got_BxT = np.asarray(hf.token_logprobs(model, d.inputs_NxT, d.targets_NxT))[d.mask_NxT]
  error = np.abs(got_BxT.reshape(want_BxT.shape) - want_BxT).max()
  print(f"{name}: max |Δ log-prob| against transformers {error:.2e}")
  assert error < TOLERANCE
  assert want_BxT.std() > 1.0  # sharp distributions: a wrong forward pass would not agree
  # The scaling matters: the same weights with the default rotary embedding disagree.
  default = dataclasses.replace(model.config, rope=Rope(model.config.rope.rope_theta))
  default_BxT = hf.token_logprobs(
    dataclasses.replace(model, config=default), d.inputs_NxT, d.targets_NxT
  )
  assert (
    np.abs(np.asarray(default_BxT)[d.mask_NxT].reshape(want_BxT.shape) - want_BxT).max()
    > 100 * TOLERANCE
  )


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


def _fixture(loaded, name: str) -> hf.Model:
  if name in loaded:
    return loaded[name]
  if not (FIXTURES / name).is_dir():
    pytest.skip(f"tests/fixtures/hf/{name} is not written yet (launch/make_hf_fixtures.py)")
  return hf.load(str(FIXTURES / name))


@pytest.mark.parametrize("name", (*NAMES, *ROPE_FIXTURES))
def test_decode_steps_over_the_key_value_cache_give_the_full_forward_pass(loaded, name):
  """One position at a time over the cache (hf.decode_step), every position's whole
  next-token distribution is the full forward's: learned positions (GPT-2), rotary ones
  with their rescalings and grouped-query attention (Llama)."""
  model = _fixture(loaded, name)
  d, _ = _reference(name, model)
  full_BxTxV = jax.jit(hf.next_token_logprobs)(model, d.inputs_NxT)
  step_through = lambda m, x: sampling.step_through(sampling.checkpoint_stepper(m), x)
  stepped_BxTxV = jax.jit(step_through)(model, d.inputs_NxT)
  error = np.abs(np.asarray(stepped_BxTxV) - np.asarray(full_BxTxV))
  print(
    f"{name}: max |Δ log-prob| decode vs full {error.max():.2e}, relative "
    f"{(error / np.abs(full_BxTxV)).max():.2e}"
  )
  # Relative: log-probs reach −20 here, and float32 sums in another order move them by
  # ~1e-5 (so does the full forward itself, run on a shorter prefix or a smaller batch).
  np.testing.assert_allclose(stepped_BxTxV, full_BxTxV, rtol=F32_RTOL, atol=1e-5)
  np.testing.assert_allclose(np.exp(stepped_BxTxV), np.exp(full_BxTxV), atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama_untied", "llama_rope_llama3"])
def test_cached_sampling_draws_the_tokens_of_uncached_sampling(loaded, name):
  model = _fixture(loaded, name)
  # The model an argument, not a constant of the program (sampling's module docstring).
  next_fn = lambda m: lambda x: hf.next_token_logprobs(m, x)
  uncached = jax.jit(lambda m, k: sampling.sample(next_fn(m), k, 8, 16, 0.8, 40))
  cached = jax.jit(
    lambda m, k: sampling.sample_cached(sampling.checkpoint_stepper(m), k, 8, 16, 0.8, 40)
  )
  for seed in range(4):
    want, got = uncached(model, jax.random.key(seed)), cached(model, jax.random.key(seed))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_the_gated_checkpoint_mixture_samples_alike_with_and_without_the_cache():
  """The gated mixture of a GPT-2 and a Llama expert, cached (each expert's keys and
  values, the prefix log-likelihoods as a running sum): the same draws as rerunning the
  prefix, and along them the same next-token distributions at every position. The gate
  reads tokens and positions, and its correction network is not zero."""
  paths = {"gpt2": str(FIXTURES / "gpt2"), "llama": str(FIXTURES / "llama_untied")}
  ckpts = list(hf.load_models(paths).values())
  V, T = ckpts[0].config.vocab_size, 12
  gate_cfg = models.GateConfig(num_experts=2, vocab_size=V, max_len=T, token_embed=4, pos_embed=4)
  gate_params = jax.tree.map(
    lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape),
    models.init_gate(gate_cfg, jax.random.PRNGKey(0)),
  )
  # Models and gate arguments, not constants of the program (sampling's module docstring).
  next_fn = lambda ms, g: sampling.checkpoint_gated_next_fn(ms, gate_cfg, g)
  stepper = lambda ms, g: sampling.checkpoint_gated_stepper(ms, gate_cfg, g)
  uncached = jax.jit(lambda ms, g, k: sampling.sample(next_fn(ms, g), k, 6, T))
  cached = jax.jit(lambda ms, g, k: sampling.sample_cached(stepper(ms, g), k, 6, T))
  for seed in range(3):
    key = jax.random.key(seed)
    want, got = uncached(ckpts, gate_params, key), cached(ckpts, gate_params, key)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
  inputs_BxT = jnp.concatenate([jnp.zeros((6, 1), jnp.int32), got[0][:, :-1]], axis=1)
  both = lambda ms, g, x: (
    next_fn(ms, g)(x),
    jnp.stack([hf.next_token_logprobs(m, x) for m in ms], 2),
  )
  full_BxTxV, experts_BxTxMxV = jax.jit(both)(ckpts, gate_params, inputs_BxT)
  step_through = lambda ms, g, x: sampling.step_through(stepper(ms, g), x)
  stepped_BxTxV = jax.jit(step_through)(ckpts, gate_params, inputs_BxT)
  error = np.abs(np.asarray(stepped_BxTxV) - np.asarray(full_BxTxV)).max()
  print(f"gated mixture: max |Δ log-prob| cached vs uncached {error:.2e}")
  np.testing.assert_allclose(stepped_BxTxV, full_BxTxV, rtol=F32_RTOL, atol=1e-5)
  # Both experts weigh in where the carried prefix likelihoods enter the gate (after the
  # first position): there some mixtures are neither expert's distribution.
  distance_BxTxM = np.abs(full_BxTxV[:, :, None] - experts_BxTxMxV).max(-1)
  assert np.any(distance_BxTxM[:, 1:].min(-1) > 1e-2)
