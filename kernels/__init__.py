"""Triton kernels for DeepSeek-V4's hot paths, each beside its torch reference (`*_ref`).

Modules: `moe` (fused routed experts), `fp8_gemm` (block-scaled FP8 linear), `sparse_attn`
(window + compressed-entry attention over the paged cache), `indexer` (lightning-indexer top-k),
`compressor` (the compressor's per-block softmax accumulators), `mhc` (hyper-connection mixing), `quant` (weight formats).
Each op has one dispatcher that picks Triton by the tensors' device. Nothing is imported here:
triton is optional and is only imported when a Triton path runs.
"""
