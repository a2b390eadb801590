"""The full set of config fields with their defaults; every other config starts from here.

Each stage reads its own section. Sizes differ between configs (`smoke`, `flickr30k`, `coco`)
only through values set here or in those files, never through code branches.
Sections: seed, protocol, required_inputs, mesh, partitioning, distributed, data, loader,
text_tokenizer, encoder, encoder_train, tokenizer, t5, train, rank, decode, evaluate, export,
bench.
"""

import ml_collections

from avg_jax import partitioning


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # "transductive" (the paper's): the tokenizer and the generator also see pseudo queries of
  # the indexed (val / test) images; "inductive": indexed images are never seen in training.
  # `evaluate` reports both (evaluate.protocols); the other stages run this one.
  c.protocol = "transductive"
  # Keys of the input paths a pipeline run cannot do without (avg_jax/stages/inputs.py):
  # `avg-jax run` / a stage checks them before any work and names every missing one.
  c.required_inputs = ()

  # --- Devices -------------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  # Logical axis name -> mesh axes, first match wins (avg_jax/partitioning.py); e.g.
  # --config.partitioning.rules="(('batch', 'data'), ('embed', None), ...)" to stop fsdp.
  c.partitioning = ml_collections.ConfigDict(dict(rules=partitioning.LOGICAL_RULES))
  c.distributed = ml_collections.ConfigDict(
    dict(
      enabled="auto",  # "auto" | True | False (see partitioning.maybe_initialize_distributed)
      coordinator_address="",  # host:port; empty lets jax discover it (TPU pods)
      num_processes=1,
      process_id=0,
      cpu_collectives="",  # "gloo" for multi-process CPU runs
    )
  )

  # --- Data ------------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict(
    dict(
      name="avg_shapes",  # "avg_shapes" (embedded, generated) | "karpathy" | "emoji"
      # avg_shapes
      num_train=2000,
      num_val=200,
      num_test=500,
      image_size=64,
      generator_seed=0,
      # karpathy (Flickr30K / MS-COCO split JSON + image folder, local paths)
      karpathy_json="",
      image_root="",
      skip_bad_images=False,  # missing/corrupt images: error (False) or skip and report (True)
      # emoji (avg_jax/data/emoji.py, configs/emoji.py): Noto emoji pictures with Unicode /
      # CLDR names from pinned npm packages, fetched with npm into this folder (shared by every
      # workdir; packages already there are not fetched again).
      download_dir="~/.cache/avg-jax",
      captions_per_image=5,  # evaluation protocol keeps the first 5 captions
      # Pseudo queries (avg_jax/data/pseudo_queries.py): karpathy: a JSON-lines file of
      # {"image_id", "query"} for any image (empty: none); avg_shapes: generated, this many
      # per image of every split.
      pseudo_queries="",
      pseudo_queries_per_image=5,
      # Stored images are image_size x image_size (karpathy: shorter side resized, centre crop),
      # encoded as "png" (lossless) or "jpeg" (about 5x smaller for photos).
      image_encoding="png",
      jpeg_quality=95,
      # prepare: input images per shard, the unit of work that processes share (process p
      # of n writes shards p, p+n, ...) and that a rerun skips when already written. Shard
      # boundaries depend on this and the data only (not on the process count); it changes
      # the file layout, not the records, so it is not part of the prepared data's identity.
      # A multiple of 256 suits avg_shapes, which generates scenes 256 at a time.
      examples_per_shard=1024,
    )
  )
  c.loader = ml_collections.ConfigDict(
    dict(
      worker_count=0,  # grain worker processes
      worker_buffer_size=2,
      shuffle_seed=0,
      read_threads=8,  # threads reading/decoding batches in each process
      prefetch_buffer_size=16,  # batches read ahead by those threads
    )
  )
  c.text_tokenizer = ml_collections.ConfigDict(
    dict(
      # A SentencePiece .model; empty: t5.pretrained_path's spiece.model when a pretrained T5
      # is given, else one trained on the captions (avg_jax/data/prepared.py).
      model_path="",
      vocab_size=1000,  # when training one
      max_length=32,  # source length in tokens (the paper: <= 128)
      model_type="unigram",  # when training one: "unigram" (as T5's) | "bpe"
    )
  )

  # --- Dual encoder (CLIP) ---------------------------------------------------------------------
  c.encoder = ml_collections.ConfigDict(
    dict(
      pretrained_path="",  # Hugging Face CLIP dir (config.json + model.safetensors); empty: train
      image_size=64,
      patch_size=8,
      vision_width=128,
      vision_layers=2,
      vision_heads=4,
      vision_mlp_dim=512,
      text_width=128,
      text_layers=2,
      text_heads=4,
      text_mlp_dim=512,
      projection_dim=128,
      max_text_length=32,
      dtype="float32",  # compute dtype: "float32" | "bfloat16" (parameters stay float32)
      remat=False,  # rematerialise transformer blocks in the backward pass
    )
  )
  c.encoder_train = ml_collections.ConfigDict(
    dict(
      steps=600,
      batch_size=128,  # global (all processes) image-caption pairs per step
      learning_rate=1e-3,
      warmup_steps=50,
      weight_decay=1e-4,
      init_temperature=0.07,
      embed_batch_size=256,  # batch for feature extraction
      # embed: images (with their captions) per shard of feature extraction, the unit of work
      # that processes share, each on its own devices with embed_batch_size rows per call,
      # and that a rerun skips when already written. Not part of the embed fingerprint.
      embed_images_per_shard=8192,
      log_every=50,
      checkpoint_every=200,  # train-state checkpoints (resume); removed once the encoder is saved
      query_batch_size=1024,  # two-tower evaluation: captions per search call
      retrieval_chunk_size=65536,  # images scored at once per device in brute-force search
    )
  )

  # --- Image tokenizer (RQ-VAE) ----------------------------------------------------------------
  c.tokenizer = ml_collections.ConfigDict(
    dict(
      scheme="avg",  # "avg" | "rq" | "hkmeans" | "atomic" | "random"
      num_levels=4,  # L
      codebook_size=1024,  # K
      shared_codebook=True,  # one codebook applied L times (reference) vs one per level
      e_dim=768,  # = t5.d_model (the codebook initialises the voken embeddings)
      hidden_dims=(1024, 512),
      dropout=0.25,
      beta=0.25,  # commitment weight
      quant_weight=1.0,
      recon_weight=1.0,
      align_weight=1.0,
      align_loss="mse",  # "mse" | "infonce"
      align_position="decoder",  # "decoder" (reference) | "latent"
      infonce_temperature=0.07,
      learning_rate=1e-4,
      weight_decay=0.0,
      batch_size=2048,
      steps=20000,
      kmeans_init=True,
      kmeans_iters=20,
      kmeans_init_method="kmeans++",  # "kmeans++" | "random" (seeding before Lloyd iterations)
      kmeans_init_batches=1,  # k-means on encoder outputs of this many first batches
      last_layer_batchnorm=False,  # BatchNorm after the MLPs' last Dense (LC-Rec MLPLayers: no)
      dead_code_restart=False,
      dead_code_after=100,  # steps unused before a codeword is restarted
      disambiguation=True,  # append a position that makes every image's id unique
      # within its index (each split; see avg_jax/tokenizer/ids.py)
      # Transductive protocol: fit the RQ-VAE on the training pairs plus the pseudo-query
      # pairs of the indexed images (the reference's default).
      fit_on_pseudo_queries=True,
      checkpoint_every=1000,
      keep_checkpoints=2,
      log_every=100,
      assign_batch_size=4096,  # images per batch when assigning identifiers
      analysis_split="test",  # split for the semantic measure (needs the prepared dataset)
      analysis_pairs=2000,  # image pairs sampled per prefix length for that measure
    )
  )

  # --- Token-to-voken T5 -----------------------------------------------------------------------
  c.t5 = ml_collections.ConfigDict(
    dict(
      pretrained_path="",  # Hugging Face T5 dir (config.json + model.safetensors); empty: scratch
      vocab_size=32128,  # text vocabulary (vokens are appended after it)
      d_model=768,
      d_kv=64,
      d_ff=3072,
      num_heads=12,
      num_encoder_layers=12,
      num_decoder_layers=12,
      relative_attention_num_buckets=32,
      relative_attention_max_distance=128,
      dropout_rate=0.2,
      feed_forward="relu",  # "relu" (T5 v1.0) | "gated-gelu" (T5 v1.1)
      tie_embeddings=True,  # v1.0 ties input/output embeddings (with d_model**-0.5 scaling)
      layer_norm_epsilon=1e-6,
      dtype="float32",  # compute dtype: "float32" | "bfloat16"
      param_dtype="float32",
      remat=False,
      scan_layers=False,
      voken_init="codebook",  # "codebook" | "random"
    )
  )

  # --- Generative training ---------------------------------------------------------------------
  c.train = ml_collections.ConfigDict(
    dict(
      steps=10000,
      batch_size=256,
      learning_rate=1e-3,
      warmup_fraction=0.1,
      end_learning_rate_fraction=0.0,
      weight_decay=0.0,
      grad_clip_norm=1.0,
      grad_accum_steps=1,
      temperature=1.0,  # logits / temperature in the cross-entropy (reference: 0.5 option)
      # Transductive protocol: each pseudo query of an indexed image appears this many times
      # per epoch (the training captions once).
      pseudo_query_repeats=1,
      # Also train on the training images' own pseudo queries (both protocols: they are never
      # queries). Off: they train the text tokenizer only (NOTES.md, issue 28).
      pseudo_queries_of_training_images=False,
      checkpoint_every=1000,
      keep_checkpoints=3,
      async_checkpointing=True,
      eval_every=1000,
      eval_max_queries=1000,
      log_every=50,
    )
  )

  # --- Learning-to-rank stage ------------------------------------------------------------------
  c.rank = ml_collections.ConfigDict(
    dict(
      steps=1000,
      batch_size=64,
      learning_rate=1e-4,
      warmup_fraction=0.1,
      rank_weight=0.5,
      beam_size=10,
      double_softmax=False,  # the reference's behaviour, for comparison only
      score_temperature=1.0,  # listwise softmax over scores / T
      # Drop negatives that differ from the positive only in the disambiguation position.
      skip_twin_negatives=False,
      checkpoint_every=500,
      eval_every=500,
    )
  )

  # --- Constrained beam search -----------------------------------------------------------------
  c.decode = ml_collections.ConfigDict(
    dict(
      beam_size=10,
      top_k=10,
      mask_mode="after_softmax",  # "after_softmax" (reference) | "renormalize"
      batch_size=32,
      dense_levels=1,  # trie levels stored as dense [node, token] tables
      # False (reference): log_softmax over the whole vocabulary. True: the output projection
      # and log_softmax cover EOS + voken rows only (cheaper; scores exclude text tokens'
      # probability mass, see avg_jax/decoding/search.py).
      voken_logits_only=False,
      # How images that share their semantic codes are ordered (avg_jax/decoding/search.py):
      # "learned": the generator scores the disambiguation position (it is trained on it;
      # sound only for indexes whose disambiguation it was trained on); "similarity": by the
      # dual encoder's query-image similarity; "image_id": by image id. The last two train the
      # generator on the semantic codes alone and search over them.
      tie_break="similarity",
      # avg_hybrid: None = plain AVG; a weight re-ranks the beam's images by log-prob +
      # weight x dual-encoder similarity (B dot products per query, independent of N).
      hybrid_weight=None,
      # Its query embedding: "dual_encoder" (the text tower, a second transformer pass per
      # query) or "generator" (a linear head on the generator's encoder, fitted in closed
      # form on the training captions; avg_jax/models/query_head.py).
      hybrid_query="dual_encoder",
      query_head_l2=0.01,  # ridge penalty of that head's fit
    )
  )

  # --- Evaluation ------------------------------------------------------------------------------
  c.evaluate = ml_collections.ConfigDict(
    dict(
      methods=("two_tower", "avg", "avg_ltr", "avg_hybrid", "rq", "hkmeans", "atomic"),
      protocols=("transductive", "inductive"),
      # The identifier-scheme ablations (rq, hkmeans, atomic, random) run under these protocols
      # only (each costs a tokenizer fit and a generator); avg / avg_ltr run under all.
      ablation_protocols=("transductive", "inductive"),
      recall_ks=(1, 5, 10),
      # avg_hybrid: fusion weights tried on the validation split (the best R@1 is kept).
      # Log-probs span a few nats and cosines [-1, 1], so useful weights reach the hundreds.
      hybrid_weights=(0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0),
      efficiency_sizes=(1000, 10000, 100000, 1000000),
      efficiency_queries=64,
      # Two-tower over a faiss HNSW index (avg_jax/evaluation/ann.py) at the same sizes: graph
      # degree, build-time and search-time candidate lists (each ef_search is a point of the
      # recall-vs-speed frontier; () skips HNSW). The efficiency table's HNSW row is the
      # fastest setting whose recall@k against exact search reaches ann_target_recall.
      ann_m=16,
      ann_ef_construction=64,
      ann_ef_search=(16, 32, 64, 128, 256),
      ann_target_recall=0.95,
      ann_max_items=0,  # HNSW only at efficiency sizes up to this (0: all)
    )
  )

  # --- Export ----------------------------------------------------------------------------------
  c.export = ml_collections.ConfigDict(
    dict(
      param_dtype="float32",  # "float32" | "bfloat16"
      index_splits=("test",),  # images the serving trie indexes
      batch_buckets=(1, 8, 32),
      max_query_chars=1000,
      thumbnail_size=256,  # longer side of the page's thumbnails in the export; 0: none
      # Serve avg_hybrid: decode.hybrid_weight, or else the weight `evaluate` chose on
      # validation; the export then carries the dual encoder and the images' embeddings.
      hybrid=False,
    )
  )

  # --- Ahead-of-time TPU compile checks (`avg-jax compile`, avg_jax/aot) ---------------------
  c.aot = ml_collections.ConfigDict(
    dict(
      steps=("tokenizer", "train", "rank", "search"),  # which step programs to compile
      index_size=0,  # images in the LTR trie (train split); 0: data.num_train
      disambiguation_size=8,  # D of the voken vocabulary (the real D depends on collisions)
      # MFU estimate: assumed step time = roofline time (max of FLOPs / peak and bytes / HBM
      # bandwidth) / this efficiency.
      roofline_efficiency=0.5,
    )
  )
  return c
