"""Merging, averaging, interpolation and residual compression as pure pytree functions."""

from cljax.transforms.merging.averaging import EmaState as EmaState
from cljax.transforms.merging.averaging import LawaState as LawaState
from cljax.transforms.merging.averaging import SwaState as SwaState
from cljax.transforms.merging.averaging import TrackCoinEmaState as TrackCoinEmaState
from cljax.transforms.merging.averaging import bcwi_interpolate as bcwi_interpolate
from cljax.transforms.merging.averaging import ema_init as ema_init
from cljax.transforms.merging.averaging import ema_params as ema_params
from cljax.transforms.merging.averaging import ema_update as ema_update
from cljax.transforms.merging.averaging import ilora_consistency_loss as ilora_consistency_loss
from cljax.transforms.merging.averaging import lawa_init as lawa_init
from cljax.transforms.merging.averaging import lawa_params as lawa_params
from cljax.transforms.merging.averaging import lawa_update as lawa_update
from cljax.transforms.merging.averaging import negative_flip_rate as negative_flip_rate
from cljax.transforms.merging.averaging import swa_init as swa_init
from cljax.transforms.merging.averaging import swa_params as swa_params
from cljax.transforms.merging.averaging import swa_update as swa_update
from cljax.transforms.merging.averaging import track_coin_ema as track_coin_ema
from cljax.transforms.merging.averaging import track_ema as track_ema
from cljax.transforms.merging.averaging import track_lawa as track_lawa
from cljax.transforms.merging.averaging import track_swa as track_swa
from cljax.transforms.merging.averaging import zscl_distillation_loss as zscl_distillation_loss
from cljax.transforms.merging.compression import CompeftLeaf as CompeftLeaf
from cljax.transforms.merging.compression import compeft as compeft
from cljax.transforms.merging.compression import compeft_compress as compeft_compress
from cljax.transforms.merging.compression import compeft_decompress as compeft_decompress
from cljax.transforms.merging.geometry import OneBitTaskVector as OneBitTaskVector
from cljax.transforms.merging.geometry import OpcmState as OpcmState
from cljax.transforms.merging.geometry import QuantizedSignature as QuantizedSignature
from cljax.transforms.merging.geometry import atlas_apply as atlas_apply
from cljax.transforms.merging.geometry import atlas_init as atlas_init
from cljax.transforms.merging.geometry import iso_c as iso_c
from cljax.transforms.merging.geometry import iso_cts as iso_cts
from cljax.transforms.merging.geometry import model_stock as model_stock
from cljax.transforms.merging.geometry import one_bit_compress as one_bit_compress
from cljax.transforms.merging.geometry import one_bit_decompress as one_bit_decompress
from cljax.transforms.merging.geometry import one_bit_merge as one_bit_merge
from cljax.transforms.merging.geometry import opcm_init as opcm_init
from cljax.transforms.merging.geometry import opcm_params as opcm_params
from cljax.transforms.merging.geometry import opcm_update as opcm_update
from cljax.transforms.merging.geometry import rws_dequantize as rws_dequantize
from cljax.transforms.merging.geometry import rws_extract as rws_extract
from cljax.transforms.merging.geometry import rws_patch as rws_patch
from cljax.transforms.merging.geometry import rws_quantize as rws_quantize
from cljax.transforms.merging.geometry import shadow_ft as shadow_ft
from cljax.transforms.merging.geometry import slerp as slerp
from cljax.transforms.merging.geometry import weight_align as weight_align
from cljax.transforms.merging.geometry import weight_align_factor as weight_align_factor
from cljax.transforms.merging.task_vectors import UniformSoupState as UniformSoupState
from cljax.transforms.merging.task_vectors import apply_task_vector as apply_task_vector
from cljax.transforms.merging.task_vectors import breadcrumbs as breadcrumbs
from cljax.transforms.merging.task_vectors import dare as dare
from cljax.transforms.merging.task_vectors import greedy_soup as greedy_soup
from cljax.transforms.merging.task_vectors import magmax as magmax
from cljax.transforms.merging.task_vectors import magmax_init as magmax_init
from cljax.transforms.merging.task_vectors import magmax_update as magmax_update
from cljax.transforms.merging.task_vectors import pcb_merge as pcb_merge
from cljax.transforms.merging.task_vectors import task_arithmetic as task_arithmetic
from cljax.transforms.merging.task_vectors import task_vector as task_vector
from cljax.transforms.merging.task_vectors import ties_merge as ties_merge
from cljax.transforms.merging.task_vectors import uniform_soup as uniform_soup
from cljax.transforms.merging.task_vectors import uniform_soup_add as uniform_soup_add
from cljax.transforms.merging.task_vectors import uniform_soup_init as uniform_soup_init
from cljax.transforms.merging.task_vectors import uniform_soup_result as uniform_soup_result

__all__ = [
    "CompeftLeaf",
    "EmaState",
    "LawaState",
    "OneBitTaskVector",
    "OpcmState",
    "QuantizedSignature",
    "SwaState",
    "TrackCoinEmaState",
    "UniformSoupState",
    "apply_task_vector",
    "atlas_apply",
    "atlas_init",
    "bcwi_interpolate",
    "breadcrumbs",
    "compeft",
    "compeft_compress",
    "compeft_decompress",
    "dare",
    "ema_init",
    "ema_params",
    "ema_update",
    "greedy_soup",
    "ilora_consistency_loss",
    "iso_c",
    "iso_cts",
    "lawa_init",
    "lawa_params",
    "lawa_update",
    "magmax",
    "magmax_init",
    "magmax_update",
    "model_stock",
    "negative_flip_rate",
    "one_bit_compress",
    "one_bit_decompress",
    "one_bit_merge",
    "opcm_init",
    "opcm_params",
    "opcm_update",
    "pcb_merge",
    "rws_dequantize",
    "rws_extract",
    "rws_patch",
    "rws_quantize",
    "shadow_ft",
    "slerp",
    "swa_init",
    "swa_params",
    "swa_update",
    "task_arithmetic",
    "task_vector",
    "ties_merge",
    "track_coin_ema",
    "track_ema",
    "track_lawa",
    "track_swa",
    "uniform_soup",
    "uniform_soup_add",
    "uniform_soup_init",
    "uniform_soup_result",
    "weight_align",
    "weight_align_factor",
    "zscl_distillation_loss",
]
