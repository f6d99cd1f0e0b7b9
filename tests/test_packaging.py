"""Packaging: the wheel, a fresh virtualenv, and the declared requirements.

The wheel is built from a copy of the checkout (so the test writes nothing
into it), installed with `pip --no-deps` into a new virtualenv whose only
other packages are this environment's pinned ones (requirements/
constraints.txt, reached through a `.pth` file), and used from outside the
checkout: `import keras_moe`, a launcher's console script, a tiny upcycle.
Separately, the core library runs with every package outside
`install_requires` made unimportable (tests/requirements_guard.py).
"""

import email.parser
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in")
PACKAGES = ("keras_moe", "apps", "export")
LAUNCHERS = {
    "keras-moe-demo": "apps/demo.py",
    "keras-moe-evaluate": "apps/evaluate.py",
    "keras-moe-reproduce": "apps/reproduce.py",
    "keras-moe-train": "apps/train.py",
    "keras-moe-train-dense": "apps/train_dense.py",
    "keras-moe-train-vlm": "apps/train_vlm.py",
    "keras-moe-upcycle": "apps/upcycle.py",
    "keras-moe-export": "export/export_saved_model.py",
}
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")


def _run(args, cwd, timeout=600):
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _check_ok(process):
    assert process.returncode == 0, (
        f"{process.args} exited with {process.returncode}:\n"
        f"{process.stdout[-3000:]}\n{process.stderr[-3000:]}"
    )
    return process


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Builds the wheel from a copy of the checkout's sources."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "BUILD")
    for name in PACKAGES:
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    dist = work / "dist"
    _check_ok(
        _run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps"]
            + ["--no-build-isolation", "--quiet", "-w", dist, "."],
            cwd=source,
        )
    )
    (path,) = dist.glob("keras_moe-*.whl")
    return path


def _pins():
    pins = {}
    for line in (ROOT / "requirements/constraints.txt").read_text().split("\n"):
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[Requirement(name).name.lower().replace("_", "-")] = version
    return pins


def test_wheel_installs_only_the_keras_moe_namespace(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = email.parser.Parser().parsestr(
            archive.read(
                next(n for n in names if n.endswith(".dist-info/METADATA"))
            ).decode()
        )
        entry_points = archive.read(
            next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        ).decode()
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {
        "keras_moe"
    }
    # The launchers and the export package, mapped under keras_moe.
    for path in LAUNCHERS.values():
        assert f"keras_moe/{path}" in names
    assert "keras_moe/export/native/run_saved_model.c" in names
    # Launchers that need the checkout's benchmarks/ are not shipped.
    assert "keras_moe/apps/benchmark.py" not in names
    assert not any(n.startswith("keras_moe/benchmarks") for n in names)

    import keras_moe

    assert metadata["Version"] == keras_moe.__version__
    for script, path in LAUNCHERS.items():
        module = "keras_moe." + path[: -len(".py")].replace("/", ".")
        assert f"{script} = {module}:cli" in entry_points
        source = (ROOT / path).read_text()
        assert "\ndef cli():" in source and "\n    cli()\n" in source


def test_requirements_are_ranges_that_the_pinned_versions_satisfy(wheel):
    with zipfile.ZipFile(wheel) as archive:
        metadata = email.parser.Parser().parsestr(
            archive.read(
                next(
                    n
                    for n in archive.namelist()
                    if n.endswith(".dist-info/METADATA")
                )
            ).decode()
        )
    pins = _pins()
    requirements = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    assert len(requirements) > 10
    for requirement in requirements:
        key = requirement.name.lower().replace("_", "-")
        # No exact pins in the package: those live in constraints.txt.
        assert not any(
            s.operator == "==" for s in requirement.specifier
        ), requirement
        assert key in pins, f"{requirement} has no pin in constraints.txt"
        assert requirement.specifier.contains(
            pins[key], prereleases=True
        ), f"the pinned {key}=={pins[key]} is outside {requirement}"
    core = {r.name for r in requirements if r.marker is None}
    assert {"tensorflow", "keras"} <= core
    # Optional stacks stay out of the core install.
    assert not core & {"torch", "transformers", "keras-hub", "matplotlib"}
    demo = {
        r.name
        for r in requirements
        if r.marker is not None and r.marker.evaluate({"extra": "demo"})
    }
    assert demo == {"tensorflow-serving-api", "matplotlib"}


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory):
    """A new virtualenv with the wheel installed, outside the checkout."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    _check_ok(
        _run([sys._base_executable, "-m", "venv", "--without-pip", venv], ROOT)
    )
    python = venv / "bin" / "python"
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = _check_ok(_run([python, "-c", where], venv)).stdout.strip()
    # The pinned dependencies: this environment's site-packages, read but
    # not processed (its .pth files, the checkout's editable install among
    # them, stay inactive in the new environment).
    deps = sysconfig.get_paths()["purelib"]
    pathlib.Path(purelib, "pinned_dependencies.pth").write_text(deps + "\n")
    _check_ok(
        _run(
            [sys.executable, "-m", "pip", "--python", python, "install"]
            + ["--no-deps", "--no-index", "--quiet", wheel],
            venv,
        )
    )
    return venv


def test_installed_package_imports_outside_the_checkout(fresh_venv, tmp_path):
    code = (
        "import importlib.util, keras_moe\n"
        "print(keras_moe.__file__)\n"
        "print(importlib.util.find_spec('apps'), "
        "importlib.util.find_spec('export'))\n"
        "import numpy as np\n"
        "from keras_moe.apps import flags_util\n"
        "from keras_moe.export import saved_model\n"
        "from keras_moe.models import ViT\n"
        "dense = ViT(image_size=8, patch_size=4, num_channels=1, "
        "model_dim=16, num_heads=2, hidden_dim=32, num_layers=2, "
        "num_classes=3)\n"
        "rng = np.random.default_rng(0)\n"
        "for w in dense.weights:\n"
        "    w.assign(w.numpy() + rng.normal(0, 0.3, w.shape))\n"
        "moe = keras_moe.upcycle(dense, num_experts=4)\n"
        "x = rng.random((2, 8, 8, 1), 'float32')\n"
        "print(len(keras_moe.moe_layers(moe)), "
        "float(np.abs(moe.predict(x, verbose=0)).sum()) > 0)\n"
    )
    out = _check_ok(
        _run([fresh_venv / "bin" / "python", "-c", code], tmp_path)
    ).stdout.splitlines()
    assert out[0] == str(
        fresh_venv / "lib" / f"python{sys.version_info.major}."
        f"{sys.version_info.minor}" / "site-packages/keras_moe/__init__.py"
    )
    # No generic top-level names installed.
    assert out[1] == "None None"
    assert out[2] == "1 True"


@pytest.mark.parametrize(
    "script, flag",
    [("keras-moe-reproduce", "--experiment"), ("keras-moe-export", "--model")],
)
def test_console_scripts_run_outside_the_checkout(
    fresh_venv, tmp_path, script, flag
):
    process = _run([fresh_venv / "bin" / script, "--helpfull"], tmp_path)
    # absl exits with status 1 after printing the help.
    assert process.returncode in (0, 1), process.stderr[-2000:]
    assert flag in process.stdout + process.stderr
    assert "Traceback" not in process.stderr


def test_core_library_runs_with_only_install_requires(tmp_path):
    code = (
        "import numpy as np, keras, keras_moe\n"
        "from keras_moe import checkpoints, distribution, training\n"
        "from tests.tiny_models import tiny_vit, images\n"
        "dense = tiny_vit()\n"
        "moe = keras_moe.upcycle(dense, num_experts=4)\n"
        "moe.compile(optimizer='adam', loss=keras.losses."
        "SparseCategoricalCrossentropy(from_logits=True))\n"
        "x = images(8)\n"
        "y = np.arange(8) % 3\n"
        "moe.fit(x, y, epochs=1, batch_size=4, verbose=0)\n"
        "import sys\n"
        "for name in ('torch', 'keras_hub', 'matplotlib', 'sentencepiece', "
        "'tensorflow_serving', 'tensorflow_text'):\n"
        "    assert name not in sys.modules, name\n"
        "print('ok')\n"
    )
    process = _check_ok(
        _run(
            [sys.executable, ROOT / "tests/requirements_guard.py"]
            + ["--extras=", "-c", code],
            ROOT,
        )
    )
    assert process.stdout.strip().splitlines()[-1] == "ok"


def test_the_guard_blocks_what_is_not_declared():
    process = _run(
        [sys.executable, ROOT / "tests/requirements_guard.py"]
        + ["--extras=", "-c", "import matplotlib"],
        ROOT,
    )
    assert process.returncode == 1
    assert "'matplotlib' is not a declared requirement" in process.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
