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


def test_hugging_face_kernels_wins_over_the_checkouts_folder(tmp_path):
    """transformers 5 imports Hugging Face's `kernels`; from a checkout's root the repository's kernels/
    folder would be found first, also when the virtual environment lives inside the checkout (as CI's
    .venv does), and also when something imported the folder under that name already."""
    repo = tmp_path / "repo"
    (repo / "kernels").mkdir(parents=True)
    (repo / "kernels" / "__init__.py").write_text("SHADOW = True\n")
    site = repo / ".venv" / "lib" / "python3.11" / "site-packages"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = 'hf'\n")
    for prelude in ("", "import kernels; "):  # fresh, or the folder imported as `kernels` already
        code = ("import sys; from pathlib import Path; from fastratio import hf; "
                "sys.path[:0] = [sys.argv[1], sys.argv[2]]; " + prelude +
                "hf._unshadow_kernels(Path(sys.argv[1])); "
                "import kernels; print(getattr(kernels, 'CUDAProperties', 'shadow'))")
        out = subprocess.run([sys.executable, "-c", code, str(repo), str(site)], cwd=tmp_path,
                             capture_output=True, text=True, check=True).stdout.split()
        assert out == ["hf"], prelude


def test_every_subpackage_is_listed_for_setuptools():
    """A non-editable install ships only the packages pyproject.toml lists: keep the list complete."""
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"fastratio." + ".".join(p.parent.relative_to(root / "fastratio").parts) for p in (root / "fastratio").rglob("__init__.py")}
    found = {name.rstrip(".") for name in found} | {"fastratio.kernels"}
    assert listed == found
