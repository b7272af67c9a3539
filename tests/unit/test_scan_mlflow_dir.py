"""The static answer to "what would mlflow.pyfunc.load_model run?" (ckpt_stage.scan.mlflow_dir), on real
MLflow model directories written by the stock client and on hand-edited hostile copies of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckpt_stage.config import Settings
from ckpt_stage.domain import ReasonCode
from ckpt_stage.scan import scan_version
from ckpt_stage.scan.mlflow_dir import module_allowed
from tests.corpus.model_code_cases import CASES, PKG, copy, edit_mlmodel


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def scan(d: Path, env: dict[str, str] | None = None):
    return scan_version(d, files(d), Settings.from_env(env or {}))


def blocking(result) -> set[str]:
    return {f.code.value for f in result.findings if f.blocking}


@pytest.fixture
def dirs(tmp_path):
    work, canary = tmp_path / "work", tmp_path / "canary"
    work.mkdir()
    canary.mkdir()
    return work, canary


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case, dirs):
    work, canary = dirs
    built = case.build(work, canary)
    result = scan(built.paths[0], built.env)
    codes = blocking(result)
    detail = [f.to_dict() for f in result.findings]
    if case.verdict == "pass":
        assert codes == set(), detail
    else:
        assert set(case.codes) <= codes, detail
        texts = [f"{f.message} {f.hint}" for f in result.findings if f.code and f.code.value in case.codes]
        for needle in case.message_contains:
            assert any(needle in t for t in texts), (needle, texts)
    assert list(canary.iterdir()) == []


def test_allowed_code_folder_travels_to_the_worker(dirs):
    d = copy("code_paths", dirs[0])
    result = scan(d, {"CKPT_STAGE_ALLOW_MODEL_CODE": PKG})
    assert result.model_code == {"code": [PKG]}
    assert blocking(result) == set()


def test_code_paths_model_without_opt_in_is_one_clear_reason(dirs):
    """The pickle's "imports mypkg.net.Net" is the same cause as the code folder: one UNSAFE_CODE."""
    d = copy("code_paths", dirs[0])
    result = scan(d)
    assert [f.code for f in result.findings if f.blocking] == [ReasonCode.UNSAFE_CODE]
    only = result.findings[0]
    assert "mypkg.net.Net" in only.message and "CKPT_STAGE_ALLOW_MODEL_CODE=mypkg" in only.hint
    assert "state_dict" in only.hint and "pt2" in only.hint
    assert result.model_code == {}


def test_pickle_module_allowlist_is_not_opened_for_other_versions(dirs):
    """The code folder's modules join the pickle allowlist only for the version that carries them: a bare
    pickle importing mypkg is still UNSAFE_PICKLE under the same settings."""
    import pickletools  # noqa: F401  (documents that the bytes below are a hand-written pickle)

    work = dirs[0]
    (work / "model.pkl").write_bytes(b"\x80\x02cmypkg.net\nNet\n)\x81.")
    result = scan_version(work, ["model.pkl"], Settings.from_env({"CKPT_STAGE_ALLOW_MODEL_CODE": PKG}))
    assert ReasonCode.UNSAFE_PICKLE in {f.code for f in result.findings}


def test_custom_pyfunc_pickle_findings_fold_into_the_code_reason(dirs):
    d = copy("pyfunc", dirs[0])
    result = scan(d)
    pyfunc = [f for f in result.findings if "custom Python model" in f.message]
    assert len(pyfunc) == 1 and pyfunc[0].code is ReasonCode.UNSAFE_CODE
    assert "python_model.pkl" in pyfunc[0].message and "mypkg.pf.Echo" in pyfunc[0].message
    assert ReasonCode.UNSAFE_PICKLE not in {f.code for f in result.findings}, [f.to_dict() for f in result.findings]


def test_custom_pyfunc_with_its_code_allowed_is_an_unsupported_flavor(dirs):
    d = copy("pyfunc", dirs[0])
    result = scan(d, {"CKPT_STAGE_ALLOW_MODEL_CODE": PKG})
    assert [f.code for f in result.findings if f.blocking] == [ReasonCode.UNSUPPORTED_FORMAT], \
        [f.to_dict() for f in result.findings]
    assert "outside the pickle allowlist" not in result.findings[0].message


def test_custom_pyfunc_confusion_findings_are_not_folded(dirs):
    """A scanner-confusion finding on python_model.pkl keeps its own UNSAFE_PICKLE."""
    from tests.corpus.static_cases import os_system_pickle

    d = copy("pyfunc", dirs[0])
    good = (d / "python_model.pkl").read_bytes()
    (d / "python_model.pkl").write_bytes(good + os_system_pickle("touch /nonexistent/x"))
    result = scan(d, {"CKPT_STAGE_ALLOW_MODEL_CODE": PKG})
    assert ReasonCode.UNSAFE_CODE in {f.code for f in result.findings}


def test_real_sklearn_model(dirs):
    sklearn = pytest.importorskip("sklearn.linear_model")
    import mlflow.sklearn
    import numpy as np

    d = dirs[0] / "sk"
    model = sklearn.LogisticRegression().fit(np.array([[0.0], [1.0]]), [0, 1])
    mlflow.sklearn.save_model(model, str(d), pip_requirements=["scikit-learn"])
    result = scan(d)
    assert [f.code for f in result.findings if f.blocking] == [ReasonCode.UNSUPPORTED_FORMAT], [
        f.to_dict() for f in result.findings]
    assert result.findings[0].message.startswith("sklearn flavor")


def test_unknown_stock_like_loader_is_code(dirs):
    """'mlflow.<x>' without a matching flavor is not a stock flavor: it is a loader the version chose."""
    d = copy("pickle", dirs[0])

    def edit(doc: dict) -> None:
        doc["flavors"]["python_function"]["loader_module"] = "mlflow.sklearn"
    edit_mlmodel(d, edit)
    assert ReasonCode.UNSAFE_CODE in {f.code for f in scan(d).findings}


def test_operator_may_allow_another_loader(dirs):
    d = copy("pickle", dirs[0])

    def edit(doc: dict) -> None:
        doc["flavors"]["python_function"]["loader_module"] = "company.loaders.torch"
    edit_mlmodel(d, edit)
    assert ReasonCode.UNSAFE_CODE in {f.code for f in scan(d).findings}
    allowed = scan(d, {"CKPT_STAGE_ALLOW_LOADER_MODULES": "company.loaders.torch"})
    assert blocking(allowed) == set()


def test_pickle_module_info_must_be_exact(dirs):
    d = copy("pickle", dirs[0])
    (d / "data" / "pickle_module_info.txt").write_text("mlflow.pytorch.pickle_module\n")
    assert ReasonCode.UNSAFE_CODE in {f.code for f in scan(d).findings}
    (d / "data" / "pickle_module_info.txt").unlink()
    assert ReasonCode.ARTIFACT_MISSING in {f.code for f in scan(d).findings}


def test_pickle_module_info_under_pyfunc_data_without_pytorch_flavor(dirs):
    """pyfunc's mlflow.pytorch loader reads python_function.data even when no pytorch flavor exists."""
    d = copy("pickle", dirs[0])
    (d / "data" / "pickle_module_info.txt").write_text("antigravity")

    def edit(doc: dict) -> None:
        del doc["flavors"]["pytorch"]
    edit_mlmodel(d, edit)
    found = scan(d).findings
    assert any(f.code is ReasonCode.UNSAFE_CODE and "antigravity" in f.message for f in found)


def test_huge_config_is_refused_not_skipped(dirs):
    d = dirs[0]
    (d / "config.json").write_bytes(b'{"pad": "' + b"x" * (5 << 20) + b'", "auto_map": {"AutoModel": "m.M"}}')
    result = scan_version(d, ["config.json"], Settings())
    assert ReasonCode.UNSAFE_CODE in {f.code for f in result.findings}


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_too_deep_config_is_refused_not_skipped(dirs, name):
    """json.loads stops at the interpreter's recursion limit; a serving host with a higher one reads the
    auto_map (a "repo--module.Class" needs no file in the version), so the scan may not skip the file."""
    d = dirs[0]
    deep = b"[" * 100_000 + b"]" * 100_000
    (d / name).write_bytes(b'{"auto_map": {"AutoTokenizer": ["evil/repo--tok.Tok", null]}, "x": ' + deep + b"}")
    result = scan_version(d, [name], Settings())
    refused = [f for f in result.findings if f.code is ReasonCode.UNSAFE_CODE]
    assert refused and "nests too deeply" in refused[0].message and "save_pretrained" in refused[0].hint


def test_config_without_auto_map_is_metadata(dirs):
    d = copy("pt2", dirs[0])
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert blocking(scan(d)) == set()


def test_hf_remote_code_allowed_by_module(dirs):
    from tests.corpus.model_code_cases import h_auto_map_bare

    built = h_auto_map_bare(*dirs)
    d = built.paths[0]
    assert ReasonCode.UNSAFE_CODE in {f.code for f in scan(d).findings}
    allowed = scan(d, {"CKPT_STAGE_ALLOW_MODEL_CODE": "configuration_evil,modeling_evil"})
    assert ReasonCode.UNSAFE_CODE not in {f.code for f in allowed.findings}, [f.to_dict() for f in allowed.findings]


@pytest.mark.parametrize(("module", "allow", "ok"), [
    ("mypkg", "mypkg", True),
    ("mypkg.net", "mypkg", True),
    ("mypkg", "mypkg.net", False),
    ("mypkgx", "mypkg", False),
    ("yaml", "yaml", False),
    ("os", "os", False),
    ("torch", "torch", False),
    ("json", "json", False),
    ("my-pkg", "my-pkg", False),
    ("mypkg", "", False),
])
def test_module_allowed(module, allow, ok):
    assert module_allowed(module, Settings(allow_model_code=tuple(filter(None, [allow])))) is ok


def test_settings_from_env():
    s = Settings.from_env({"CKPT_STAGE_ALLOW_MODEL_CODE": "a, b.c", "CKPT_STAGE_ALLOW_LOADER_MODULES": "x.y"})
    assert s.allow_model_code == ("a", "b.c")
    # mlflow.transformers is a default since the stage validates the transformers flavor.
    assert s.allow_loader_modules == ("mlflow.pytorch", "mlflow.transformers", "x.y")
    assert Settings.from_env({}).allow_loader_modules == ("mlflow.pytorch", "mlflow.transformers")


@pytest.mark.parametrize("path", ["helper.py", "code/mypkg/net.py", "x.cpython-311-x86_64-linux-gnu.so", "m.pyc"])
@pytest.mark.parametrize("mlflow_dir", [True, False])
def test_python_files_are_code_not_checkpoints_nor_metadata(path, mlflow_dir, tmp_path):
    from ckpt_stage.scan.sniff import claims_checkpoint

    assert claims_checkpoint(path, mlflow_dir=mlflow_dir) is False
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / path).write_text("print('hi')\n")
    result = scan_version(tmp_path, [path], Settings())
    assert [f.code for f in result.findings] == [ReasonCode.UNSAFE_CODE]


# -- other flavors and recorded versions -------------------------------------------------------------


def test_a_version_of_only_another_flavor_is_a_fact_the_policy_can_skip(dirs):
    from ckpt_stage.domain import Verdict
    from ckpt_stage.policy import OTHER_FLAVOR, decide
    from tests.corpus.model_code_cases import b_sklearn_by_hand

    d = b_sklearn_by_hand(*dirs).paths[0]
    result = scan(d)
    assert result.other_flavor == "sklearn"
    (finding,) = [f for f in result.findings if f.blocking]
    assert finding.code is ReasonCode.UNSUPPORTED_FORMAT and finding.detail["kind"] == OTHER_FLAVOR
    assert "CKPT_STAGE_OTHER_FLAVORS=skip" in finding.hint
    assert decide(result.findings, Settings()).verdict is Verdict.QUARANTINE
    assert decide(result.findings, Settings(other_flavors="skip")).verdict is Verdict.SKIP
    # The libraries it recorded are known without loading anything.
    assert result.recorded == {"python": "3.11.7", "mlflow": "3.17.2"}


def test_a_pytorch_model_next_to_an_sklearn_one_is_not_skipped(dirs):
    """"Only of another flavor": a version that also holds a PyTorch MLflow model is judged as one."""
    import shutil

    from ckpt_stage.domain import Verdict
    from ckpt_stage.policy import decide
    from tests.corpus.model_code_cases import b_sklearn_by_hand

    work, _ = dirs
    sk = b_sklearn_by_hand(*dirs).paths[0]
    both = work / "both"
    shutil.copytree(sk, both / "sk")
    copy("pickle", both / "torch")
    result = scan(both)
    assert result.other_flavor == ""
    assert not any(f.detail.get("kind") for f in result.findings if f.blocking)
    assert decide(result.findings, Settings(other_flavors="skip")).verdict is Verdict.QUARANTINE


def test_recorded_versions_from_mlmodel_and_requirements():
    from ckpt_stage.scan.mlflow_dir import recorded_versions

    doc = {"mlflow_version": "3.17.2", "flavors": {"pytorch": {"pytorch_version": "2.13.0+cpu"},
                                                   "python_function": {"python_version": "3.11.7"}}}
    assert recorded_versions(doc) == {"python": "3.11.7", "torch": "2.13.0+cpu", "mlflow": "3.17.2"}
    # MLmodel wins; requirements.txt fills in what it lacks (mlflow-skinny counts as mlflow).
    assert recorded_versions({"flavors": {"pytorch": {}}}, "numpy==2.0\ntorch == 2.12.1 ; python_version>'3'\n"
                             "mlflow-skinny==3.16.0\n") == {"torch": "2.12.1", "mlflow": "3.16.0"}
    # Whatever the file says, only short scalar text comes out.
    assert recorded_versions(["not", "a", "mapping"]) == {}
    assert recorded_versions({"mlflow_version": True, "flavors": {"pytorch": {"pytorch_version": ["x"]}}}) == {}
    assert len(recorded_versions({"mlflow_version": "9" * 500})["mlflow"]) == 64


def test_skops_untrusted_types_are_reported_for_an_sklearn_model(dirs):
    """MLflow 3.17 saves sklearn with skops: the report names the types skops.io.load would refuse
    (skops.io.get_untrusted_types reads the schema and builds nothing), as information, not a verdict."""
    sklearn = pytest.importorskip("sklearn.preprocessing")
    pytest.importorskip("skops.io")
    import operator

    import mlflow.sklearn

    d = dirs[0] / "sk-ft"
    mlflow.sklearn.save_model(sklearn.FunctionTransformer(func=operator.neg), str(d), pip_requirements=["scikit-learn"],
                              skops_trusted_types=["_operator.neg"])  # MLflow refuses to save it otherwise
    result = scan(d)
    assert [f.code for f in result.findings if f.blocking] == [ReasonCode.UNSUPPORTED_FORMAT]
    (note,) = [f for f in result.findings if f.detail.get("untrusted_types")]
    assert note.code is None and not note.blocking and "_operator.neg" in note.message
    assert note.file == "model.skops"
    # A broken skops file is noted, never a crash of the scan.
    (d / "model.skops").write_bytes(b"PK\x05\x06" + b"\x00" * 18)
    notes = [f.message for f in scan(d).findings if f.code is None]
    assert any("could not read" in m for m in notes), notes
