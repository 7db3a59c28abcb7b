"""hf-vq: vector quantizers as Hugging Face (transformers and diffusers) models."""

from .modeling_utils import (
    QUANTIZER_CLASSES,
    QuantizerConfig,
    QuantizerModel,
    QuantizerOutput,
    build_quantizer,
)
from .diffusers_support import DiffusersQuantizer, register_with_diffusers
from .models.fsq import FSQ, FSQConfig, FSQOutput
from .models.lfq import LFQ, LFQConfig, LFQLossBreakdown, LFQOutput
from .models.vector_quantize import VectorQuantize, VectorQuantizeConfig, VectorQuantizeOutput
from .models.sgm import (
    EMAVectorQuantizer,
    EMAVectorQuantizerConfig,
    GumbelQuantize,
    GumbelQuantizeConfig,
    GumbelQuantizer,
    GumbelQuantizerConfig,
    SgmQuantizerOutput,
    VectorQuantizer,
    VectorQuantizer2,
    VectorQuantizer2Config,
    VectorQuantizerConfig,
    VectorQuantizerWithInputProjection,
    VectorQuantizerWithInputProjectionConfig,
)
from .models.grouped import (
    GroupedResidualFSQ,
    GroupedResidualFSQConfig,
    GroupedResidualLFQ,
    GroupedResidualLFQConfig,
    GroupedResidualVQ,
    GroupedResidualVQConfig,
)
from .models.residual import (
    ResidualFSQ,
    ResidualFSQConfig,
    ResidualLFQ,
    ResidualLFQConfig,
    ResidualOutput,
    ResidualVQ,
    ResidualVQConfig,
)
from .models.latent_quantize import LatentQuantize, LatentQuantizeConfig, LatentQuantizeOutput
from .models.vq_autoencoder import VQAutoencoder
from .models.fsp import FSP, FSPConfig, FSPOutput, build_cdf_act
from .models.binary_mapper import BinaryMapper, BinaryMapperConfig, BinaryMapperOutput
from .models.evo_lfq import EvoLFQ, EvoLFQConfig, EvoLFQOutput

__version__ = "0.1.0"

register_with_diffusers()
from .models.sim_vq import ResidualSimVQ, ResidualSimVQConfig, ResidualSimVQOutput, SimVQ, SimVQConfig, SimVQOutput
from .models.random_projection import (
    RandomProjectionQuantizer,
    RandomProjectionQuantizerConfig,
    RandomProjectionQuantizerOutput,
)
from .models.hierarchical_vq import HierarchicalVQ, HierarchicalVQConfig, HierarchicalVQOutput
from .models.sequential import Sequential
