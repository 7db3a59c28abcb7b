"""`VQAutoencoder`: diffusers' `VQModel` with any hf_vq quantizer as its bottleneck.

Same constructor arguments, submodule names (`encoder`, `quant_conv`, `quantize`, `post_quant_conv`,
`decoder`), `encode` / `decode` / `forward` and output classes as diffusers' `VQModel`, so it drops into a
diffusers pipeline in its place and loads a folder written by `VQModel.save_pretrained`. Two more config fields
pick the quantizer: `quantizer_type` (an hf_vq class name) and `quantizer_config` (its hyper-parameters).
Without them the quantizer is hf_vq's `VectorQuantizer2` with `VQModel`'s settings (`num_vq_embeddings` codes of
`vq_embed_dim`, beta 0.25, legacy loss): the same module, state keys (`quantize.embedding.weight`) and results
as diffusers' own `VectorQuantizer`, which is why a `VQModel` config and checkpoint load unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import AutoencoderMixin, Decoder, DecoderOutput, Encoder
from diffusers.models.autoencoders.vq_model import VQEncoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

from ..modeling_utils import QuantizerModel, build_quantizer, rebuild_derived_buffers

__all__ = ["VQAutoencoder", "VQEncoderOutput", "DecoderOutput"]

# config fields that hold a quantizer's input feature dim, per family
_DIM_FIELDS = ("num_hiddens", "dim", "input_dim", "e_dim", "embedding_dim")


def default_quantizer_config(num_vq_embeddings: int, vq_embed_dim: int) -> tuple[str, dict[str, Any]]:
    """The quantizer diffusers' `VQModel` builds: `VectorQuantizer(n_e, e_dim, beta=0.25)`, legacy loss."""
    return "VectorQuantizer2", {"n_e": num_vq_embeddings, "e_dim": vq_embed_dim, "beta": 0.25, "legacy": True}


def _check_quantizer(quantizer: QuantizerModel, vq_embed_dim: int) -> None:
    """The quantizer must take `(b, vq_embed_dim, h, w)` latents."""
    c = quantizer.config
    dim = next((v for v in (getattr(c, n, None) for n in _DIM_FIELDS) if v is not None), None)
    if dim is not None and dim != vq_embed_dim:
        raise ValueError(f"quantizer_config gives a {type(quantizer).__name__} with input dim {dim}, but the "
                         f"autoencoder's vq_embed_dim is {vq_embed_dim}: they must match")
    if getattr(c, "accept_image_fmap", True) is False:
        raise ValueError(f"quantizer_config: {type(quantizer).__name__} needs accept_image_fmap=True to take the "
                         "autoencoder's (b, c, h, w) latents")


# the codebook key of diffusers' VQModel (and of hf_vq's sgm / taming quantizers)
VQMODEL_CODEBOOK_KEY = "quantize.embedding.weight"


def _codebook_state(quantizer: QuantizerModel, codebook: torch.Tensor) -> dict[str, torch.Tensor]:
    """A fresh running state around a pretrained `(K, d)` codebook, for quantizers whose codebook key is not
    VQModel's: hf_vq `VectorQuantize` (one codebook, EMA counts at their initial 1) and sgm's `EMAVectorQuantizer`
    (its key is VQModel's, its EMA state starts empty as in sgm)."""
    name, c = type(quantizer).__name__, quantizer.config
    k, d = codebook.shape
    if name == "VectorQuantize":
        single = c.heads == 1 or not c.separate_codebook_per_head
        if not single or (c.codebook_dim or c.dim // c.heads) != d or c.codebook_size != k or c.affine_param:
            raise ValueError(f"a VQModel codebook ({k} x {d}) fits a VectorQuantize with codebook_size={k}, "
                             f"codebook_dim={d}, one codebook and no affine_param")
        embed = codebook.unsqueeze(0)
        return {"_codebook.embed": embed, "_codebook.embed_avg": embed.clone(),
                "_codebook.cluster_size": torch.ones(1, k, dtype=codebook.dtype),
                "_codebook.initted": torch.tensor(True)}
    if name == "EMAVectorQuantizer":
        return {"embedding.weight": codebook, "embedding.cluster_size": torch.zeros(k, dtype=codebook.dtype),
                "embedding.embed_avg": codebook.clone()}
    raise ValueError(f"a VQModel checkpoint's codebook ({VQMODEL_CODEBOOK_KEY}) does not map onto {name}; use the "
                     "default quantizer (VectorQuantizer2), VectorQuantizer, EMAVectorQuantizer or VectorQuantize")


class VQAutoencoder(ModelMixin, AutoencoderMixin, ConfigMixin):
    r"""A VQ-VAE (diffusers' `VQModel`) whose quantizer is any hf_vq quantizer.

    Args:
        in_channels (`int`, defaults to 3): channels of the input image.
        out_channels (`int`, defaults to 3): channels of the output image.
        down_block_types (`tuple[str]`, defaults to `("DownEncoderBlock2D",)`): encoder block types.
        up_block_types (`tuple[str]`, defaults to `("UpDecoderBlock2D",)`): decoder block types.
        block_out_channels (`tuple[int]`, defaults to `(64,)`): output channels of each block.
        layers_per_block (`int`, defaults to 1): ResNet layers per block.
        act_fn (`str`, defaults to `"silu"`): activation.
        latent_channels (`int`, defaults to 3): channels of the encoder output / decoder input.
        sample_size (`int`, defaults to 32): sample input size.
        num_vq_embeddings (`int`, defaults to 256): codebook size of the default quantizer.
        norm_num_groups (`int`, defaults to 32): groups of the GroupNorm layers.
        vq_embed_dim (`int`, *optional*): channels the quantizer sees (defaults to `latent_channels`).
        scaling_factor (`float`, defaults to 0.18215): latent scaling used by diffusion pipelines.
        norm_type (`str`, defaults to `"group"`): decoder normalization, `"group"` or `"spatial"` (conditioned on
            the quantized latents).
        mid_block_add_attention (`bool`, defaults to `True`): attention in the encoder/decoder mid blocks.
        lookup_from_codebook (`bool`, defaults to `False`): `decode(indices, force_not_quantize=True, shape=...)`
            reads codes from the quantizer's codebook.
        force_upcast (`bool`, defaults to `False`): pipelines run this model in float32.
        quantizer_type (`str`, *optional*): hf_vq quantizer class (`"FSQ"`, `"VectorQuantize"`, ...). `None`:
            diffusers' `VQModel` quantizer (hf_vq `VectorQuantizer2`, `num_vq_embeddings` x `vq_embed_dim`).
        quantizer_config (`dict`, *optional*): that quantizer's hyper-parameters; its input dim must be
            `vq_embed_dim`.
    """

    _skip_layerwise_casting_patterns = ["quantize"]
    _supports_group_offloading = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 3,
        sample_size: int = 32,
        num_vq_embeddings: int = 256,
        norm_num_groups: int = 32,
        vq_embed_dim: int | None = None,
        scaling_factor: float = 0.18215,
        norm_type: str = "group",
        mid_block_add_attention: bool = True,
        lookup_from_codebook: bool = False,
        force_upcast: bool = False,
        quantizer_type: str | None = None,
        quantizer_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        if norm_type not in ("group", "spatial"):
            raise ValueError(f"norm_type must be 'group' or 'spatial', got {norm_type!r}")
        if quantizer_type is None and quantizer_config:
            raise ValueError("quantizer_config was given without quantizer_type")
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=latent_channels,
            down_block_types=down_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            double_z=False,
            mid_block_add_attention=mid_block_add_attention,
        )
        vq_embed_dim = vq_embed_dim if vq_embed_dim is not None else latent_channels
        self.quant_conv = nn.Conv2d(latent_channels, vq_embed_dim, 1)
        if quantizer_type is None:
            quantizer_type, quantizer_config = default_quantizer_config(num_vq_embeddings, vq_embed_dim)
        self.quantize = build_quantizer(quantizer_type, quantizer_config or {})
        _check_quantizer(self.quantize, vq_embed_dim)
        self.post_quant_conv = nn.Conv2d(vq_embed_dim, latent_channels, 1)
        self.decoder = Decoder(
            in_channels=latent_channels,
            out_channels=out_channels,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            norm_type=norm_type,
            mid_block_add_attention=mid_block_add_attention,
        )

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """diffusers' loading (also of a `VQModel` folder), then the quantizer's derived tables are rebuilt:
        diffusers materializes models from the meta device, which leaves non-persistent buffers empty."""
        loaded = super().from_pretrained(*args, **kwargs)
        rebuild_derived_buffers(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded

    def _fix_state_dict_keys_on_load(self, state_dict) -> None:
        """diffusers' in-place key fix-up hook before loading: a `VQModel` codebook goes into the chosen quantizer
        when that quantizer keeps its codebook under other keys (`from_pretrained(vqmodel_dir, quantizer_type=
        "VectorQuantize", quantizer_config=...)`)."""
        super()._fix_state_dict_keys_on_load(state_dict)
        own = [f"quantize.{k}" for k in self.quantize.state_dict()]
        if VQMODEL_CODEBOOK_KEY not in state_dict or (VQMODEL_CODEBOOK_KEY in own and set(own) <= state_dict.keys()):
            return  # not a VQModel codebook, or one the quantizer takes as it is
        codebook = state_dict.pop(VQMODEL_CODEBOOK_KEY)
        state_dict.update({f"quantize.{k}": v for k, v in _codebook_state(self.quantize, codebook).items()})

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> VQEncoderOutput | tuple[torch.Tensor]:
        """Encoder and `quant_conv`: the latents before quantization (quantization happens in `decode`)."""
        h = self.quant_conv(self.encoder(x))
        return VQEncoderOutput(latents=h) if return_dict else (h,)

    def quantize_latents(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """`(quantized, commit_loss, quantizer output)` for channel-first latents `h`."""
        out = self.quantize(h, return_dict=True)
        loss = out.loss if isinstance(out.loss, torch.Tensor) else h.new_zeros(())
        return out.quantized, loss, out

    def codes_from_indices(self, indices: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Channel-first quantized latents for code `indices` (`shape`: `(b, h, w, c)`, as diffusers)."""
        if hasattr(self.quantize, "get_codebook_entry"):  # the sgm / taming / diffusers signature
            return self.quantize.get_codebook_entry(indices, shape)
        if not hasattr(self.quantize, "indices_to_codes"):
            raise ValueError(f"lookup_from_codebook: {type(self.quantize).__name__} has no get_codebook_entry or "
                             "indices_to_codes")
        if shape is not None:  # flat indices -> (b, h, w) (or (b, h, w, codebooks))
            b, height, width = shape[:3]
            indices = indices.reshape(b, height, width, -1)
            indices = indices.squeeze(-1) if indices.shape[-1] == 1 else indices
        return self.quantize.indices_to_codes(indices)  # channel-first for (b, h, w) indices

    @apply_forward_hook
    def decode(
        self, h: torch.Tensor, force_not_quantize: bool = False, return_dict: bool = True, shape=None
    ) -> DecoderOutput | tuple[torch.Tensor, torch.Tensor]:
        """Quantize `h` (unless `force_not_quantize`; with `lookup_from_codebook` then `h` holds code indices),
        `post_quant_conv` and the decoder. Returns the image and the commitment loss."""
        if not force_not_quantize:
            quant, commit_loss, _ = self.quantize_latents(h)
        else:
            quant = self.codes_from_indices(h, shape) if self.config.lookup_from_codebook else h
            commit_loss = torch.zeros(h.shape[0], device=h.device, dtype=quant.dtype)
        dec = self.decoder(self.post_quant_conv(quant), quant if self.config.norm_type == "spatial" else None)
        return DecoderOutput(sample=dec, commit_loss=commit_loss) if return_dict else (dec, commit_loss)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor, ...]:
        """Encode, quantize and decode `sample`; `DecoderOutput(sample, commit_loss)` or that tuple."""
        dec = self.decode(self.encode(sample).latents)
        return dec if return_dict else (dec.sample, dec.commit_loss)
