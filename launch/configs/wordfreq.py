"""Default main job: six wordfreq languages, byte-level experts (2-core CPU, < 10 min)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds model init, sampling and the game
  # Seeds seed, seed+1, ... that every experiment repeats its training over
  # (launch/experiment.py); reported as mean ± sd. At least 3.
  c.experiment_seeds = 3
  c.data_dir = ""  # TFDS data dir; "" = <workdir>/tfds
  c.baseline = "expert"  # b_k (docs/math.md §3): "expert", "entropy" (markov only), "none"
  c.uncertainty = "simplex"  # Λ: "simplex", "box" or "kl_ball"
  c.box_lo = 0.05  # box Λ: every λ_k ≥ box_lo
  c.box_hi = 0.5  # box Λ: every λ_k ≤ box_hi
  c.kl_radius = 0.1  # kl_ball Λ: KL(λ ‖ uniform) ≤ kl_radius
  c.dtype = "float32"  # transformer compute dtype: "float32" or "bfloat16"
  # (parameters, optimizer and log-softmax stay float32)
  c.checkpoint_every = 200  # steps per compiled lax.scan chunk; a checkpoint, metric
  # lines and a progress line after each
  # Bytes of a split's tokens and cache a model may keep on every device; a larger split
  # streams from the host (memory-mapped from disk) with the same results. None: all
  # resident. Not in any spec: it changes where rows live, not what a run computes.
  c.device_budget_bytes = ml_collections.config_dict.placeholder(int)

  c.data = ml_collections.ConfigDict()
  c.data.name = "wordfreq"  # local dataset: "wordfreq", "digits" or "markov"
  c.data.max_len = 16  # context T: BOS + up to T−1 tokens, then EOS
  c.data.options = ml_collections.ConfigDict()  # builder options (robust_gate.datasets)
  c.data.options.languages = ("en", "de", "fr", "es", "fi", "pl")  # domains
  c.data.options.examples_per_split = (4000, 2000, 2000)  # per language
  c.data.options.frequency_power = 0.5  # words sampled ∝ frequency ** power

  c.expert = ml_collections.ConfigDict()
  c.expert.d_model = 64  # width of each expert transformer
  c.expert.num_layers = 2  # transformer blocks
  c.expert.num_heads = 4  # attention heads
  c.expert.d_ff = 256  # MLP width
  c.expert.steps = 1200  # Adam steps (all experts at once)
  c.expert.lr = 3e-3  # Adam learning rate
  c.expert.per_domain = 32  # sequences per domain (= per expert) per step

  c.monolithic = ml_collections.ConfigDict()
  c.monolithic.steps = 1200  # steps of the expert-sized monolithic models
  c.monolithic.lr = 3e-3  # their Adam learning rate
  c.monolithic.per_domain = 32  # sequences per domain per step (K× an expert's batch)
  c.monolithic.dro_dual_lr = 0.5  # group-DRO dual step size η (its dual sees the
  # model's losses on validation's gate.dual_holdout part)

  c.monolithic_large = ml_collections.ConfigDict()  # about all experts' parameters
  c.monolithic_large.d_model = 128
  c.monolithic_large.num_layers = 4
  c.monolithic_large.num_heads = 4
  c.monolithic_large.d_ff = 512
  c.monolithic_large.steps = 400  # fewer steps: each costs ~6× (see BUILD_NOTES.md)
  c.monolithic_large.lr = 1e-3
  # Sequences per domain per step; None: monolithic.per_domain (the same batch).
  c.monolithic_large.per_domain = ml_collections.config_dict.placeholder(int)

  c.gate = ml_collections.ConfigDict()
  c.gate.hidden = 32  # gate MLP width
  c.gate.token_embed = 0  # gate token-embedding width (0: none; it memorizes words)
  c.gate.pos_embed = 8  # gate position-embedding width
  c.gate.steps = 1500  # primal-dual steps
  c.gate.lr = 3e-3  # Adam learning rate of the gate
  c.gate.dual_lr = 0.5  # mirror-ascent step size η of the robust gate
  c.gate.dual_timescale = 0.0  # τ > 0: η_t = η/√(1 + t/τ); 0: η constant (docs/math.md §9.1)
  c.gate.optimistic = 0  # 1: optimistic dual, optimistic Adam for every gate (docs/math.md §9.2)
  c.gate.dual_holdout = 0.5  # fraction of each domain's validation sequences held out
  # from every gate's fit; the dual players (robust gate, group DRO) see losses on it
  # (0: the robust gate's dual sees its training losses, DRO's its train losses)
  c.gate.per_domain = 64  # cached sequences per domain per step (fit and holdout alike)
  c.gate.ema_decay = 0.99  # EMA of w: the gate reported (0: the last iterate; BUILD_NOTES)

  c.distill = ml_collections.ConfigDict()
  c.distill.steps = 600  # student steps (teacher evaluated on the fly each step)
  c.distill.lr = 1e-3  # Adam learning rate of the student
  c.distill.per_domain = 16  # train sequences per domain per step
  # Domain weights of the distillation loss: "uniform", or "lam_bar" (the robust gate's
  # λ̄); chosen on validation (docs/math.md §5)
  c.distill.weights = "uniform"
  return c
