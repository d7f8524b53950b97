"""Development tooling: the demo, the local stack, the load and soak drivers.

Nothing in the runtime imports this wing (tests/unit/test_layout.py checks it); the
compose stack runs the demo services from the same image.
"""
