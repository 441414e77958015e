"""python -m tools.search: the space from config files and flags (lists, distributions, one-line errors), the
samplers (grid, seeded random draws, Optuna's when installed), the median pruning rule, and whole searches of tiny
train.py trials: a bad trial pruned with its checkpoint kept, the ranked table and best.py, and a search killed with
SIGKILL that resumes its running trial and keeps the finished ones."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, error_of
from sologpt.checkpoint import read as read_checkpoint
from sologpt.configurator import load_config
from sologpt.rundir import read_metrics
from tools import search
import train as train_mod


def test_the_space_from_files_and_flags(tmp_path, capsys):
    f = tmp_path / "space.py"
    f.write_text("from tools.search import loguniform, randint\nlearning_rate = loguniform(1e-4, 1e-2)\n"
                 "n_layer = randint(1, 3)\nbatch_size = [8, 16]\nmax_iters = 50\nout_dir = 'ignored'\ntrials = 4\n")
    cfg, fixed, space = search.load([str(f), "--dropout=[0.0, 0.1]", "--max_iters=60", "--search_dir=s"])
    assert (cfg.trials, cfg.search_dir) == (4, "s") and fixed == {"max_iters": 60}
    assert list(space) == ["learning_rate", "n_layer", "batch_size", "dropout"] and space["dropout"] == [0.0, 0.1]
    assert search.resolve_sampler(cfg, space) in ("optuna", "random")  # optuna when installed
    draws = [search.random_params(space, 0, k) for k in range(3)]
    assert draws == [search.random_params(space, 0, k) for k in range(3)]  # reproducible: a resume draws the same
    assert len({d["learning_rate"] for d in draws}) == 3
    assert all(1e-4 <= d["learning_rate"] <= 1e-2 and d["n_layer"] in (1, 2, 3) for d in draws)
    g = search.grid({"a": [1, 2], "b": ["x", "y", "z"]})
    assert g[:4] == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"}, {"a": 2, "b": "x"}] and len(g) == 6

    def err(argv):
        return error_of(search.main, argv, capsys)

    assert "did you mean 'learning_rate'" in err(["--learnin_rate=[1e-3]"])
    assert "batch_size=1.5" in err(["--batch_size=[8, 1.5]"])
    assert "nothing to search" in err(["--max_iters=5"])
    assert "needs a number of trials" in err(["--learning_rate=[1e-3]", "--dropout=[0.0]", "--sampler=random"])
    assert "needs lists only" in err([str(f), "--sampler=grid"])
    (tmp_path / "bad.py").write_text("from tools.search import uniform\ndropout = uniform(0.5, 0.1)\n")
    assert "low must be below high" in err([str(tmp_path / "bad.py")])


def test_optuna_is_never_required(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(search, "have_optuna", lambda: False)
    cfg, _, space = search.load(["--learning_rate=[1e-3]", "--trials=2"])
    space["dropout"] = search.uniform(0.0, 0.2)
    assert search.resolve_sampler(cfg, space) == "random"
    assert "needs optuna: pip install optuna" in error_of(search.main, ["--learning_rate=[1e-3]", "--trials=2",
                                                                        "--sampler=optuna"], capsys)


def test_optuna_sampler_asks_within_the_space_and_learns_the_history():
    pytest.importorskip("optuna")
    space = {"learning_rate": search.loguniform(1e-4, 1e-2), "n_layer": search.randint(1, 4),
             "norm": ["layernorm", "rmsnorm"]}
    past = [{"status": "done", "params": {"learning_rate": 1e-3, "n_layer": 2, "norm": "rmsnorm"},
             "best_val_loss": 1.5, "curve": {"0": 4.0, "10": 1.5}},
            {"status": "pruned", "params": {"learning_rate": 1e-2, "n_layer": 1, "norm": "layernorm"},
             "best_val_loss": 3.0, "curve": {"0": 4.0, "10": 3.0}}]
    sampler = search.OptunaSampler(space, 0, past)
    assert len(sampler.study.trials) == 2
    p = sampler.ask()
    assert 1e-4 <= p["learning_rate"] <= 1e-2 and p["n_layer"] in range(1, 5) and p["norm"] in space["norm"]
    sampler.tell({"status": "done", "params": p, "best_val_loss": 2.0, "curve": {"0": 4.0, "10": 2.0}})
    assert [t.state.name for t in sampler.study.trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert sampler.study.best_value == 1.5


def test_a_sigterm_that_lands_after_the_last_step_leaves_a_whole_trial(tmp_path):
    # the prune's SIGTERM came after train.py's loop had ended (its stop line says max_iters): killed by the signal
    # on its way out, but every step and evaluation is there, so the trial is done, not pruned
    (tmp_path / "train.log").write_text("")
    (tmp_path / "metrics.jsonl").write_text('{"kind": "eval", "iter": 5, "val_loss": 3.0}\n'
                                            '{"kind": "eval", "iter": 10, "val_loss": 2.5}\n'
                                            '{"kind": "stop", "iter": 10, "reason": "max_iters"}\n')
    t = {"out_dir": str(tmp_path), "pruned": "val loss 3.0000 at step 5 is worse than the median"}
    search.finish(t, -15)
    assert t["status"] == "done" and "pruned" not in t and t["best_val_loss"] == 2.5
    # stopped by the SIGTERM inside its loop: pruned
    (tmp_path / "metrics.jsonl").write_text('{"kind": "eval", "iter": 5, "val_loss": 3.0}\n'
                                            '{"kind": "stop", "iter": 6, "reason": "SIGTERM"}\n')
    t = {"out_dir": str(tmp_path), "pruned": "val loss 3.0000 at step 5 is worse than the median"}
    search.finish(t, 143)
    assert t["status"] == "pruned" and t["pruned"].startswith("val loss")


def test_the_median_rule():
    finished = [{"curve": {"10": 2.0, "20": 1.5}}, {"curve": {"10": 3.0}}, {"curve": {"10": 2.5, "20": 1.9}}]
    assert search.median_rule(2.6, 10, finished, startup=2).startswith("val loss 2.6000 at step 10 is worse than "
                                                                      "the median 2.5000 of 3 finished trials")
    assert search.median_rule(2.4, 10, finished, startup=2) == ""
    assert search.median_rule(1.8, 20, finished, startup=2) != ""  # median of 1.5 and 1.9 is 1.7
    assert search.median_rule(9.0, 20, finished, startup=3) == ""  # too few finished trials reached step 20


def test_a_grid_search_prunes_ranks_and_writes_the_best_config(tiny_flags, tmp_path, capsys, monkeypatch):
    root = tmp_path / "s"
    # the pruned trial must still be running when its step-5 evaluation is read: a quick poll, many steps left
    monkeypatch.setattr(search, "POLL_S", 0.02)
    search.main(tiny_flags + ["--learning_rate=[3e-3, 0.0]", "--max_iters=150", "--eval_interval=5", "--min_lr=0",
                              "--log_interval=10", f"--search_dir={root}", "--prune_startup=1"])
    out = capsys.readouterr().out
    state = json.loads((root / "search.json").read_text())
    a, b = state["trials"]
    assert (a["status"], b["status"]) == ("done", "pruned") and a["params"] == {"learning_rate": 3e-3}
    # the learning-rate-0 trial is worse than the first one at step 5: stopped soon after, its checkpoint kept
    assert b["pruned"].startswith("val loss") and "at step 5 is worse than the median" in b["pruned"]
    assert 5 <= read_checkpoint(root / "trial-001" / "ckpt.pt")["iter_num"] < 150
    assert read_metrics(root / "trial-001", "stop")[-1]["reason"] == "SIGTERM"
    assert read_metrics(root / "trial-000", "stop")[-1]["reason"] == "max_iters"
    assert a["best_val_loss"] == min(m["val_loss"] for m in read_metrics(root / "trial-000"))
    lines = out.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("rank"))):]
    assert table[1].split()[:3] == ["1", "trial-000", "0.003"] and table[2].split()[1] == "trial-001"
    assert (root / "results.md").read_text().startswith("| rank | trial | learning_rate | best val |")
    assert len((root / "results.csv").read_text().splitlines()) == 3
    best = load_config(train_mod.TrainConfig, [str(root / "best.py")])  # a config file train.py reads as it is
    assert best.learning_rate == 3e-3 and best.max_iters == 150 and best.out_dir == str(root / "best")
    # every trial is an ordinary run: its own config file trains it again
    trial = load_config(train_mod.TrainConfig, [str(root / "trial-001" / "trial.py")])
    assert trial.learning_rate == 0.0 and trial.out_dir == str(root / "trial-001")


def test_a_killed_search_resumes_its_running_trial(tiny_flags, tmp_path, capsys):
    """Trial 0 (20 steps) finishes; the search is killed with SIGKILL while trial 1 (100 steps) runs. The same command
    continues: trial 0 is kept as it was, trial 1 resumes from the checkpoint its SIGTERM left."""
    root = tmp_path / "k"
    argv = tiny_flags + ["--max_iters=[20, 100]", "--eval_interval=25", "--log_interval=25", f"--search_dir={root}",
                         "--prune=False"]
    proc = subprocess.Popen([sys.executable, "-m", "tools.search", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not any(m["iter"] >= 25 for m in search.evaluations(root / "trial-001")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: the trial gets SIGTERM from the kernel (prctl)
    proc.wait()
    log = root / "trial-001" / "train.log"
    while time.time() < deadline and "SIGTERM: saved" not in log.read_text():  # the trial saves and exits
        time.sleep(0.1)
    state = json.loads((root / "search.json").read_text())
    assert [t["status"] for t in state["trials"]] == ["done", "running"]
    search.main(argv)
    out = capsys.readouterr().out
    assert "trial 1/2" not in out and "trial 2/2" in out and "(resuming)" in out
    assert "resuming from" in log.read_text() and (root / "trial-000" / "train.log").read_text().count("done in") == 1
    state = json.loads((root / "search.json").read_text())
    assert [t["status"] for t in state["trials"]] == ["done", "done"]
    assert read_checkpoint(root / "trial-001" / "ckpt.pt")["iter_num"] == 100
    search.main(argv)  # all done: nothing runs again, the table is printed again
    assert "trial 2/2" not in capsys.readouterr().out
    err = error_of(search.main, [a if not a.startswith("--max_iters") else "--max_iters=[20, 50]" for a in argv],
                   capsys)
    assert "holds a search with other space" in err
