"""Integrations with training libraries, each imported on demand (``import napo_kernels`` needs none).

* :mod:`napo_kernels.integrations.trl`: ``FusedDPOTrainer``, a drop-in for ``trl.DPOTrainer`` that
  scores the chosen and every rejected completion of a prompt in one packed forward with the fused
  completion-only log-prob op, and adds the multi-negative losses (``s_dpo``, ``dmpo``, ``napo``,
  ``dynamicpo``). Needs ``trl`` (tested: 1.16).
* :mod:`napo_kernels.integrations.sharded`: the fused loss on FSDP2 (``fully_shard``) and DeepSpeed
  ZeRO-3 models, run where the engine gathers the output head (``run_as_forward``,
  ``with_gathered_head``; the recommender trainers use them by themselves). Needs nothing more
  (``deepspeed`` for ZeRO-3).
"""
