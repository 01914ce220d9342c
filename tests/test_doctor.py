"""``python -m dsv3lite doctor``: it runs and passes here, and every failure path prints its fix.

The failure paths replace the doctor's probes (``_import``, ``_memory``, ...) with fakes, so
each problem is staged without breaking the environment.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from dsv3lite import doctor

ROOT = Path(__file__).parent.parent
REAL_IMPORT = doctor._import


def _only(check, monkeypatch, **probes):
    """Run one check with some probes replaced."""
    for name, value in probes.items():
        monkeypatch.setattr(doctor, name, value)
    return check()


def _without(*names):
    """An _import that fails for ``names`` and imports everything else."""
    real = REAL_IMPORT

    def fake(name):
        if name in names:
            raise ModuleNotFoundError(f"No module named '{name}'")
        return real(name)

    return fake


def _with_version(name, version):
    """An _import whose ``name`` module reports ``version``."""
    real = REAL_IMPORT

    class Fake:
        __version__ = version

    def fake(module):
        return Fake if module == name else real(module)

    return fake


@pytest.mark.slow
def test_doctor_passes_here():
    proc = subprocess.run(
        [sys.executable, "-m", "dsv3lite", "doctor"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    checks = [line for line in lines if line.split(" ", 1)[0] in ("OK", "WARN", "FAIL")]
    assert len(checks) == len(doctor.CHECKS)
    assert not [line for line in checks if line.startswith("FAIL")]
    assert any(line.startswith("OK    triton") for line in checks), proc.stdout


def test_script_mode_needs_no_package_import():
    """python dsv3lite/doctor.py runs with nothing but the standard library at start-up."""
    code = (
        "import runpy, sys; sys.argv = ['doctor']; sys.modules['torch'] = None\n"
        "try:\n"
        f"    runpy.run_path({str(ROOT / 'dsv3lite' / 'doctor.py')!r}, run_name='not_main')\n"
        "except ImportError as err:\n"
        "    raise SystemExit(f'imports at start-up: {err}')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_main_exits_1_on_a_failure(monkeypatch, capsys):
    monkeypatch.setattr(
        doctor, "CHECKS", (lambda: doctor.Result("x", doctor.FAIL, "broken", "fix it"),)
    )
    assert doctor.main() == 1
    out = capsys.readouterr().out
    assert "FAIL  x         broken → fix it" in out and "1 problem(s) to fix first" in out


def test_main_exits_0_on_warnings(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "CHECKS", (lambda: doctor.Result("x", doctor.WARN, "meh", "hm"),))
    assert doctor.main() == 0
    assert "Ready, with 1 warning(s)." in capsys.readouterr().out


def test_a_crashing_check_is_a_failure(monkeypatch):
    def boom():
        raise RuntimeError("bad probe")

    monkeypatch.setattr(doctor, "CHECKS", (boom,))
    (result,) = doctor.run_checks()
    assert result.status == doctor.FAIL and "bad probe" in result.detail


def test_python_too_old(monkeypatch):
    r = _only(doctor.check_python, monkeypatch, _version_info=lambda: (3, 9, 18))
    assert r.status == doctor.FAIL and "3.10 or newer" in r.detail
    assert "make clean demo PYTHON=python3.11" in r.fix


def test_torch_missing(monkeypatch):
    r = _only(doctor.check_torch, monkeypatch, _import=_without("torch"))
    assert r.status == doctor.FAIL and "make demo" in r.fix
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in r.fix


def test_torch_too_old(monkeypatch):
    r = _only(doctor.check_torch, monkeypatch, _import=_with_version("torch", "2.1.0"))
    assert r.status == doctor.FAIL and "pip install torch==2.13.0" in r.fix


def test_numpy_too_new_for_triton_36(monkeypatch):
    real = REAL_IMPORT

    class Numpy:
        __version__ = "2.4.1"

    class Triton:
        __version__ = "3.6.0"

    fakes = {"numpy": Numpy, "triton": Triton}
    r = _only(doctor.check_numpy, monkeypatch, _import=lambda n: fakes.get(n) or real(n))
    assert r.status == doctor.FAIL and "pip install 'numpy<2.4'" in r.fix
    # the same numpy with triton 3.7 or newer is fine
    fakes["triton"] = type("T", (), {"__version__": "3.7.1"})
    assert doctor.check_numpy().status == doctor.OK


def test_numpy_missing(monkeypatch):
    r = _only(doctor.check_numpy, monkeypatch, _import=_without("numpy"))
    assert r.status == doctor.FAIL and "pip install 'numpy<2.4'" in r.fix


def test_triton_missing_on_linux(monkeypatch):
    r = _only(
        doctor.check_triton,
        monkeypatch,
        _import=_without("triton"),
        _platform=lambda: ("Linux", "x86_64"),
    )
    assert r.status == doctor.FAIL and "pip install triton==3.7.1" in r.fix


def test_triton_missing_on_a_mac_is_a_warning(monkeypatch):
    r = _only(
        doctor.check_triton,
        monkeypatch,
        _import=_without("triton"),
        _platform=lambda: ("Darwin", "arm64"),
    )
    assert r.status == doctor.WARN and "WSL2" in r.fix and "Darwin arm64" in r.detail


def test_triton_interpreter_broken_by_numpy(monkeypatch):
    message = "TypeError: only 0-dimensional arrays can be converted to Python scalars"
    real = REAL_IMPORT
    numpy = type("N", (), {"__version__": "2.4.0"})
    triton = type("T", (), {"__version__": "3.6.0"})  # 3.7 and newer take numpy 2.4
    r = _only(
        doctor.check_triton,
        monkeypatch,
        _interpreter_probe=lambda: (False, message),
        _import=lambda n: {"numpy": numpy, "triton": triton}.get(n) or real(n),
    )
    if r.detail.endswith("compiling for the GPU"):
        pytest.skip("a GPU is visible: the interpreter is not probed")
    assert r.status == doctor.FAIL and message in r.detail and "'numpy<2.4'" in r.fix


def test_triton_interpreter_broken_otherwise(monkeypatch):
    r = _only(
        doctor.check_triton, monkeypatch, _interpreter_probe=lambda: (False, "ImportError: x")
    )
    if r.detail.endswith("compiling for the GPU"):
        pytest.skip("a GPU is visible: the interpreter is not probed")
    assert r.status == doctor.FAIL and "--force-reinstall" in r.fix


def test_interpreter_probe_runs_a_kernel():
    worked, message = doctor._interpreter_probe()
    assert worked, message


def test_package_missing(monkeypatch):
    r = _only(doctor.check_package, monkeypatch, _import=_without("dsv3lite"))
    assert r.status == doctor.FAIL and "pip install -e ." in r.fix


def test_package_from_elsewhere(monkeypatch):
    real = REAL_IMPORT
    other = type("P", (), {"__version__": "0.0.1", "__file__": "/elsewhere/dsv3lite/__init__.py"})
    r = _only(
        doctor.check_package, monkeypatch, _import=lambda n: other if n == "dsv3lite" else real(n)
    )
    assert r.status == doctor.WARN and "/elsewhere" in r.detail and "pip install -e ." in r.fix


def test_ipykernel_missing(monkeypatch):
    r = _only(doctor.check_jupyter, monkeypatch, _import=_without("ipykernel"))
    assert r.status == doctor.FAIL and "make lab" in r.fix


def test_no_python3_kernel(monkeypatch):
    r = _only(doctor.check_jupyter, monkeypatch, _kernelspecs=lambda: {"julia-1.10": ["julia"]})
    assert r.status == doctor.FAIL and "-m ipykernel install --user" in r.fix


def test_python3_kernel_of_another_interpreter(monkeypatch):
    specs = {"python3": ["/usr/bin/python3.8", "-m", "ipykernel_launcher", "-f", "{cf}"]}
    r = _only(doctor.check_jupyter, monkeypatch, _kernelspecs=lambda: specs)
    assert r.status == doctor.WARN and "/usr/bin/python3.8" in r.detail
    assert "ipykernel install --user --name dsv3lite" in r.fix


def test_jupyterlab_missing(monkeypatch):
    r = _only(doctor.check_jupyter, monkeypatch, _import=_without("jupyterlab"))
    assert r.status == doctor.WARN and "make lab" in r.fix


def test_widgets_missing(monkeypatch):
    r = _only(doctor.check_widgets, monkeypatch, _import=_without("ipywidgets"))
    assert r.status == doctor.FAIL and "pip install ipywidgets" in r.fix
    r = _only(doctor.check_widgets, monkeypatch, _import=_without("jupyterlab_widgets"))
    assert r.status == doctor.WARN and "jupyterlab_widgets" in r.fix


@pytest.mark.parametrize(
    "memory, status",
    [((8 * doctor.GiB, 16 * doctor.GiB), "OK"), ((3 * doctor.GiB, 8 * doctor.GiB), "WARN")]
    + [((doctor.GiB // 2, 8 * doctor.GiB), "FAIL"), (None, "WARN")],
)
def test_memory(monkeypatch, memory, status):
    r = _only(doctor.check_memory, monkeypatch, _memory=lambda: memory)
    assert r.status == status
    if status != "OK":
        assert r.fix


def test_memory_reads_this_machine():
    memory = doctor._memory()
    if memory is None:
        pytest.skip("no psutil and no /proc/meminfo here")
    available, total = memory
    assert 0 < available <= total


@pytest.mark.parametrize("free, status", [(50, "OK"), (2, "WARN"), (0.5, "FAIL")])
def test_disk(monkeypatch, free, status):
    r = _only(doctor.check_disk, monkeypatch, _free_disk=lambda path: int(free * doctor.GiB))
    assert r.status == status
    if status != "OK":
        assert "make clean" in r.fix


def test_busy_cpu(monkeypatch):
    r = _only(doctor.check_cpu, monkeypatch, _load=lambda: (5.2, 2))
    assert r.status == doctor.WARN and "FACILITATOR.md" in r.detail and "close them" in r.fix
    assert _only(doctor.check_cpu, monkeypatch, _load=lambda: (0.3, 2)).status == doctor.OK


def test_loopback_blocked(monkeypatch):
    def blocked():
        raise PermissionError("Operation not permitted")

    r = _only(doctor.check_loopback, monkeypatch, _loopback=blocked)
    assert r.status == doctor.FAIL and "allow local TCP connections" in r.fix


def test_version_parsing():
    assert doctor._version("2.13.0+cpu") == (2, 13, 0)
    assert doctor._version("2.4.0rc1") == (2, 4, 0)
    assert doctor._version("3.6.0") >= (3, 6)
    assert doctor._version("garbage") == ()
