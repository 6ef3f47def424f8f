"""Pallas kernels: dense causal flash attention (GQA, window, sinks, segments), DeepSeek-V4 compressed
attention: CSA (window + top-k compressed entries), HCA (window + every visible compressed entry) and the
lightning indexer, and Memory Sparse Attention (document routing over a memory bank, attention over the
selected documents' pooled chunks and the own tokens). Each has a pure-JAX reference, a Triton (GPU) and a
Mosaic (TPU) lowering and a custom VJP whose backward is also a kernel; the decode kernels (flash-decoding of
the cached paths) have the references and both lowerings but are forward only. Everything public is importable
from here.

Files, by kind (the API file of a kind holds its reference and custom VJP; the others its lowerings):
  common.py                 shared helpers: lowering choice, input checks, padding, tile matmuls, window
                            starts, visible compressed entries, `BlockSizes` of the compressed kernels
  flash_attention.py        dense flash attention: API, reference, custom VJP, the Hopper dispatch rules
  flash_blocks.py           which key/row blocks a tile walks and which it sees whole (all lowerings)
  flash_gpu.py              Triton forward, dQ and dK/dV kernels
  flash_tpu.py              Mosaic TPU forward, dQ and dK/dV kernels
  flash_hopper_common.py    Mosaic GPU (Hopper) ring buffers, barriers and masks shared by its kernels
  flash_hopper_forward.py   Mosaic GPU forward (TMA + wgmma, warp-specialised)
  flash_hopper_backward.py  Mosaic GPU backward: dQ kernel and the entry point
  flash_hopper_dkv.py       Mosaic GPU dK/dV kernels
  compressed.py             CSA and HCA: API, references, one custom VJP for both
  compressed_gpu.py         Triton lowering of CSA and HCA
  compressed_tpu.py         Mosaic TPU lowering of CSA and HCA
  compressed_inverted.py    inverted index of CSA's top-k (entry -> tokens) for the atomic-free backward
  compressed_hopper.py      Mosaic GPU (Hopper) CSA and HCA forwards: TMA key blocks, per-row TMA gather, wgmma
  indexer.py                lightning indexer: API, reference, custom VJP, chunked and fused top-k
  indexer_gpu.py            Triton scores kernel and its backward
  indexer_topk_gpu.py       Triton fused top-k: selects while scoring (no scores written)
  indexer_tpu.py            Mosaic TPU scores kernel and its backward
  msa.py                    Memory Sparse Attention: routing (chunk scores, document top-k) and attention
                            over [memory; own]: API, references, custom VJPs
  msa_gpu.py                Triton routing kernel, attention forward, dQ and dK/dV kernels
  msa_tpu.py                Mosaic TPU routing kernel, attention forward, dQ and dK/dV kernels
  decode.py                 decode attention (flash-decoding, forward only): dense GQA over a full cache or
                            a ring, DeepSeek-V4 window + compressed entries, the indexer's decode top-k;
                            references, the split-combine step
  decode_gpu.py             Triton partial-softmax kernel of decode attention
  decode_tpu.py             Mosaic TPU partial-softmax kernel of decode attention
  grouped_matmul.py         grouped matmul of routed experts (ragged_dot semantics): API, reference, custom
                            VJP; GPU only (ragged_dot is native on TPU)
  grouped_matmul_gpu.py     Triton grouped matmul (forward and dx) and transposed grouped matmul (dw) kernels

Shapes follow the repo's one legend (DESIGN.md): B batch, T query tokens, S key tokens, N query heads,
K kv heads, G query heads per kv head, H head dim, C compressed entries, P chunk size; K also counts the
top-k slots of CSA's indices [B, T, K].
"""
from pallas_kernels.common import BlockSizes, gpu_compute_capability, resolve_lowering
from pallas_kernels.compressed import (csa_attention, csa_attention_reference, hca_attention,
                                       hca_attention_reference)
from pallas_kernels.decode import (DecodeBlockSizes, compressed_decode_attention,
                                   compressed_decode_attention_reference, decode_attention, decode_attention_reference,
                                   indexer_decode_topk, indexer_decode_topk_reference)
from pallas_kernels.flash_attention import (FlashBlockSizes, flash_attention, flash_attention_reference,
                                            hopper_kernel_runs_both_ways)
from pallas_kernels.grouped_matmul import GroupedMatmulBlockSizes, grouped_matmul, grouped_matmul_reference
from pallas_kernels.indexer import IndexerBlockSizes, indexer_scores, indexer_scores_reference, indexer_topk
from pallas_kernels.msa import (MsaBlockSizes, msa_attention, msa_attention_reference, msa_chunk_scores,
                                msa_chunk_scores_reference, msa_document_scores, msa_route)

__all__ = ["BlockSizes", "DecodeBlockSizes", "FlashBlockSizes", "IndexerBlockSizes", "compressed_decode_attention",
           "compressed_decode_attention_reference", "csa_attention", "csa_attention_reference", "decode_attention",
           "decode_attention_reference", "flash_attention", "flash_attention_reference", "gpu_compute_capability",
           "GroupedMatmulBlockSizes", "grouped_matmul", "grouped_matmul_reference", "hca_attention",
           "hca_attention_reference", "hopper_kernel_runs_both_ways", "indexer_scores", "indexer_scores_reference",
           "indexer_decode_topk", "indexer_decode_topk_reference", "indexer_topk", "MsaBlockSizes", "msa_attention",
           "msa_attention_reference", "msa_chunk_scores", "msa_chunk_scores_reference", "msa_document_scores",
           "msa_route", "resolve_lowering"]
