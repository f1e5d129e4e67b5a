"""Tensor names, defined once.

The specs (and through them the repository generator), the backends and the client SDK import
these names; nothing else spells them.
"""

# digits: the CNN trained on scikit-learn's 8x8 handwritten digits.
DIGITS_PIXELS = "pixels"
"""FP32 [batch, 1, 8, 8]: grey levels scaled to [0, 1] (scikit-learn's 0..16 divided by 16)."""
DIGITS_LOGITS = "logits"
"""FP32 [batch, 10]: unnormalized class scores for the digits 0-9."""

# resnet50: the standard ResNet-50 (seeded weights), the compute-heavy image workload.
RESNET50_IMAGES = "images"
"""FP32 [batch, 3, 224, 224]: RGB, scaled to [0, 1] and normalized with the ImageNet mean and std."""
RESNET50_LOGITS = "logits"
"""FP32 [batch, 1000]: unnormalized class scores."""

# text_encoder: a small BERT-style encoder; pooling happens in a postprocessing step.
TEXT_INPUT_IDS = "input_ids"
"""INT64 [batch, sequence]: WordPiece token ids, padded with the tokenizer's [PAD] id."""
TEXT_ATTENTION_MASK = "attention_mask"
"""INT64 [batch, sequence]: 1 for real tokens, 0 for padding."""
TEXT_TOKEN_EMBEDDINGS = "token_embeddings"
"""FP32 [batch, sequence, hidden]: the last layer's hidden states."""

# fraud: an MLP scoring transactions (trained on a synthetic data set).
FRAUD_FEATURES = "features"
"""FP32 [batch, features]: standardized transaction features, in the spec's order."""
FRAUD_PROBABILITY = "probability"
"""FP32 [batch, 1]: the probability that the transaction is fraudulent."""

# Pipelines: the ensembles clients call (the model folders' `pipeline.py` wire them) and their tensors.
IMAGE_CLASSIFIER = "image_classifier"
"""Ensemble: image file bytes -> kiln_image -> resnet50 -> kiln_classify -> top-k labels, scores."""
IMAGE_CLASSIFIER_INT8 = "image_classifier_int8"
"""The same pipeline on resnet50's INT8 variant."""
DIGITS_READER = "digits_reader"
"""Ensemble: a PNG/JPEG of a handwritten digit -> kiln_image -> digits -> kiln_classify."""
TEXT_EMBEDDER = "text_embedder"
"""Ensemble: UTF-8 text -> kiln_text -> text_encoder -> kiln_pool -> sentence embedding."""
FRAUD_SCORER = "fraud_scorer"
"""Ensemble: a transaction record -> kiln_tabular -> fraud -> kiln_threshold -> score, decision."""

IMAGE = "image"
"""BYTES [batch, 1]: an encoded image file (JPEG or PNG; grey, RGB or RGBA), one per item."""
LABELS = "labels"
"""BYTES [batch, k]: the k most likely classes' labels (UTF-8), most likely first."""
SCORES = "scores"
"""FP32 [batch, k]: their softmax probabilities, descending."""
CLASS_INDICES = "class_indices"
"""INT64 [batch, k]: their class indices."""
TEXT = "text"
"""BYTES [batch, 1]: a UTF-8 text, one per item."""
EMBEDDING = "embedding"
"""FP32 [batch, hidden]: the mask-mean-pooled, L2-normalized sentence embedding."""
RECORD = "record"
"""BYTES [batch, 1]: one transaction as a JSON object of named numeric features (raw units)."""
FEATURE_VALUES = "feature_values"
"""FP32 [batch, features]: the same features as numbers in the spec's order (raw units); the
alternative to RECORD (a request sends exactly one of the two)."""
SCORE = "score"
"""FP32 [batch, 1]: the fraud probability."""
DECISION = "decision"
"""BOOL [batch, 1]: whether the score reaches the spec's threshold."""

# Text generation (kiln_generate, decoupled: no batch dim; one request, a stream of responses).
# The names of Triton's own LLM backends, so its generate / generate_stream endpoints and tools
# built for them work unchanged.
TEXT_GENERATOR = "tinylm_generate"
"""Decoupled model: a prompt -> kiln_generate (tinylm, KV cache, continuous batching) -> text."""
TEXT_INPUT = "text_input"
"""BYTES [1]: the prompt (UTF-8)."""
MAX_TOKENS = "max_tokens"
"""INT32 [1], optional: most tokens to generate (default: the model's `default_max_tokens`)."""
TEMPERATURE = "temperature"
"""FP32 [1], optional: 0 is greedy; up to 2 (default 1)."""
TOP_K = "top_k"
"""INT32 [1], optional: sample among the k most likely tokens; 0 keeps all (default)."""
TOP_P = "top_p"
"""FP32 [1], optional: nucleus sampling, in (0, 1] (default 1)."""
SEED = "seed"
"""INT64 [1], optional: the same seed and prompt give the same text."""
STOP = "stop"
"""BYTES [n], optional: strings that end the text (not included)."""
STREAM = "stream"
"""BOOL [1], optional: one response per text delta (true) or one with the whole text (default)."""
TEXT_OUTPUT = "text_output"
"""BYTES [1]: the delta (streaming) or the whole text."""
FINISH_REASON = "finish_reason"
"""BYTES [1]: "" until the last response; then "stop" (end of sequence or a stop string),
"length" (max_tokens) or "cancelled"."""
PROMPT_TOKENS = "prompt_tokens"
"""INT32 [1]: tokens in the prompt."""
COMPLETION_TOKENS = "completion_tokens"
"""INT32 [1]: tokens generated so far."""
