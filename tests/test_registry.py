"""The model registry: lineage, fingerprints, guarded promotion, rollback, CLI."""

from __future__ import annotations

import hashlib
import json

import pytest

from rlhfkit.models.registry import Registry, RegistryError, cli, fingerprint


def _reg(tmp_path):
    reg = Registry(tmp_path / "reg")
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    reg.register(tmp_path / "m0", "r0", round=0, metrics={"gold": {"mean": 0.10, "lo": 0.0, "hi": 0.2}},
                 config={"lr": 1e-4}, data_files=[data], seed=3)
    reg.register(tmp_path / "m1", "r1", parent="r0", round=1, metrics={"gold": 0.20})
    reg.register(tmp_path / "m2", "r2", parent="r1", round=2, metrics={"gold": 0.15})
    return reg, data


def test_register_records_lineage_and_provenance(tmp_path):
    reg, data = _reg(tmp_path)
    e = reg.get("r0")
    assert e["data"][str(data)] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert e["seed"] == 3 and e["config"] == {"lr": 1e-4} and e["rlhfkit"]
    assert "torch" in e["libraries"] and "git_commit" in e
    assert reg.get("r2")["parent"] == "r1"
    assert [x["id"] for x in reg.list()] == ["r0", "r1", "r2"]
    with pytest.raises(RegistryError, match="already registered"):
        reg.register(tmp_path / "m0", "r0")
    with pytest.raises(RegistryError, match="no model 'nope'"):
        reg.register(tmp_path / "m3", "r3", parent="nope")
    assert not list((tmp_path / "reg").rglob("*.tmp"))  # atomic writes leave no temporaries


def test_fingerprint_folder_changes_with_content(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text("x")
    f1 = fingerprint(d)
    (d / "a.txt").write_text("y")
    assert fingerprint(d) != f1
    with pytest.raises(RegistryError, match="no such file"):
        fingerprint(tmp_path / "missing")


def test_promote_guard_and_rollback(tmp_path):
    reg, _ = _reg(tmp_path)
    assert reg.promoted() is None
    reg.promote("r0")
    reg.promote("r1")
    with pytest.raises(RegistryError, match="worse than the promoted 'r1'"):
        reg.promote("r2")
    assert reg.promoted()["id"] == "r1"
    reg.promote("r2", force=True, reason="testing")
    assert reg.promoted()["id"] == "r2"
    assert reg.rollback()["id"] == "r1"
    assert reg.rollback()["id"] == "r0"
    with pytest.raises(RegistryError, match="first promoted"):
        reg.rollback()
    actions = [(h["action"], h["id"], h["forced"]) for h in reg.history()]
    assert actions == [("promote", "r0", False), ("promote", "r1", False), ("promote", "r2", True),
                       ("rollback", "r1", False), ("rollback", "r0", False)]


def test_promote_without_metric_refused(tmp_path):
    reg, _ = _reg(tmp_path)
    reg.register(tmp_path / "x", "nometric")
    reg.promote("r0")
    with pytest.raises(RegistryError, match="no 'gold' metric"):
        reg.promote("nometric")
    with pytest.raises(RegistryError, match="nothing to roll back"):
        Registry(tmp_path / "empty").rollback()


def test_cli(tmp_path, capsys):
    reg, _ = _reg(tmp_path)
    root = str(tmp_path / "reg")
    assert cli(["--registry", root, "promote", "r1"]) == 0
    assert cli(["--registry", root, "list"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.split()[:2] in (["*", "r1"], ["r1"]))
    assert line.startswith("*") and "0.2" in line
    assert cli(["--registry", root, "promote", "r2"]) == 2
    assert "worse" in capsys.readouterr().err
    assert cli(["--registry", root, "show"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == "r1"
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"gold": {"mean": 0.5}}))
    assert cli(["--registry", root, "register", str(tmp_path / "m4"), "--id", "r4", "--parent", "r2",
                "--eval_json", str(ev)]) == 0
    assert cli(["--registry", root, "promote", "r4"]) == 0
    assert cli(["--registry", root, "rollback"]) == 0
    assert "now r1" in capsys.readouterr().out


def test_aliases_point_at_models_and_are_in_the_history(tmp_path, capsys):
    reg, _ = _reg(tmp_path)
    reg.promote("r0")
    reg.set_alias("candidate", "r1", reason="round 1 canary")
    assert reg.aliases() == {"candidate": "r1"}
    assert reg.resolve("candidate")["id"] == "r1"
    assert reg.resolve("production")["id"] == "r0" and reg.resolve("r2")["id"] == "r2"
    event = reg.history()[-1]
    assert (event["action"], event["alias"], event["id"], event["reason"]) == ("alias", "candidate", "r1", "round 1 canary")
    assert reg.promoted()["id"] == "r0"  # an alias never moves the promoted model
    with pytest.raises(RegistryError, match="promote or rollback"):
        reg.set_alias("production", "r2")
    with pytest.raises(RegistryError, match="no model 'nope'"):
        reg.set_alias("candidate", "nope")
    with pytest.raises(RegistryError, match="letters"):
        reg.set_alias("1 bad", "r1")
    assert cli(["--registry", str(tmp_path / "reg"), "alias", "candidate", "--remove"]) == 0
    assert reg.aliases() == {} and reg.history()[-1]["action"] == "unalias"
    assert cli(["--registry", str(tmp_path / "reg"), "alias", "candidate"]) == 2  # no id, no --remove
    assert "rlhfkit models alias NAME ID" in capsys.readouterr().err


def test_server_resolves_a_registry_alias(tmp_path):
    from rlhfkit.serving.server import resolve_model

    reg, _ = _reg(tmp_path)
    (tmp_path / "m1").mkdir()
    reg.set_alias("candidate", "r1")
    name, path, registry_id = resolve_model("candidate", str(tmp_path / "reg"))
    assert (name, registry_id) == ("candidate", "r1") and path.endswith("m1")
