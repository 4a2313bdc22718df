import os
import subprocess
import sys


def test_kernels_ship_inside_the_package_not_at_top_level(tmp_path):
    """Outside the repository, `fastratio.kernels` imports and no top-level `kernels` comes from us."""
    code = (
        "import importlib.util, fastratio.kernels as k; "
        "s = importlib.util.find_spec('kernels'); "
        "print(k.__name__, 'none' if s is None else s.origin)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "fastratio.kernels"
    assert out[1] == "none" or "fastratio" not in out[1]
