"""Offline setup (notebooks/FACILITATOR.md): a wheelhouse holds everything the course installs,
and the Makefile installs from it with the network closed.

What this proves — the real thing, not a model of it:

* the Makefile's own install recipe (``make <venv>/.installed OFFLINE=1``) builds a fresh venv
  from a copy of the checkout: no ``--system-site-packages``, so nothing can come from the
  environment running the tests;
* with the network closed: pip's configuration files are off (this machine's point at local
  wheel folders and indexes), the recipe passes ``--no-index``, and the HTTP(S) proxies point
  at a closed port, so any attempt to download fails at once instead of quietly succeeding;
* the *whole* course installs — torch, triton and ``.[dev]`` with every dependency, and the
  build backend for the editable install — not only the runtime: a wheelhouse missing one dev
  dependency (nbval, say) would break ``make test`` in the room. Then ``pip check`` and
  ``python -m dsv3lite doctor`` in the new venv: every import of the course, the Jupyter
  kernel, and a Triton kernel through the CPU interpreter.

The cost, measured on this 2-core machine: 70 s in all when it was otherwise idle; 1 min 45 s
for the install alone under a load of ~5 from other jobs, and 5 min 30 s for the whole test
with a second copy of it running alongside. That includes topping up the wheelhouse (~15 s:
500 MB, 141 wheels, mostly from local disk here; a first download over the internet takes
longer) and the checks (~15 s); ~2 GB of disk in a temporary folder, removed at the end.
Installing only the runtime would save about a third and prove less; resolving with ``pip
install --dry-run`` would take seconds but never unpacks a wheel nor runs the Makefile.

Not proved here: other platforms (a wheelhouse serves the Python version and OS it was built
on), and downloading from the PyTorch CPU index (this machine has the CPU torch on disk).

Which wheelhouse: ``$DSV3LITE_WHEELHOUSE``, else the checkout's ``wheelhouse/``, both taken as
they are (they are what a workshop would use); else one made with ``make wheelhouse`` in
``~/.cache/dsv3lite/wheelhouse`` and topped up on each run. Making it needs the network: when
PyPI is unreachable the test reuses a cached one, or skips saying why.
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
COPY_IGNORE = shutil.ignore_patterns(
    ".venv",
    ".git",
    "wheelhouse",
    "site",
    "runs",
    "build",
    "bench_results",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".ipynb_checkpoints",
    "*.egg-info",
)
NETWORK_ERRORS = (
    "NewConnectionError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "ConnectTimeout",
    "Network is unreachable",
    "No matching distribution found",
)


def _reachable(host: str = "pypi.org", port: int = 443) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


def _make_env(**extra: str) -> dict[str, str]:
    """This environment minus an enclosing make's variables (``make test`` runs this test)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return {**env, **extra}


def _wheelhouse() -> Path:
    """The wheelhouse to install from (see the module docstring); skips when there is none."""
    given = os.environ.get("DSV3LITE_WHEELHOUSE")
    if given:
        return Path(given).resolve()
    if any((ROOT / "wheelhouse").glob("*.whl")):
        return ROOT / "wheelhouse"
    cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "dsv3lite"
    wheelhouse = cache / "wheelhouse"
    if not _reachable():
        if any(wheelhouse.glob("*.whl")):
            return wheelhouse
        pytest.skip(
            "PyPI is unreachable, so no wheelhouse can be made: run `make wheelhouse` once with "
            "network, or point DSV3LITE_WHEELHOUSE at one"
        )
    proc = subprocess.run(
        ["make", "-C", str(ROOT), "wheelhouse", f"WHEELHOUSE={wheelhouse}"],
        capture_output=True,
        text=True,
        timeout=1200,
        env=_make_env(),
    )
    if proc.returncode != 0:
        log = proc.stdout + proc.stderr
        if any(marker in log for marker in NETWORK_ERRORS) and not _reachable():
            pytest.skip(f"the network went away while making the wheelhouse: {log[-500:]}")
        pytest.fail(f"make wheelhouse failed:\n{log[-4000:]}")
    return wheelhouse


def _offline_env() -> dict[str, str]:
    """An environment in which pip cannot reach anything but the folders it is given."""
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens, connections fail at once
    env = _make_env(
        PIP_CONFIG_FILE=os.devnull,
        http_proxy=closed,
        https_proxy=closed,
        HTTP_PROXY=closed,
        HTTPS_PROXY=closed,
    )
    for name in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"):
        env.pop(name, None)
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    return env


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_make_installs_the_course_offline(tmp_path: Path):
    wheelhouse = _wheelhouse()
    checkout, venv = tmp_path / "checkout", tmp_path / "venv"
    shutil.copytree(ROOT, checkout, ignore=COPY_IGNORE)
    env = _offline_env()
    try:
        proc = subprocess.run(
            [
                "make",
                f"{venv}/.installed",
                f"VENV={venv}",
                f"PYTHON={sys.executable}",
                f"WHEELHOUSE={wheelhouse}",
                "OFFLINE=1",
            ],
            cwd=checkout,
            capture_output=True,
            text=True,
            timeout=1800,
            env=env,
        )
        assert proc.returncode == 0, (
            f"offline install failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
        )
        assert "--no-index --find-links" in proc.stdout, "the recipe did not run offline"
        python = str(venv / "bin" / "python")
        check = subprocess.run(
            [python, "-m", "pip", "check"], capture_output=True, text=True, env=env, timeout=300
        )
        assert check.returncode == 0, check.stdout + check.stderr
        doctor = subprocess.run(
            [python, "-m", "dsv3lite", "doctor"],
            cwd=checkout,
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        package = [line for line in doctor.stdout.splitlines() if " dsv3lite " in line]
        assert package and package[0].startswith("OK") and str(checkout.resolve()) in package[0]
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # ~2 GB: do not leave it to pytest's rotation
