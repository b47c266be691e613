"""Evaluate a saved condensed set with the official protocol (any architecture).

``python -m experiments.evaluate --set runs/cifar10-ipc10/synthetic.npz --arch ResNet18BN``;
the same as the ``idm-evaluate`` entry point (``idm_jax.runs.tools.evaluate_main``).
"""

from idm_jax.runs.tools import evaluate_main as main

if __name__ == "__main__":
    main()
