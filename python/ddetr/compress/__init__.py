"""Post-hoc compression of a trained ``DeformableDetr``: each technique is a plain
function returning a new, ordinary ``DeformableDetr`` (its config says what it is, so
``save_pretrained`` / ``from_pretrained`` round-trip it), and every technique at its
identity setting returns a model with exactly the original outputs.

- ``truncate_decoder(model, k)``: stop after decoder layer k, read out with its head.
- ``reduce_queries(model, k, keep=None)``: fewer two-stage proposals, or a subset of the
  learned one-stage queries (``keep``, e.g. from ``query_usage``).
- ``prune_points(model, enc_points, dec_points, usage)``: keep the sampling points with
  the largest mean attention weight per (layer, head, level) (``point_usage``); the
  softmax then renormalises over the points kept.
- ``drop_levels(model, levels)``: the transformer on some feature levels only (e.g. the
  most attended by ``level_usage``); without the coarsest ones the backbone stops early.
- ``to_bfloat16(model)``: every parameter and activation in bfloat16.
- ``resize_inputs(model, scale)``: the same weights on images ``scale`` times the size.
- ``sparsify_encoder(model, rho, scorer_state)``: every encoder layer updates only the
  fraction rho of the tokens (Sparse DETR), picked by a scorer that
  ``train_token_scorer(model, images, rho)`` trains on the decoder attention map.

Recovery: ``pseudo_labels(teacher, dataset)`` labels images with the original model's
detections; ``distill(student, labelled_dataset, epochs)`` trains a compressed copy on
them.

``compress(model, val_dataset, max_ap_drop)`` measures each technique alone and combines
them greedily (``ddetr compress`` on the command line); ``write_report`` writes its
report.
"""

from ddetr.compress.api import compress, write_report
from ddetr.compress.distill import distill, pseudo_labels
from ddetr.compress.calibrate import encoder_token_saliency, point_usage, query_usage
from ddetr.compress.int8 import to_int8
from ddetr.compress.sparse import selection_recall, sparsify_encoder, train_token_scorer
from ddetr.compress.techniques import (drop_levels, level_usage, prune_points, reduce_queries,
                                       resize_inputs, to_bfloat16, truncate_decoder)

__all__ = ["compress", "distill", "drop_levels", "level_usage", "pseudo_labels", "encoder_token_saliency", "point_usage", "prune_points", "query_usage",
           "reduce_queries", "resize_inputs", "selection_recall", "sparsify_encoder",
           "to_bfloat16", "to_int8", "train_token_scorer", "truncate_decoder", "write_report"]
