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
