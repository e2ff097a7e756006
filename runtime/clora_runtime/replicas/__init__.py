"""Several engines in one runtime pod (LoRARuntime spec.replicas > 1), as Ray actors.

Imported only when replicas > 1: a one-replica pod never imports ray.
"""
