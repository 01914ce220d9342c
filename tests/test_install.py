"""Installs as learners meet them: PyPI alone, Colab's own torch, no Triton.

The resolution tests ask PyPI itself with this machine's pip configuration switched off (no
local wheels, no constraints), as a laptop sees it, and read metadata only (``--dry-run``).
They need the network: outside CI they skip, saying so, when PyPI cannot be reached; in CI
(``CI`` set) an unreachable PyPI fails them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
REPO = "dsv3lite/dsv3lite"


def _pypi_env() -> dict[str, str]:
    """The environment of a user's pip: PyPI only, no local wheels, no constraints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


@pytest.fixture(scope="module")
def pypi() -> None:
    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=20).close()
    except OSError as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PyPI is unreachable ({error}): resolution against it cannot be checked")


def _dry_run(python: str | Path, *requirements: str, ignore_installed: bool = False) -> dict:
    """What pip would install for ``requirements`` (a --report, nothing downloaded but metadata)."""
    cmd = [str(python), "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-"]
    cmd += ["--ignore-installed"] if ignore_installed else []
    run = subprocess.run(
        [*cmd, *requirements], capture_output=True, text=True, env=_pypi_env(), timeout=600
    )
    assert run.returncode == 0, f"pip could not resolve {requirements}:\n{run.stderr[-3000:]}"
    return {
        i["metadata"]["name"].lower(): i["metadata"]["version"]
        for i in json.loads(run.stdout)["install"]
    }


def _make_variable(name: str, *args: str) -> str:
    """A variable as the Makefile computes it (GNU make evaluates its own conditionals)."""
    out = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "--eval=print-%: ; @echo $($*)", f"print-{name}", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


# ------------------------------------------------------------------------------ the default path
@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the Makefile's CPU-index default is Linux's")
def test_makefile_defaults_to_the_cpu_build_and_gpu_opts_in() -> None:
    cpu, gpu = _make_variable("TORCH_SPEC"), _make_variable("TORCH_SPEC", "GPU=1")
    assert "+cpu" in cpu and "triton==" in cpu
    assert "download.pytorch.org/whl/cpu" in _make_variable("TORCH_INDEX")
    assert (
        "+cpu" not in gpu and "triton" not in gpu and _make_variable("TORCH_INDEX", "GPU=1") == ""
    )


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the Makefile's CPU-index default is Linux's")
def test_default_install_resolves_against_pypi(pypi: None) -> None:
    """`make demo`'s two steps, resolved together against PyPI. PyPI has no '+cpu' build, so
    torch 2.13.0 stands in for it: the same release with the same requirements, plus the CUDA
    build's own triton pin, which makes this the stricter check."""
    specs = [s.replace("+cpu", "") for s in _make_variable("TORCH_SPEC").split()]
    plan = _dry_run(sys.executable, *specs, f"{ROOT}[dev]", ignore_installed=True)
    wanted = dict(s.split("==") for s in specs)
    assert {k: plan[k] for k in wanted} == wanted
    assert plan["dsv3lite"] and "numpy" in plan


@pytest.mark.slow
@pytest.mark.parametrize("torch_version", ["2.9.1", "2.11.0", "2.12.0"])
def test_package_keeps_each_torch_and_its_triton(pypi: None, torch_version: str) -> None:
    """No exact triton pin of ours fights the one torch brings (2.9: 3.5.1, 2.11: 3.6.0...)."""
    plan = _dry_run(sys.executable, f"torch=={torch_version}", str(ROOT), ignore_installed=True)
    assert plan["torch"] == torch_version and "triton" in plan


# ------------------------------------------------------------------------------ Colab
COLAB_CELL = f"""# On Colab only (elsewhere this does nothing): install dsv3lite beside Colab's own torch.
import importlib.util
import subprocess
import sys

if "google.colab" in sys.modules and importlib.util.find_spec("dsv3lite") is None:
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    source = "dsv3lite @ git+https://github.com/{REPO}"
    subprocess.run([*pip, "--no-deps", source], check=True)  # keeps Colab's torch and triton
    subprocess.run([*pip, "safetensors", "tokenizers", "tqdm", "ipywidgets"], check=True)"""


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_opens_in_colab_and_installs_there(path: Path) -> None:
    cells = json.loads(path.read_text())["cells"]
    link = f"https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{path.name}"
    assert link in "".join(cells[0]["source"]), "the first cell links the notebook to Colab"
    assert "".join(cells[1]["source"]) == COLAB_CELL, "the second cell is the Colab install"


def test_colab_cell_installs_without_deps_only_on_colab(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    exec(COLAB_CELL, {})
    assert calls == []  # not Colab: nothing runs
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    exec(COLAB_CELL, {})
    assert "--no-deps" in calls[0]
    assert not any(word.startswith(("torch", "triton", "numpy")) for call in calls for word in call)


def _fake_installed(site: Path, name: str, version: str, requires: list[str]) -> None:
    """The metadata pip reads of an installed distribution (no files of its own)."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    (info / "METADATA").write_text("\n".join(lines + [f"Requires-Dist: {r}" for r in requires]))
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


@pytest.mark.slow
def test_colab_like_environment_keeps_its_torch(pypi: None, tmp_path: Path) -> None:
    """A venv holding Colab's torch 2.8 (CUDA build), its triton 3.4 and numpy 2.0: even a
    plain `pip install` of the package (Colab's cell adds --no-deps) replaces none of them."""
    venv = tmp_path / "colab"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = next((venv / "lib").glob("python3.*")) / "site-packages"
    _fake_installed(site, "torch", "2.8.0+cu126", ["triton==3.4.0; platform_system == 'Linux'"])
    _fake_installed(site, "triton", "3.4.0", [])
    _fake_installed(site, "numpy", "2.0.2", [])
    plan = _dry_run(python, str(ROOT))
    assert not {"torch", "triton", "numpy"} & set(plan), plan
    assert set(_dry_run(python, "--no-deps", str(ROOT))) == {"dsv3lite"}


# ------------------------------------------------------------------------------ no Triton
@pytest.mark.slow
@pytest.mark.parametrize("name", ["05_fp8_kernels", "09_inference"])
def test_notebook_runs_without_triton(tmp_path: Path, name: str) -> None:
    """As on macOS or Windows: `import triton` fails. The kernel notebooks run to the end and
    say why they show the torch reference."""
    blocker = tmp_path / "no-triton" / "triton"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'triton'\", name='triton')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(blocker.parent)}
    cmd = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute"]
    cmd += ["--output-dir", str(tmp_path), str(ROOT / "notebooks" / f"{name}.ipynb")]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    outputs = json.loads((tmp_path / f"{name}.ipynb").read_text())["cells"]
    text = json.dumps([c.get("outputs", []) for c in outputs])
    assert "Triton is not installed" in text and "torch reference" in text


# ------------------------------------------------------------------------------ the wheel
@pytest.mark.slow
def test_wheel_ships_the_kernels_and_the_recorded_results(tmp_path: Path) -> None:
    """What a non-editable install gets: dsv3lite.kernels (from kernels/), the benchmark JSON
    the notebooks read through importlib.resources, and the shipped trained model."""
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path)]
    subprocess.run([*cmd, str(ROOT)], check=True, timeout=600, capture_output=True)
    (wheel,) = tmp_path.glob("dsv3lite-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"dsv3lite/kernels/_triton.py", "dsv3lite/kernels/mla_decode.py"} <= names
    packages = {
        p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "dsv3lite").rglob("__init__.py")
    }
    assert {f"{p}/__init__.py" for p in packages} <= names, "a subpackage missing from pyproject"
    recorded = {p.name for p in (ROOT / "dsv3lite" / "results").glob("*.json")}
    assert recorded and {f"dsv3lite/results/{n}" for n in recorded} <= names
    shipped = {p.name for p in (ROOT / "dsv3lite" / "pretrained" / "tiny-docs").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= shipped
    assert {f"dsv3lite/pretrained/tiny-docs/{n}" for n in shipped} <= names, "the shipped model"
