"""Pallas kernels: dense causal flash attention (GQA, window, sinks, segments) and DeepSeek-V4 compressed
attention: CSA (window + top-k compressed entries), HCA (window + every visible compressed entry) and the
lightning indexer. Each has a pure-JAX reference, a Triton (GPU) and a Mosaic (TPU) lowering and a custom
VJP whose backward is also a kernel."""
from pallas_kernels.common import BlockSizes, resolve_lowering
from pallas_kernels.compressed import (csa_attention, csa_attention_reference, hca_attention,
                                       hca_attention_reference)
from pallas_kernels.flash_attention import FlashBlockSizes, flash_attention, flash_attention_reference
from pallas_kernels.indexer import (IndexerBlockSizes, indexer_scores, indexer_scores_reference, indexer_topk)

__all__ = ["BlockSizes", "FlashBlockSizes", "IndexerBlockSizes", "csa_attention", "csa_attention_reference",
           "flash_attention", "flash_attention_reference", "hca_attention", "hca_attention_reference",
           "indexer_scores", "indexer_scores_reference", "indexer_topk", "resolve_lowering"]
