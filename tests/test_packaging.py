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


def test_every_subpackage_is_listed_for_setuptools():
    """A non-editable install ships only the packages pyproject.toml lists: keep the list complete."""
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"fastratio." + ".".join(p.parent.relative_to(root / "fastratio").parts) for p in (root / "fastratio").rglob("__init__.py")}
    found = {name.rstrip(".") for name in found} | {"fastratio.kernels"}
    assert listed == found
