import os

# Triton kernels run under the interpreter on CPU; this must be set before any @triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (the README's `-n 2`) each worker gets its share of the cores, so two workers on
# two cores do not fight over four intra-op threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
