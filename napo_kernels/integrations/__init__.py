"""Integrations with training libraries, each imported on demand (``import napo_kernels`` needs none).

* :mod:`napo_kernels.integrations.trl`: ``FusedDPOTrainer``, a drop-in for ``trl.DPOTrainer`` that
  scores the chosen and every rejected completion of a prompt in one packed forward with the fused
  completion-only log-prob op, and adds the multi-negative losses (``s_dpo``, ``dmpo``, ``napo``,
  ``dynamicpo``). Needs ``trl`` (tested: 1.16).
"""
