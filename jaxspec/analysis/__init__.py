"""Jacobian / Lipschitz toolkit (Sinha 2023 stability study) for any function or model.

* :mod:`jaxspec.analysis.jacobian` -- exact channel blocks, matrix-free spectral norms by power
  iteration, perturbation estimates.
* :mod:`jaxspec.analysis.bounds` -- conv operator norms (Sedghi et al. 2019), Corollary 2.1,
  Lemma 2.2, Lemma 2.3 in paper / corrected / data-dependent forms.
* :mod:`jaxspec.analysis.tables` -- Tables 2-3 reproduction; :mod:`jaxspec.analysis.plots`.
"""
from jaxspec.analysis.jacobian import (all_pairs, block_norm_matrix, channel_jacobian,
                                       exact_block_norms, image_fn, perturbation_estimate,
                                       power_iteration_block_norms)
from jaxspec.analysis.bounds import (acc_diagonal_bounds, acc_kernel_norms,
                                     acc_offdiagonal_bounds, conv_operator_norm,
                                     conv_singular_values, corollary21_bound, lemma22_epsilon,
                                     spectral_dot_product_attention)
from jaxspec.analysis.tables import (CHANNELS, PAPER_TABLE2, PAPER_TABLE3, format_table,
                                     lipschitz_table, reproduce_tables, synthetic_feature_map)

__all__ = [
    "all_pairs", "block_norm_matrix", "channel_jacobian", "exact_block_norms", "image_fn",
    "perturbation_estimate", "power_iteration_block_norms", "acc_diagonal_bounds",
    "acc_kernel_norms", "acc_offdiagonal_bounds", "conv_operator_norm", "conv_singular_values",
    "corollary21_bound", "lemma22_epsilon", "spectral_dot_product_attention", "CHANNELS",
    "PAPER_TABLE2", "PAPER_TABLE3", "format_table", "lipschitz_table", "reproduce_tables",
    "synthetic_feature_map",
]
