"""Shared paper settings: the reference implementation's hyper-parameters (docs/design.md).

Used by `flickr30k.py` and `coco.py`. The user supplies data and weight paths with overrides:
`--config.data.karpathy_json=... --config.data.image_root=...
--config.encoder.pretrained_path=<HF clip-vit-large-patch14-336 dir>
--config.t5.pretrained_path=<HF t5-base dir> --config.data.pseudo_queries=<JSON lines>`.
The text tokenizer is the T5 directory's `spiece.model` (never trained;
`--config.text_tokenizer.model_path` names another). A pipeline run without any of these
stops before any work with one line per missing path (`required_inputs`).
"""

from configs import base

# Hugging Face T5 v1.0 shapes (vocab 32128, ReLU, tied embeddings).
T5_SIZES = {
  "t5-small": dict(
    d_model=512, d_kv=64, d_ff=2048, num_heads=8, num_encoder_layers=6, num_decoder_layers=6
  ),
  "t5-base": dict(
    d_model=768, d_kv=64, d_ff=3072, num_heads=12, num_encoder_layers=12, num_decoder_layers=12
  ),
  "t5-large": dict(
    d_model=1024, d_kv=64, d_ff=4096, num_heads=16, num_encoder_layers=24, num_decoder_layers=24
  ),
}

# CLIP ViT-L/14-336 (768-d projected features).
CLIP_VIT_L14_336 = dict(
  image_size=336,
  patch_size=14,
  vision_width=1024,
  vision_layers=24,
  vision_heads=16,
  vision_mlp_dim=4096,
  text_width=768,
  text_layers=12,
  text_heads=12,
  text_mlp_dim=3072,
  projection_dim=768,
  max_text_length=77,
)


def get_paper_config(dataset: str, t5_size: str):
  if t5_size not in T5_SIZES:
    raise ValueError(f"expected one of {sorted(T5_SIZES)}, got {t5_size!r}")
  c = base.get_base_config()
  # The paper's protocol: the generator (and the tokenizer) also train on pseudo queries of
  # the indexed images, given as --config.data.pseudo_queries=<JSON lines of image_id, query>.
  c.protocol = "transductive"
  c.required_inputs = (
    "data.karpathy_json",
    "data.image_root",
    "encoder.pretrained_path",
    "t5.pretrained_path",
    "data.pseudo_queries",
  )
  c.data.name = "karpathy"
  c.data.image_size = 336
  c.data.image_encoding = "jpeg"  # ~5x smaller than PNG for photos
  # The text tokenizer is T5's spiece.model (32000 pieces), read from t5.pretrained_path.
  c.text_tokenizer.max_length = 128  # source length <= 128 as the reference
  c.encoder.update(CLIP_VIT_L14_336)

  c.t5.update(T5_SIZES[t5_size])
  c.t5.vocab_size = 32128  # T5 v1.0 embedding rows (spiece 32000 + padding)
  c.t5.feed_forward = "relu"
  c.t5.tie_embeddings = True
  c.t5.dropout_rate = 0.2
  c.t5.dtype = "bfloat16"

  c.tokenizer.scheme = "avg"
  c.tokenizer.num_levels = 4
  c.tokenizer.codebook_size = 1024
  c.tokenizer.shared_codebook = True
  c.tokenizer.e_dim = c.t5.d_model  # the codebook initialises the voken embeddings
  c.tokenizer.hidden_dims = (1024, 512)
  c.tokenizer.dropout = 0.25
  c.tokenizer.beta = 0.25
  c.tokenizer.learning_rate = 1e-4
  c.tokenizer.weight_decay = 0.0
  c.tokenizer.batch_size = 2048
  c.tokenizer.align_loss = "mse"
  c.tokenizer.align_weight = 1.0
  c.tokenizer.last_layer_batchnorm = True  # the reference's MLP: BatchNorm after every Linear
  c.tokenizer.kmeans_iters = 100  # sklearn's default, as the reference's k-means
  c.tokenizer.fit_on_pseudo_queries = True  # train pairs + indexed images' pseudo-query pairs

  c.train.learning_rate = 1e-3
  c.train.warmup_fraction = 0.1
  c.train.batch_size = 128  # the reference's effective batch on Flickr30K
  c.train.temperature = 0.5  # the reference's T5 script divides logits by 0.5
  c.train.grad_clip_norm = 0.0  # the reference does not clip

  c.rank.batch_size = 128
  c.rank.learning_rate = 1e-4
  c.rank.rank_weight = 0.5
  c.rank.beam_size = 10
  c.decode.beam_size = 10
  c.decode.top_k = 10
  c.decode.mask_mode = "after_softmax"
  c.mesh.data = -1
  return c
