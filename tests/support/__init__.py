"""Shared test support: brute-force references (``reference``), the model zoo (``zoo``),
real models (``real_models``), assertions (``checks``), the DDP worker (``ddp_worker``) and
the torchvision CPU shim (``torchvision_cpu``)."""
