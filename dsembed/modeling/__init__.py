"""The embedding model: backbone loading, attention mode, layer taps, pooling heads, EmbeddingModel.

Level 2: imports torch, transformers and (lazily) peft; never deepspeed.
"""
from dsembed.modeling.attention import BIDIRECTIONAL_ARCHITECTURES, attention_mode, set_attention_mode
from dsembed.modeling.backbone import decoder_layers, final_norm, load_backbone, num_decoder_layers
from dsembed.modeling.layers import LayerTaps, masked_mean
from dsembed.modeling.model import EmbeddingModel, build_model
from dsembed.modeling.pooling import Pooler, build_pooler, count_head_parameters

__all__ = [
    "BIDIRECTIONAL_ARCHITECTURES", "EmbeddingModel", "LayerTaps", "Pooler", "attention_mode", "build_model",
    "build_pooler", "count_head_parameters", "decoder_layers", "final_norm", "load_backbone", "masked_mean",
    "num_decoder_layers", "set_attention_mode",
]
