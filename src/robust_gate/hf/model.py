"""A pre-trained checkpoint as an expert: loading, log-probabilities in data ids.

`load(path)` reads a local Hugging Face checkpoint directory (config.json, its
safetensors, tokenizer.json) of a supported family into a `Model`: a pytree whose
only leaves are the parameters, so `jax.jit(token_logprobs)(model, x, y)` traces
them as arguments. `next_token_logprobs` and `token_logprobs` take and give data
ids (robust_gate.hf.tokenizer: 0 is BOS as an input and EOS as a target), as do
`init_cache` and `decode_step`, one position's forward pass over a key/value cache
(robust_gate.hf.decode), which sampling uses; `expert` wraps a model as an
`experts.Expert`, and `load_experts` loads several and refuses them unless they
share a tokenizer.
"""

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from types import ModuleType

import jax
import jax.numpy as jnp

from robust_gate import experts
from robust_gate.checks import InputError
from robust_gate.hf import checkpoint, decode, gpt2, llama
from robust_gate.hf import tokenizer as tokenizer_lib

FAMILIES: dict[str, ModuleType] = {"gpt2": gpt2, "llama": llama}  # by config.json's model_type
DTYPES = ("float32", "bfloat16")

# Puts a family's host (numpy) parameters on devices: by default whole on the default
# device; robust_gate.hf.sharding.placer splits them over a mesh's model axis.
Place = Callable[[dict], dict]


def _on_default_device(params: dict) -> dict:
  return jax.tree.map(jnp.asarray, params)


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  params: dict  # the family's parameters, layers stacked on a leading axis
  family: str  # a key of FAMILIES
  config: gpt2.Config | llama.Config
  tokenizer: tokenizer_lib.Tokenizer
  path: str


jax.tree_util.register_dataclass(
  Model, data_fields=["params"], meta_fields=["family", "config", "tokenizer", "path"]
)


def load(path: str, dtype: str = "float32", place: Place | None = None) -> Model:
  """The checkpoint in directory `path`, parameters cast to `dtype` (float32, or
  bfloat16 for accelerators: half the memory, matmuls at bfloat16 precision) and put
  on devices by `place` (None: whole on the default device). The parameters go from
  the host to their devices directly, so a model split by `place` is never whole on one."""
  if dtype not in DTYPES:
    raise InputError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
  raw = checkpoint.read_config(path)
  model_type = raw.get("model_type")
  if model_type not in FAMILIES:
    raise InputError(
      f"{path}/config.json: model_type {model_type!r} is not supported; "
      f"supported: {', '.join(FAMILIES)}."
    )
  family = FAMILIES[model_type]
  config = family.config_from_json(raw, path)
  tok = tokenizer_lib.load(path, raw)
  if tok.size > config.vocab_size:
    raise InputError(
      f"checkpoint {path}: its tokenizer has {tok.size} tokens, its model {config.vocab_size}."
    )
  params = checkpoint.read_params(path, family.spec(config), jnp.dtype(dtype))
  return Model((place or _on_default_device)(params), model_type, config, tok, path)


def _checkpoint_ids(data_ids, eos_id: int, zero_as: int) -> jax.Array:
  """Data ids as the checkpoint's: 0 becomes `zero_as` (BOS for inputs, EOS for
  targets), the data's `eos_id` the checkpoint's token 0."""
  data_ids = jnp.asarray(data_ids)
  return jnp.where(data_ids == 0, zero_as, jnp.where(data_ids == eos_id, 0, data_ids))


def _checkpoint_logprobs(model: Model, inputs_BxT) -> jax.Array:
  """log-softmax of the logits, float32, in the checkpoint's own id order."""
  tok = model.tokenizer
  ids_BxT = _checkpoint_ids(inputs_BxT, tok.eos_id, zero_as=tok.bos_id)
  logits = FAMILIES[model.family].logits(model.config, model.params, ids_BxT)
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _in_data_order(model: Model, logp_xV: jax.Array) -> jax.Array:
  """Log-distributions over checkpoint ids (last axis) as distributions over data ids."""
  eos = model.tokenizer.eos_id
  if eos == 0:
    return logp_xV
  swapped = logp_xV[..., jnp.array([eos, 0])]  # data id 0 is EOS; data id eos is token 0
  return logp_xV.at[..., jnp.array([0, eos])].set(swapped)


def next_token_logprobs(model: Model, inputs_BxT) -> jax.Array:
  """Full next-token log-distributions over data ids, [B, T, V] float32 (V: the
  model's output width); the distillation teacher and `sampling.sample` take these."""
  return _in_data_order(model, _checkpoint_logprobs(model, inputs_BxT))


def init_cache(model: Model, batch_size: int, max_len: int) -> decode.KVCache:
  """An empty key/value cache for `decode_step`: sequences of up to `max_len` tokens."""
  return FAMILIES[model.family].init_cache(model.config, model.params, batch_size, max_len)


def decode_step(
  model: Model, cache: decode.KVCache, inputs_B, t
) -> tuple[jax.Array, decode.KVCache]:
  """`next_token_logprobs`' row t, [B, V] float32 over data ids, from the inputs at
  position t (data ids; 0 is BOS) and a cache holding positions < t (filled by the
  steps at 0 … t − 1); returns the cache with position t added (robust_gate.hf.decode).
  `sampling.checkpoint_stepper` samples with it."""
  tok = model.tokenizer
  ids_B = _checkpoint_ids(inputs_B, tok.eos_id, zero_as=tok.bos_id)
  family = FAMILIES[model.family]
  logits_BxV, cache = family.decode_step(model.config, model.params, cache, ids_B, t)
  return _in_data_order(model, jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)), cache


def token_logprobs(model: Model, inputs_BxT, targets_BxT) -> jax.Array:
  """log p(target_t | x_≤t) of data-id targets, [B, T] float32."""
  logp_BxTxV = _checkpoint_logprobs(model, inputs_BxT)
  eos = model.tokenizer.eos_id
  ids_BxT = _checkpoint_ids(targets_BxT, eos, zero_as=eos)
  return jnp.take_along_axis(logp_BxTxV, ids_BxT[..., None], axis=-1)[..., 0]


def fingerprint(model: Model) -> str:
  """Identifies the function the model computes: family, config, BOS/EOS, parameters."""
  tok = model.tokenizer
  head = repr((model.family, model.config, tok.bos_id, tok.eos_id, tok.model_digest))
  return hashlib.sha1((head + experts.params_fingerprint(model.params)).encode()).hexdigest()


def expert(model: Model, name: str) -> experts.Expert:
  """`model` as one expert named `name`."""
  return experts.Expert(
    names=(name,),
    vocab_size=model.config.vocab_size,
    logprob_fn=lambda x, y: token_logprobs(model, x, y),
    fingerprint=fingerprint(model),
  )


def expert_group(named: Mapping[str, Model]) -> experts.Expert:
  """Several models as one expert group, [B, T, M] (one column per name, in order):
  what a job's caches and `records.Experts.group` hold."""
  if not named:
    raise InputError("no checkpoints given.")
  names, models = tuple(named), tuple(named.values())
  widths = {m.config.vocab_size for m in models}
  if len(widths) > 1:
    raise InputError(
      f"experts {list(names)} have output widths {[m.config.vocab_size for m in models]}: "
      f"a gate mixes distributions over one vocabulary."
    )
  digest = hashlib.sha1("|".join(map(fingerprint, models)).encode()).hexdigest()
  return experts.Expert(
    names=names,
    vocab_size=models[0].config.vocab_size,
    logprob_fn=lambda x, y: jnp.stack([token_logprobs(m, x, y) for m in models], axis=-1),
    fingerprint=digest,
  )


def load_expert(path: str, name: str, dtype: str = "float32") -> experts.Expert:
  """The checkpoint in `path` as one expert named `name`."""
  return expert(load(path, dtype), name)


def load_models(
  paths: Mapping[str, str], dtype: str = "float32", place: Place | None = None
) -> dict[str, Model]:
  """Checkpoints by expert name, each put on devices by `place` (`load`); InputError
  unless they share one tokenizer."""
  if not paths:
    raise InputError("no checkpoints given.")
  loaded = {name: load(path, dtype, place) for name, path in paths.items()}
  tokenizer_lib.check_same({name: m.tokenizer for name, m in loaded.items()})
  return loaded


def load_experts(
  paths: Mapping[str, str], dtype: str = "float32"
) -> tuple[list[experts.Expert], tokenizer_lib.Tokenizer]:
  """Experts by name from checkpoints that share a tokenizer, and that tokenizer
  (to encode the data)."""
  loaded = load_models(paths, dtype)
  return [expert(m, name) for name, m in loaded.items()], next(iter(loaded.values())).tokenizer
