"""Plain PyTorch + pandas training engine: data, models, steps, the loop, metrics.

Nothing here imports Prefect, so the engine is usable and testable on its own.
"""

from prefect_torch.engine.compat import check_torch_version, installed_torch_version

# Refuse torch < 2.10 (known checkpoint-loading CVEs) before any engine module runs.
check_torch_version(installed_torch_version())
