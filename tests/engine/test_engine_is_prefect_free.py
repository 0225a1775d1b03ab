"""engine/ knows nothing of Prefect: CI's oldest-Prefect run skips the engine tests on
that promise (.ci/run)."""

import pkgutil
import subprocess
import sys

import prefect_torch.engine


def test_every_engine_module_imports_without_prefect():
    modules = [f"prefect_torch.engine.{m.name}" for m in pkgutil.iter_modules(prefect_torch.engine.__path__)]
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(modules) > 20
    assert done.stdout.strip() == "[]"
