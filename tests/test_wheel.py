"""The distribution as a user gets it: build the wheel from a copy of the sources, install it into a fresh
virtual environment outside the repository (its dependencies come from this environment, read-only, with
no network), and run the README's Python examples and the CLI from there."""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).parents[1]
SOURCES = ["pyproject.toml", "README.md", "textrl", "agents", "envs", "experiments"]

CHECK = r'''
import importlib, json, pkgutil, re, sys
from importlib import resources
from pathlib import Path

import textrl

where = Path(textrl.__file__).resolve()
modules = [m.name for m in pkgutil.walk_packages(textrl.__path__, "textrl.") if not m.name.endswith("__main__")]
for name in modules:
    importlib.import_module(name)
data = resources.files("textrl.experiments")
packaged = sorted(str(p.relative_to(Path(str(data)))) for p in Path(str(data)).rglob("*.yaml"))
readme = Path(sys.argv[1]).read_text()
results = {}
for marker in ("python-quickstart", "python-custom-reward"):
    code = re.search(rf"<!-- {marker} -->\n```python\n(.*?)```", readme, re.S).group(1)
    namespace = {"__name__": marker}
    exec(compile(code, "README.md", "exec"), namespace)
    r = namespace["result"]
    results[marker] = [r.before.mean, r.before.se, r.after.mean, r.after.se]
print(json.dumps({"file": str(where), "modules": modules, "packaged": packaged, "results": results}))
'''


def _venv_with_wheel(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: building writes build/ and *.egg-info next to the sources
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, src / name)
    offline = {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, env=offline, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("textrl_gym-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    # the dependencies (torch, transformers …) from this environment; its editable textrl is not seen
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, env=offline)
    return venv


def test_the_wheel_installs_outside_the_repo_and_runs_the_readme_examples(tmp_path):
    venv = _venv_with_wheel(tmp_path)
    work = tmp_path / "user"
    work.mkdir()
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([str(venv / "bin" / "python"), "-c", CHECK, str(REPO / "README.md")], cwd=work, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["file"].startswith(str(venv))  # the installed copy, not the repository's
    assert {"textrl.api", "textrl.lm.run", "textrl.parallel.learner", "textrl.agents.ppo",
            "textrl.envs.text_gen"} <= set(report["modules"])
    assert {"default.yaml", "accelerate/multi_gpu.yaml", "presets/CartPole-v1.yaml"} <= set(report["packaged"])
    for before, before_se, after, after_se in report["results"].values():
        assert after > before + 2 * max(before_se, after_se)  # both examples learn from the installed package
    assert (work / "letters-model" / "config.json").is_file()
    cli = subprocess.run([str(venv / "bin" / "python"), "-m", "textrl", "train", "--help"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and "bare `textrl train`: textrl/Cheerful-v0" in " ".join(cli.stdout.split())
