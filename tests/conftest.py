"""Shared fixtures. TRITON_INTERPRET must be set before any module holding @triton.jit kernels is
imported, so it is set here, at collection time (see ../shared/TRITON.md)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
