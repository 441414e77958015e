"""python -m tools.runs: the table of runs shows the settings that differ and what each run reached, in text,
markdown or csv, sorted as asked, and says in one line when it is given no run."""

import json
import shutil

from conftest import error_of
from tools import runs


def fake_run(path, config, records):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_the_table_shows_differences_and_results(trained, tmp_path, capsys):
    config = json.loads((trained / "config.json").read_text())
    other = fake_run(tmp_path / "other", {**config, "learning_rate": 1e-2, "out_dir": "x", "init_from": "resume",
                                          "plot": True}, [
        {"kind": "eval", "iter": 0, "val_loss": 4.2, "tokens": 0, "time_s": 1.0},
        {"kind": "step", "iter": 10, "loss": 3.0, "tokens_per_s": 1000.0, "tokens": 2560, "time_s": 3.0},
        {"kind": "step", "iter": 20, "loss": 2.9, "tokens_per_s": 3000.0, "tokens": 5120, "time_s": 5.0},
        {"kind": "rollback", "iter": 20, "to_iter": 0},
        {"kind": "eval", "iter": 20, "val_loss": 1.5, "tokens": 5120, "time_s": 6.0},
        {"kind": "stop", "iter": 20, "reason": "SIGTERM", "time_s": 6.5}])
    old = shutil.copytree(trained, tmp_path / "old")  # an earlier version's file: evaluations without a kind
    lines = [json.loads(x) for x in (old / "metrics.jsonl").read_text().splitlines()]
    (old / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "kind"}) + "\n"
                                               for r in lines if r["kind"] == "eval"))
    runs.main([str(trained), str(other), str(old), str(tmp_path / "nothing"), "--sort=val"])
    out, err = capsys.readouterr()
    header, *rows = out.strip().splitlines()
    # learning_rate differs; out_dir, plot and init_from "resume" are no differences
    assert header.split() == ["run", "learning_rate", "best", "val", "at", "step", "steps", "tokens", "seconds",
                              "tok/s", "rollbacks", "ended"]
    assert rows[0].split()[:3] == [str(other), "0.01", "1.5000"]  # the best val loss first
    assert rows[0].split()[-5:] == ["5,120", "6.5", "2,000", "1", "SIGTERM"]  # median tok/s; the ending
    best = min(r["val_loss"] for r in lines if r["kind"] == "eval")
    assert f"{best:.4f}" in rows[1] and rows[1].split()[-1] == "done" and rows[1].split()[3] == "20"
    assert rows[2].split()[0] == str(old) and rows[2].split()[-1] == "-"  # no stop record: running or killed
    assert "not runs, left out" in err and "nothing" in err

    runs.main([str(trained), str(other), "--format=markdown", "--keys=n_layer"])
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| run | n_layer | learning_rate |") and md[1].startswith("| --- |")
    runs.main([str(trained), "--format=csv"])
    assert capsys.readouterr().out.splitlines()[0] == "run,best val,at step,steps,tokens,seconds,tok/s,ended"
    assert "no run among" in error_of(runs.main, [str(tmp_path / "nothing")], capsys)
