"""One small example config per hf_vq quantizer class, with a matching input.

Contract tests (save/load, AutoModel, diffusers) run over all of them: a new quantizer class adds a line.
"""

import torch

# class name -> (config kwargs, input shape)
EXAMPLES = {
    "FSQ": (dict(levels=[8, 5, 5, 5], dim=16), (2, 16, 4, 4)),
    "FSQ_codebooks": (dict(levels=[5, 5, 3], num_codebooks=2), (2, 7, 6)),
    "LFQ": (dict(codebook_size=2**6), (2, 5, 6)),
    "LatentQuantize": (dict(levels=[5, 4, 3], dim=8), (2, 8, 4, 4)),
    "LatentQuantize_fixed": (dict(levels=4, codebook_dim=2, num_codebooks=2, optimize_values=False), (2, 5, 4)),
    "VectorQuantize": (dict(dim=8, codebook_size=16, decay=0.9, threshold_ema_dead_code=1), (2, 10, 8)),
    "VectorQuantize_cosine": (dict(dim=8, codebook_size=16, use_cosine_sim=True, codebook_dim=4), (2, 10, 8)),
    "VectorQuantize_heads_kmeans": (dict(dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True,
                                         kmeans_init=True), (2, 10, 8)),
    "VectorQuantizer": (dict(n_e=16, e_dim=4, beta=0.25, log_perplexity=True), (2, 4, 3, 3)),
    "VectorQuantizer2": (dict(n_e=16, e_dim=4, beta=0.25, sane_index_shape=True), (2, 4, 3, 3)),
    "EMAVectorQuantizer": (dict(n_embed=16, embedding_dim=4, beta=0.25), (2, 4, 3, 3)),
    "GumbelQuantizer": (dict(num_hiddens=8, embedding_dim=4, n_embed=16), (2, 8, 3, 3)),
    "GumbelQuantize": (dict(num_hiddens=8, embedding_dim=4, n_embed=16), (2, 8, 3, 3)),
    "VectorQuantizerWithInputProjection": (dict(input_dim=8, n_codes=16, codebook_dim=4, output_dim=8),
                                           (2, 8, 2, 3, 3)),
    "ResidualVQ": (dict(dim=8, num_quantizers=3, codebook_size=16, decay=0.9), (2, 10, 8)),
    "ResidualVQ_projection": (dict(dim=8, num_quantizers=2, codebook_size=16, codebook_dim=4), (2, 10, 8)),
    "ResidualVQ_shared": (dict(dim=8, num_quantizers=3, codebook_size=16, shared_codebook=True), (2, 10, 8)),
    "ResidualFSQ": (dict(levels=[5, 5, 3], num_quantizers=2, dim=8), (2, 10, 8)),
    "ResidualLFQ": (dict(dim=8, num_quantizers=2, codebook_size=2**4), (2, 10, 8)),
    "GroupedResidualVQ": (dict(dim=8, groups=2, num_quantizers=2, codebook_size=16), (2, 10, 8)),
    "GroupedResidualFSQ": (dict(dim=8, groups=2, levels=[5, 3], num_quantizers=2), (2, 10, 8)),
    "GroupedResidualLFQ": (dict(dim=8, groups=2, codebook_size=2**4, num_quantizers=2), (2, 10, 8)),
    "LFQ_projections": (dict(dim=16, codebook_size=2**8, num_codebooks=2, orthogonal_rotation=True), (2, 16, 4, 4)),
    "FSP": (dict(levels=[8, 5, 3], dim=6, quantize_rate=0.5, act_name="normal"), (2, 5, 6)),
    "FSP_inv_act": (dict(levels=[4, 3], channel_first=True, need_inv_act=True, vector_norm="kurt"), (2, 2, 3, 3)),
    "BinaryMapper": (dict(bits=4, kl_loss_threshold=0.5), (2, 5, 4)),
    "EvoLFQ": (dict(dim=8, codebook_size=2**4, pop_size=8, entropy_loss_weight=0.2), (2, 5, 8)),
    "SimVQ": (dict(dim=8, codebook_size=16), (2, 10, 8)),
    "SimVQ_mlp": (dict(dim=8, codebook_size=16, channel_first=True, frozen_codebook_dim=6,
                       codebook_transform=dict(hidden_dims=[12], activation="relu")), (2, 8, 3, 3)),
    "ResidualSimVQ": (dict(dim=8, num_quantizers=3, codebook_size=16, channel_first=True), (2, 8, 5)),
    "RandomProjectionQuantizer": (dict(dim=8, codebook_size=16, codebook_dim=4, num_codebooks=2, decay=0.9),
                                  (2, 10, 8)),
    "HierarchicalVQ": (dict(dim=8, codebook_size=16, scales=[1, 2, [3, 4]], accept_image_fmap=True, kmeans_init=False,
                            threshold_ema_dead_code=0), (2, 8, 3, 4)),
    "HierarchicalVQ_levels": (dict(dim=8, codebook_size=[8, 16], scales=[2, 5], shared_codebook=False,
                                   channel_first=False, share_quant_resi=0, kmeans_init=False,
                                   threshold_ema_dead_code=0), (2, 5, 8)),
}


def example(name):
    kwargs, shape = EXAMPLES[name]
    return name.split("_")[0], dict(kwargs), torch.randn(*shape)
