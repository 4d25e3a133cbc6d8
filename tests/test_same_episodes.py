"""bench/same_episodes.py, which regen_episodes (bench/lib.sh) uses to accept a rebuilt calibration directory."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import same_episodes  # noqa: E402


def manifest(**changes):
    eps = [{"id": f"mt10/reach/calib/s0/{i}", "calls": 30 + i, "success": i % 2 == 0, "sha256": f"{i:064x}"}
           for i in range(3)]
    m = {"weights_sha256": "a" * 64, "episodes": eps}
    for k, v in changes.items():
        if k == "weights_sha256":
            m[k] = v
        else:
            eps[1][k] = v
    return m


def test_the_same_episodes_pass_and_every_recorded_difference_is_named():
    assert same_episodes.difference(manifest(), manifest()) is None
    assert "policy weights" in same_episodes.difference(manifest(weights_sha256="b" * 64), manifest())
    for key, value in (("id", "mt10/push/calib/s0/1"), ("calls", 99), ("success", True), ("sha256", "f" * 64)):
        assert f": {key} " in same_episodes.difference(manifest(**{key: value}), manifest())
    shorter = manifest()
    shorter["episodes"].pop()
    assert "2 episodes against 3" in same_episodes.difference(shorter, manifest())


def test_observation_digests_are_compared_only_where_both_manifests_record_them():
    old = manifest()
    for e in old["episodes"]:
        del e["sha256"]
    assert same_episodes.difference(manifest(sha256="f" * 64), old) is None
    del old["weights_sha256"]
    assert same_episodes.difference(manifest(), old) is None


def test_main_exits_1_on_a_difference(tmp_path, capsys):
    import json
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(manifest(calls=1)))
    b.write_text(json.dumps(manifest()))
    assert same_episodes.main([str(a), str(a)]) == 0
    assert same_episodes.main([str(a), str(b)]) == 1
    assert "calls 1 against 31" in capsys.readouterr().err
