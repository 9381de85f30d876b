"""Every default of every t5x_like job, in one place: `get_config()`.

Recipes (`configs/pretrain_tiny.py`, ...) start from it (through `configs/base.py`) and override
a few values; the command line overrides any key:
`--config=configs/pretrain_tiny.py --config.optimizer.lr=3e-4`. Unknown keys and values of the
wrong type are errors before any compute. The resolved config is written to
`<workdir>/config.json`. README.md ("Config keys") explains each section. `hf import` builds a
complete config from it too, so the library never reads configs/.

Kept free of JAX (ml_collections only): config.py and model.py both read LATER_KEYS.
"""

import ml_collections

# Model keys added after the first runs were written, with the values that give the original
# model: a config.json without them (an older run) reads as these (load_json, model.Transformer).
LATER_MODEL_KEYS = {
    "unpadded_vocab_size": 0, "attn_qkv_bias": False, "attn_out_bias": False, "mlp_bias": False,
    "rope_scaling": "none", "rope_scaling_factor": 1.0, "rope_low_freq_factor": 1.0,
    "rope_high_freq_factor": 4.0, "rope_original_max_len": 8192, "reward_head": False,
    "attention_impl": "einsum", "attention_block": 128, "loss_chunk": 128,
    "qk_norm": False, "post_norms": False, "norm_plus_one": False, "mlp_activation": "silu",
    "embed_scale": False, "query_pre_attn_scalar": 0.0, "attn_logit_softcap": 0.0,
    "final_logit_softcap": 0.0, "sliding_window": 0, "global_every": 0, "rope_local_theta": 0.0,
    "num_experts": 0, "experts_per_token": 2, "moe_mlp_dim": 0, "moe_every": 1,
    "dense_layers": "", "num_shared_experts": 0, "router_norm_topk": True,
    "moe_capacity_factor": 0.0, "moe_aux_loss_weight": 0.01, "router_z_loss_weight": 0.001,
}
# The same for other sections: section -> {key: the value that gives the original behaviour}.
LATER_KEYS = {"model": LATER_MODEL_KEYS, "dpo": {"rpo_alpha": 0.0}}


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.task = "pretrain"  # pretrain | sft | reward | dpo | rl (training/tasks/)
    cfg.seed = 0  # model init, data order and dropout all derive from it
    cfg.steps = 1000  # optimizer steps in total (a rerun resumes until it reaches them)
    cfg.log_every_steps = 20  # train metrics to metrics.jsonl / TensorBoard / progress bar
    # Start from another run's parameters (fresh optimizer, step 0): a workdir, an exported or
    # imported model directory, or one checkpoint (<workdir>/checkpoints/<step>). Its tokenizer
    # comes along. Ignored when this workdir already has checkpoints (the run resumes instead).
    cfg.init_from = ""
    # With init_from: take the parameter-defining model keys (sizes, vocab, RoPE...) from it,
    # logging each one that the recipe had differently; otherwise a mismatch is an error.
    cfg.model_from_init = False
    # Peak FLOP/s of one device for MFU; 0 = look it up from the device kind (TPU/GPU table in
    # flops.py). CPUs have no entry: set it to the measured matmul rate to get MFU there.
    cfg.peak_tflops_per_device = 0.0

    cfg.model = ml_collections.ConfigDict()
    cfg.model.vocab_size = 0  # 0 = the tokenizer's size rounded up to vocab_multiple
    cfg.model.vocab_multiple = 128  # padding keeps the vocab divisible by mesh axes and fast
    cfg.model.hidden_dim = 256
    cfg.model.num_layers = 4
    cfg.model.num_heads = 4
    cfg.model.num_kv_heads = 4  # < num_heads gives grouped-query attention
    cfg.model.head_dim = 0  # 0 = hidden_dim // num_heads
    cfg.model.mlp_dim = 704  # SwiGLU hidden size
    cfg.model.max_len = 256  # sequence length of training examples (and the RoPE range used)
    cfg.model.rope_theta = 10000.0
    # RoPE scaling for long contexts, as in HF transformers: none | linear (frequencies / factor)
    # | llama3 (Llama 3.1: long wavelengths / factor, short ones kept, blended between).
    cfg.model.rope_scaling = "none"
    cfg.model.rope_scaling_factor = 1.0  # linear and llama3
    cfg.model.rope_low_freq_factor = 1.0  # llama3 only
    cfg.model.rope_high_freq_factor = 4.0  # llama3 only
    cfg.model.rope_original_max_len = 8192  # llama3 only: the context length of pretraining
    cfg.model.norm_eps = 1e-5
    cfg.model.tie_embeddings = False
    # Biases (off in Llama; Qwen2 has them on q/k/v). Set by `t5x_like.hf import` from the model.
    cfg.model.attn_qkv_bias = False  # on the query, key and value projections
    cfg.model.attn_out_bias = False  # on the attention output projection
    cfg.model.mlp_bias = False  # on the three SwiGLU projections
    # Architecture switches of the open families (model.py's docstring), all off: Llama. Set by
    # `t5x_like.hf import` (Qwen3: qk_norm; Gemma 2: all but qk_norm and rope_local_theta, with
    # global_every 2; Gemma 3: all but the softcaps, global_every 6; Mistral: sliding_window).
    cfg.model.qk_norm = False  # RMSNorm over each query and key head before RoPE
    cfg.model.post_norms = False  # RMSNorm also on the attention and MLP outputs (Gemma)
    cfg.model.norm_plus_one = False  # RMSNorm scales by (1 + w), w starting at 0 (Gemma)
    cfg.model.mlp_activation = "silu"  # silu (SwiGLU) | gelu_tanh (GeGLU, tanh GELU: Gemma)
    cfg.model.embed_scale = False  # embeddings times sqrt(hidden_dim) (Gemma)
    cfg.model.query_pre_attn_scalar = 0.0  # scores scaled by its ** -0.5; 0 = head_dim's
    cfg.model.attn_logit_softcap = 0.0  # scores -> cap * tanh(scores / cap); 0 = off
    cfg.model.final_logit_softcap = 0.0  # the same on the output logits; 0 = off
    # Local layers attend to the sliding_window most recent keys only (0 = none, every layer
    # global); global_every n: layers with (i + 1) % n == 0 stay global (0 = all local).
    cfg.model.sliding_window = 0
    cfg.model.global_every = 0
    cfg.model.rope_local_theta = 0.0  # > 0: local layers' RoPE base, unscaled (Gemma 3)
    # Rows of vocab_size a tokenizer can produce; the logits of the padding rows above are masked
    # (never predicted or sampled). 0 = none masked. Set by `t5x_like.hf import`.
    cfg.model.unpadded_vocab_size = 0
    # A scalar head on the last reply token (task=reward only); its other parameters may come
    # from a chat model (init_from), the head starts at zero.
    cfg.model.reward_head = False
    cfg.model.dropout = 0.0  # on embeddings and on each residual branch
    cfg.model.dtype = "float32"  # compute dtype: float32 or bfloat16 (params stay float32)
    cfg.model.param_dtype = "float32"
    cfg.model.scan_layers = True  # compile one layer and scan it: compile time flat in depth
    cfg.model.remat = "none"  # none | full | dots | dots_no_batch (what the backward recomputes)
    # einsum: ours, in plain XLA ops, causal blocks of attention_block queries (0 = one block);
    # dot_product_attention: jax.nn.dot_product_attention, cuDNN flash attention on a GPU when
    # the dtype is bfloat16, XLA elsewhere; chunked: ours in tiles of attention_block queries x
    # keys, online softmax, FlashAttention-style backward, masked tiles skipped (memory linear
    # in the context: configs/llama_1b_long.py). All compute the same; none changes parameters.
    cfg.model.attention_impl = "einsum"
    cfg.model.attention_block = 128
    # Positions per chunk of the output layer + loss (0 = all at once): the [B, T, V] float32
    # logits never exist whole, only [B, loss_chunk, V] (losses.chunked_loss); same result,
    # less memory, and on CPU a little faster too (BENCHMARKS.md, "Chunked cross-entropy").
    cfg.model.loss_chunk = 128
    # Mixture of experts (model.py, "Mixture of experts"); 0 experts = a dense model. Set by
    # `t5x_like.hf import` for Mixtral and Qwen3-MoE; configs/moe_small.py trains one.
    cfg.model.num_experts = 0  # experts per MoE layer
    cfg.model.experts_per_token = 2  # top-k routing
    cfg.model.moe_mlp_dim = 0  # each expert's SwiGLU width; 0 = mlp_dim
    cfg.model.moe_every = 1  # layer i is MoE when (i + 1) % moe_every == 0 ...
    cfg.model.dense_layers = ""  # ... and i is not listed here ("0,1": dense first layers)
    cfg.model.num_shared_experts = 0  # always-on experts (one MLP of this many experts' width)
    cfg.model.router_norm_topk = True  # renormalize the top-k probabilities to sum to 1
    # 0 = dropless (sorted tokens, grouped matmuls); c > 0: each expert takes at most
    # c * tokens * k / E of a device's token copies, the rest dropped (metric moe_dropped).
    cfg.model.moe_capacity_factor = 0.0
    cfg.model.moe_aux_loss_weight = 0.01  # load-balancing loss (metric moe_load_balance)
    cfg.model.router_z_loss_weight = 0.001  # router z-loss (metric moe_router_z)

    cfg.optimizer = ml_collections.ConfigDict()
    cfg.optimizer.lr = 3e-3  # peak learning rate
    cfg.optimizer.schedule = "cosine"  # cosine | linear | constant (after warmup)
    cfg.optimizer.warmup_steps = 100
    cfg.optimizer.min_lr_ratio = 0.1  # final lr = lr * min_lr_ratio
    cfg.optimizer.b1 = 0.9
    cfg.optimizer.b2 = 0.95
    cfg.optimizer.eps = 1e-8
    cfg.optimizer.weight_decay = 0.1  # decoupled (AdamW); never applied to norms or biases
    cfg.optimizer.grad_clip = 1.0  # global-norm clipping; 0 = off
    cfg.optimizer.grad_accum_steps = 1  # micro-batches per step (same result, less memory)
    cfg.optimizer.z_loss = 0.0  # weight of log(Z)^2, keeps the softmax normalizer near 0
    # A step whose gradients are not finite (NaN/Inf) is never applied; then either go on
    # ("skip", counted as nonfinite_steps in metrics) or stop the run with a message ("stop").
    cfg.optimizer.on_nonfinite = "stop"

    cfg.data = ml_collections.ConfigDict()
    # synthetic:arithmetic | text:<path or glob> | jsonl:<path>:<field> | alpaca:<path>
    # | chat:<path>[:<field>] | sgd:<path> | preference:<path>
    # | tfds:<name>[/<config>][:<version>] | prepared:<dir>   (data_pipelines/sources.py)
    cfg.data.source = "synthetic:arithmetic"
    cfg.data.batch_size = 16  # global batch, in sequences of model.max_len tokens
    cfg.data.packing = True  # pack documents into sequences (segment ids keep them apart)
    cfg.data.cache_dir = ""  # where sources are prepared (TFDS + tokenizer); "" = <workdir>/data
    cfg.data.validation_fraction = 0.05  # share of records held out (by a hash of the text)
    cfg.data.text_unit = "paragraph"  # text: sources: line | paragraph | file
    cfg.data.min_doc_chars = 1000  # text: merge consecutive units into documents this long
    cfg.data.synthetic_docs = 20000  # synthetic: documents generated for the train split
    cfg.data.tfds_data_dir = ""  # tfds: sources: data_dir of the TFDS dataset ("" = default)
    cfg.data.text_field = "text"  # tfds: sources: the feature holding the text
    cfg.data.train_split = "train"
    cfg.data.eval_split = "validation"
    cfg.data.tokenizer = ""  # a SentencePiece .model to use; "" = train one on the train split
    cfg.data.tokenizer_type = "bpe"  # bpe | unigram
    cfg.data.vocab_size = 2048  # size of a trained tokenizer (fewer pieces if the text is small)
    cfg.data.tokenizer_max_chars = 50_000_000  # train the tokenizer on at most this much text
    cfg.data.worker_count = 0  # grain worker processes for tokenizing and packing; 0 = in-process
    # Several sources in one preparation (then data.source is not used): recipes add entries
    # cfg.data.sources.<name> = ConfigDict({"source": "<spec>", "weight": 1.0}); names are
    # lower_case, processed in name order (on a duplicate the earlier source's copy is kept).
    # Weights: share of training records drawn from each, relative to the other sources of the
    # same kind (pretraining mixes the text sources); 0 = prepared but not trained on.
    cfg.data.sources = ml_collections.ConfigDict()
    # Training-time weights overriding the prepared ones, "name=weight,..."; "" = as prepared.
    cfg.data.mixture = ""
    cfg.data.on_bad_record = "error"  # error | skip (skipped records are counted in the report)
    cfg.data.num_workers = 0  # prepare: processes cleaning and hashing records; 0 = in-process
    cfg.data.runner = "local"  # prepare: local | beam (Apache Beam inside the TFDS builder)
    # runner=beam: Beam pipeline flags, e.g. "--runner=DataflowRunner --project=... --region=..."
    cfg.data.beam_options = "--runner=DirectRunner"
    cfg.data.report = True  # prepare: write report.md / report.json / plots next to the data
    cfg.data.character_coverage = 0.9995  # tokenizer: rarer characters go through byte fallback
    cfg.data.special_tokens = ""  # tokenizer: extra single-piece symbols, comma-separated

    # Cleaning stages and filters (data_pipelines/clean.py); each is counted in the report.
    cfg.data.clean = ml_collections.ConfigDict()
    cfg.data.clean.html = True  # strip HTML/XML markup from text records that contain tags
    cfg.data.clean.fix_text = True  # ftfy: mojibake, control characters, terminal escapes
    cfg.data.clean.unicode = "NFC"  # Unicode normalization: NFC | NFKC | "" (off)
    cfg.data.clean.whitespace = True  # odd spaces, zero-widths, trailing spaces, blank-line runs
    cfg.data.clean.boilerplate = True  # drop short web-furniture lines (cookies, "click here")
    cfg.data.clean.repair_utf8 = False  # read invalid UTF-8 bytes as Windows-1252 (else bad record)
    # Non-LM uses only (they remove what a language model must learn): off by default.
    cfg.data.clean.lowercase = False
    cfg.data.clean.stopwords = ""  # a language code ("en") drops its stop words; "" = off
    cfg.data.clean.min_chars = 0  # drop records shorter than this (0 = no limit)
    cfg.data.clean.max_chars = 0  # drop records longer than this (0 = no limit)
    cfg.data.clean.min_tokens = 0  # drop records with fewer tokens (0 = no limit)
    cfg.data.clean.max_tokens = 0  # drop records with more tokens (0 = no limit)
    # Repetition (Gopher-style), per message: share of characters in repeated lines, and share
    # of words in repeated word n-grams (n = dup_ngram), above which a record is dropped; 1 = off.
    cfg.data.clean.max_dup_line_fraction = 0.5
    cfg.data.clean.max_dup_ngram_fraction = 0.3
    cfg.data.clean.dup_ngram = 10
    # Text sources: a line found in more than this share of a source's documents (and in 10 or
    # more) is site furniture ("Home | About | Contact") and is removed from all; 1 = off (code).
    cfg.data.clean.repeated_line_fraction = 0.3
    # Text records longer than this many characters are split into pieces at paragraph, line,
    # sentence or word boundaries (0 = no limit; data.clean.max_chars drops them instead).
    cfg.data.clean.max_doc_chars = 100_000

    # Deduplication across all sources (data_pipelines/dedup.py).
    cfg.data.dedup = ml_collections.ConfigDict()
    cfg.data.dedup.exact = True  # same text after normalization (case, punctuation, spaces)
    cfg.data.dedup.near = True  # MinHash + LSH near-duplicates (datasketch)
    # With near off: still drop train records that nearly duplicate a validation record.
    cfg.data.dedup.decontaminate = True
    cfg.data.dedup.threshold = 0.8  # estimated Jaccard similarity of word n-gram sets
    cfg.data.dedup.num_perm = 128  # MinHash permutations (more = sharper, slower)
    cfg.data.dedup.ngram = 5  # words per shingle
    cfg.data.dedup.seed = 1  # MinHash permutations; the same seed gives the same output
    # SFT (chat data): which tokens the loss learns (data_pipelines/chat_template.py):
    # assistant (every assistant turn) | last_assistant | all
    cfg.data.loss_on = "assistant"
    # SFT: a conversation longer than model.max_len: truncate (whole messages) | drop | split
    cfg.data.on_long = "truncate"
    # The chat template (data_pipelines/chat_template.py): auto (the model's own when the
    # tokenizer's folder has one, else project) | project | model | a .jinja file. The run's
    # config.json records project or model; a model template is kept in chat_template.json.
    cfg.data.chat_template = "auto"
    # Logical shards of the training data (t5x_like/training/batches.py); the data order depends
    # on this, not on the process count, so a run resumes identically on any process count
    # dividing it. 0 = one shard per process.
    cfg.data.num_shards = 0

    cfg.mesh = ml_collections.ConfigDict()
    # Device mesh axes; -1 = all remaining devices. Batch shards over data x fsdp x expert,
    # parameters over fsdp and tensor, experts over expert, the sequence over sequence (see
    # t5x_like/modeling/partitioning.py for the rules table; README "Choosing axis sizes").
    cfg.mesh.data = -1
    cfg.mesh.fsdp = 1
    cfg.mesh.expert = 1  # expert parallelism (MoE models); data-parallel for the rest
    cfg.mesh.sequence = 1  # context parallelism: must divide model.max_len
    cfg.mesh.tensor = 1
    # Overrides of the logical-axis rules table, e.g. "embed=none,mlp=tensor+fsdp" (see
    # partitioning.RULES for the names); "" = the table as it is.
    cfg.mesh.rules = ""

    cfg.distributed = ml_collections.ConfigDict()
    # JAX multi-controller runtime (jax.distributed): several processes, one program. Leave
    # empty on TPU VMs and under SLURM (detected); set all three for other clusters.
    cfg.distributed.coordinator_address = ""  # host:port of process 0
    cfg.distributed.num_processes = 0
    cfg.distributed.process_id = -1
    cfg.distributed.initialization_timeout = 300  # seconds to wait for every process to join

    cfg.checkpoint = ml_collections.ConfigDict()
    cfg.checkpoint.every_steps = 500  # also saved at the last step
    cfg.checkpoint.max_to_keep = 3
    cfg.checkpoint.async_save = True  # write in the background while training continues
    # On SIGTERM (what TPU/GKE/SLURM send before preempting): save at the current step, wait for
    # it to commit, exit cleanly. Rerunning the same command resumes from there.
    cfg.checkpoint.save_on_preemption = True
    # Besides the last max_to_keep, keep the keep_best checkpoints with the best validation
    # metric keep_best_by ("" = off), e.g. "loss" with best_mode "min".
    cfg.checkpoint.keep_best_by = ""
    cfg.checkpoint.keep_best = 1
    cfg.checkpoint.best_mode = "min"  # min | max

    # Parameter-efficient fine-tuning of the init_from model (t5x_like/modeling/peft.py): only LoRA
    # adapters and/or the parameters named in `trainable` learn and get optimizer state; the
    # base stays frozen, and checkpoints hold only what learns (plus base.json naming the base).
    cfg.peft = ml_collections.ConfigDict()
    cfg.peft.method = "none"  # none | lora
    cfg.peft.rank = 8  # LoRA rank r
    cfg.peft.alpha = 16.0  # LoRA scale alpha / r
    cfg.peft.dropout = 0.0  # dropout on the adapters' inputs (training only)
    # What LoRA adapts: q, k, v, o, gate, up, down, embed, head; groups attention, mlp, all;
    # or fnmatch patterns over those names or the parameter names (e.g. "w_*"). Comma-separated.
    cfg.peft.targets = "attention"
    # Base parameters trained in full (with or without LoRA): fnmatch patterns over parameter
    # paths, e.g. "lm_head,final_norm" or "layers/*norm"; "" = none.
    cfg.peft.trainable = ""
    cfg.peft.trainable_layers = 0  # also train the last N transformer layers in full
    cfg.peft.base_dtype = ""  # dtype the frozen base is kept in; "" = model.param_dtype

    # task=dpo: Direct Preference Optimization on (prompt, chosen, rejected) pairs against a
    # frozen reference (the init_from model), t5x_like/training/preference_losses.py.
    cfg.dpo = ml_collections.ConfigDict()
    cfg.dpo.beta = 0.1  # strength of the pull to the reference (larger = stays closer)
    cfg.dpo.loss = "sigmoid"  # sigmoid (DPO) | ipo (squared loss to a 1/(2 beta) margin)
    cfg.dpo.label_smoothing = 0.0  # sigmoid: > 0 is conservative DPO (pairs wrong this often)
    cfg.dpo.rpo_alpha = 0.0  # > 0 adds this times the chosen reply's per-token NLL (RPO)

    # task=rl: online RL (GRPO-style group-relative policy gradient), t5x_like/training/rl.py.
    # Each step samples rl.group_size replies to each of data.batch_size prompts with the KV-cache
    # decoder.
    cfg.rl = ml_collections.ConfigDict()
    cfg.rl.group_size = 8  # replies per prompt; advantages are relative to the group's mean
    cfg.rl.temperature = 1.0  # sampling temperature of the replies
    cfg.rl.top_p = 1.0  # nucleus sampling of the replies (1 = off)
    cfg.rl.max_new_tokens = 16  # reply length limit
    cfg.rl.kl_coef = 0.05  # weight of KL(policy || reference) per reply token in the loss
    # exact_answer: 1 when the reply's first integer answers the demo question, else 0 (the
    # embedded arithmetic task) | model:<workdir>: the score of a trained reward model.
    cfg.rl.reward = "exact_answer"
    # Validation prompts decoded greedily at each evaluation (at most eval.steps batches of
    # eval.batch_size when eval.steps > 0).
    cfg.rl.eval_prompts = 200

    cfg.eval = ml_collections.ConfigDict()
    cfg.eval.every_steps = 500  # also run at the last step; 0 = only at the last step
    cfg.eval.steps = 20  # batches per evaluation; 0 = the whole validation split
    cfg.eval.batch_size = 0  # 0 = data.batch_size
    # Early stopping: stop when the validation metric early_stop_by ("" = off) has not improved
    # by more than min_delta for `patience` evaluations in a row.
    cfg.eval.early_stop_by = ""
    cfg.eval.early_stop_mode = "min"  # min | max
    cfg.eval.patience = 3
    cfg.eval.min_delta = 0.0

    # Locked: a recipe that assigns a key not defined above (`cfg.modle = 3`) stops on that line,
    # naming the closest key, instead of training with the typo saved in config.json. Recipes
    # add their sources under data.sources, so that one stays open; a recipe that really needs a
    # key of its own calls cfg.unlock() first.
    cfg.lock()
    cfg.data.sources.unlock()
    return cfg
