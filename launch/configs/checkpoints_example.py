"""Pre-trained checkpoints as experts (launch/checkpoints.py): one config, one command.

As written it runs on this repository's files (a minute on a CPU): the two small
random checkpoints of tests/fixtures/hf (a GPT-2 and a Llama sharing a tokenizer)
as the experts of two domains of local text, the Python sources of two standard-
library packages. Replace `experts` and `data.files` with your own: one checkpoint
directory (config.json, *.safetensors, tokenizer.json; GPT-2 or Llama) and the text
files of its domain per name.
"""

import os

import ml_collections

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_STDLIB = os.path.dirname(os.__file__)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds the gates, the game's batches and the student's
  # Domain name: checkpoint directory. The names are the domains; experts must share
  # one tokenizer (refused otherwise, naming what differs).
  c.experts = ml_collections.ConfigDict(
    {
      "json": os.path.join(_ROOT, "tests/fixtures/hf/gpt2"),
      "email": os.path.join(_ROOT, "tests/fixtures/hf/llama_tied"),
    }
  )
  c.dtype = "float32"  # experts' parameters and matmuls: "float32" or "bfloat16"
  # Devices that split each expert's parameters between them (a "model" mesh axis;
  # batches split over the rest). 1: every device holds every expert whole.
  c.model_parallel = 1
  c.baseline = "expert"  # b_k: the domain's own expert's cross-entropy ("none": 0)
  c.uncertainty = "simplex"  # Λ: "simplex", "box" or "kl_ball"
  c.box_lo = 0.05  # box Λ: every λ_k ≥ box_lo
  c.box_hi = 0.5  # box Λ: every λ_k ≤ box_hi
  c.kl_radius = 0.1  # kl_ball Λ: KL(λ ‖ uniform) ≤ kl_radius
  c.checkpoint_every = 100  # steps per compiled chunk; a checkpoint after each
  # Bytes of a split's tokens and cache kept on every device; larger ones stream from
  # the host. None: all resident.
  c.device_budget_bytes = ml_collections.config_dict.placeholder(int)

  c.data = ml_collections.ConfigDict()
  c.data.name = "checkpoint_text"  # a label (results.json, specs)
  # Domain name: glob patterns of UTF-8 text files (a directory: every file under it).
  c.data.files = ml_collections.ConfigDict(
    {
      "json": [os.path.join(_STDLIB, "json", "*.py")],
      "email": [os.path.join(_STDLIB, "email", "*.py")],
    }
  )
  c.data.max_len = 64  # tokens per sequence, BOS/EOS included (≤ a GPT-2's n_positions)
  c.data.validation = 0.2  # fraction of files (or chunks) in validation
  c.data.test = 0.2  # and in test; the rest trains the student
  c.data.split_by = "chunk"  # "file": a file's chunks stay in one split; "chunk": finer

  c.gate = ml_collections.ConfigDict()
  c.gate.hidden = 32  # gate MLP width
  c.gate.token_embed = 0  # gate token-embedding width (0: none)
  c.gate.pos_embed = 8  # gate position-embedding width
  c.gate.steps = 300  # primal-dual steps
  c.gate.lr = 3e-3  # Adam learning rate of the gate
  c.gate.dual_lr = 0.5  # mirror-ascent step size η of the robust gate
  c.gate.dual_timescale = 0.0  # τ > 0: η_t = η/√(1 + t/τ) (docs/math.md §9.1)
  c.gate.optimistic = 0  # 1: optimistic steps for both players (docs/math.md §9.2)
  c.gate.dual_holdout = 0.5  # fraction of validation the dual player sees (not fitted)
  c.gate.per_domain = 16  # cached sequences per domain per step
  c.gate.ema_decay = 0.99  # EMA of w: the gate reported (0: the last iterate)

  c.distill = ml_collections.ConfigDict()
  c.distill.steps = 50  # student steps (the teacher's M forward passes each step)
  c.distill.lr = 3e-4  # Adam learning rate of the student
  c.distill.per_domain = 4  # train sequences per domain per step
  # Domain weights of the distillation loss: "uniform", or "lam_bar" (the robust gate's
  # λ̄); chosen on validation (docs/math.md §5)
  c.distill.weights = "uniform"
  return c
