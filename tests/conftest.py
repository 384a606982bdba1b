"""Shared test setup: 8 fake CPU devices (set before JAX initialises) and offline hub and datasets access."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval reads its task files through `datasets`
os.environ.setdefault("JAX_PLATFORMS", "cpu")
