"""Exercises for the course: the checks of the notebooks' coding exercises, from 01 on.

A check takes the learner's function, runs it on fresh random inputs beside the package, and
either prints ``✓ correct — ...`` or raises ``ExerciseError`` (an AssertionError) that says in
words what is wrong, with a hint. Pass ``seed=`` to see the same inputs again.

    from dsv3lite.exercises import check_absorbed_query
    check_absorbed_query(my_absorbed_query)

| notebook | check | the learner writes |
|---|---|---|
| 01 | ``check_absorbed_query`` | ``absorbed_query(mla, q_nope)`` |
| 01 | ``check_absorbed_values`` | ``absorbed_values(mla, probs, c_kv)`` |
| 02 | ``check_group_limited_topk`` | ``group_limited_topk(scores, bias, n_group, topk_group, k)`` |
| 02 | ``check_max_violation`` | ``max_violation(load)`` |
| 03 | ``check_mtp_combine`` | ``mtp_combine(mtp, h_prev, emb_next)`` |
| 03 | ``check_mtp_loss`` | ``mtp_loss(mtp_logits, labels, k)`` |
| 04 | ``check_act_quant`` | ``act_quant(x)`` |
| 05 | ``check_tile_scale_kernel`` | a ``@triton.jit`` kernel ``(x_ptr, s_ptr, K, BLOCK)`` |
| 05 | ``check_block_scaled_k_loop`` | ``block_scaled_k_loop(a, a_s, b, b_s)`` in NumPy |
| 06 | ``check_dispatch_counts`` | ``dispatch_counts(indices, n_experts, world_size)`` |
| 07 | ``check_pipeline_bubble`` | ``pipeline_bubble(kind, pp, F, B, W, FB)`` |
| 07 | ``check_one_f_one_b`` | ``one_f_one_b(pp, rank, micro_batches)`` |
| 08 | ``check_bias_update`` | ``bias_update(bias, load, gamma)`` |
| 09 | ``check_decode_step`` | ``decode_step(q_latent, q_pe, kv, k_pe, seqlens, scale)`` |
| 10 | ``check_greedy_verify`` | ``greedy_verify(main_logits, draft)`` |

A stub still ``...`` (returning None) or raising NotImplementedError is not an error: its
check prints "… not done yet" so that a notebook runs to its end with its exercises open.

Reference solutions live apart, in ``dsv3lite.exercises.solutions``. The checks import
Triton only when they need it, so importing this package leaves ``TRITON_INTERPRET`` free to
be set later.
"""

from ._check import ExerciseError
from .dualpipe import check_one_f_one_b, check_pipeline_bubble
from .expert_parallel import check_dispatch_counts
from .fp8_kernels import check_block_scaled_k_loop, check_tile_scale_kernel
from .fp8_numerics import check_act_quant
from .inference import check_decode_step, check_greedy_verify
from .mla import check_absorbed_query, check_absorbed_values
from .moe import check_group_limited_topk, check_max_violation
from .mtp import check_mtp_combine, check_mtp_loss
from .training import check_bias_update

__all__ = [
    "ExerciseError",
    "check_absorbed_query",
    "check_absorbed_values",
    "check_group_limited_topk",
    "check_max_violation",
    "check_mtp_combine",
    "check_mtp_loss",
    "check_act_quant",
    "check_tile_scale_kernel",
    "check_block_scaled_k_loop",
    "check_dispatch_counts",
    "check_pipeline_bubble",
    "check_one_f_one_b",
    "check_bias_update",
    "check_decode_step",
    "check_greedy_verify",
]
