"""Hyperparameter search: every trial a plain train.py run in its own out_dir, pruned early when it falls behind.

    python -m tools.search config/small.py config/search_small.py                 # the grid the file describes
    python -m tools.search config/small.py config/search_small.py --trials=6 --sampler=random
    python -m tools.search config/small.py --learning_rate="[2e-3, 5e-3]" --search_dir=lr  # a grid from flags

The config files and flags are train.py's, read in order, plus the search settings below (SearchConfig). A field
given a list is searched over its values (a grid; with distributions, a random choice); a field given a
distribution (loguniform, uniform, randint from this module: `from tools.search import loguniform`) is sampled;
every other value is the same for all trials. The sampler: the whole grid when every searched field is a list,
else random draws (reproducible from search_seed), or Optuna's TPE sampler when optuna is installed (never
required: sampler="random" does without).

Trial k runs `python train.py search_dir/trial-k/trial.py` (that config file holds all its settings), so every
trial can be resumed, sampled and exported like any run; its output goes to trial-k/train.log. While it runs, the
search reads its metrics.jsonl: when the val loss at an evaluation is worse than the median of the finished trials
at the same step (Optuna's MedianPruner rule, after prune_startup finished trials and prune_warmup evaluations), it
sends the trial SIGTERM, which train.py answers by saving a checkpoint and exiting. At the end the ranked table is
printed and written (results.md, results.csv) and the best trial's settings become a config file, best.py
(python train.py search_dir/best.py --max_iters=... trains it for longer).

The search's state (every trial's settings, status and curve) is in search_dir/search.json, written at each change:
run the same command again after a Ctrl-C, a kill or a crash and it goes on, resuming the trial that was running
(train.py --init_from=resume) and keeping the finished ones. A killed search's running trial gets SIGTERM on
Linux (it saves and stops), so it never runs on unwatched.
"""

import ast
import ctypes
import difflib
import itertools
import json
import math
import os
import random
import runpy
import signal
import statistics
import subprocess
import sys
import time
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import train
from sologpt import checkpoint, rundir
from sologpt.configurator import UserError, check_type
from tools import runs

POLL_S = 0.5  # how often a running trial's metrics.jsonl is read


@dataclass
class SearchConfig:
    search_dir: str = "search"  # the search's folder: search.json, trial-000/ ..., results.md, best.py
    trials: int = 0  # trials to run; 0: the whole grid (a random or Optuna search needs a number)
    sampler: str = "auto"  # "grid", "random", "optuna" (its TPE sampler), or "auto": grid if every searched field
    # is a list, else optuna when it is installed, else random
    search_seed: int = 0  # seeds the random draws and Optuna's sampler (train.py's seed stays the trials' own)
    prune: bool = True  # stop trials whose val loss falls behind the median of the finished ones at a step
    prune_startup: int = 2  # finished trials needed before any trial is pruned
    prune_warmup: int = 1  # evaluations of a trial that are never pruned (1: not its step-0 evaluation)


# ---- the search space ---------------------------------------------------------------------------------------------

class Distribution:
    def __init__(self, low, high):
        self.low, self.high = low, high
        if not low < high:
            raise UserError(f"{self!r}: low must be below high")

    def __repr__(self):
        return f"{type(self).__name__}({self.low!r}, {self.high!r})"


class loguniform(Distribution):
    """Floats between low and high, uniform in log space (learning rates, weight decay)."""

    def __init__(self, low, high):
        super().__init__(low, high)
        if low <= 0:
            raise UserError(f"{self!r}: low must be above 0 for a log scale")

    def sample(self, rng):
        return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))


class uniform(Distribution):
    """Floats between low and high."""

    def sample(self, rng):
        return rng.uniform(self.low, self.high)


class randint(Distribution):
    """Integers from low to high, both included."""

    def sample(self, rng):
        return rng.randint(self.low, self.high)


def load(argv):
    """(SearchConfig, fixed train.py settings, space) from config files and --key=value flags, in order. The space
    maps each searched field to its list of values or its distribution; every value is type-checked."""
    search, fixed, space = SearchConfig(), {}, {}
    train_hints, search_hints = typing.get_type_hints(train.TrainConfig), typing.get_type_hints(SearchConfig)

    def put(key, value, where):
        if key in search_hints:
            setattr(search, key, check_type(key, value, search_hints[key], where))
            return
        if key not in train_hints:
            close = difflib.get_close_matches(key, [*train_hints, *search_hints], n=1)
            raise UserError(f"unknown key {key!r} in {where}" + (f": did you mean {close[0]!r}?" if close else ""))
        if key == "out_dir":  # a recipe's out_dir: each trial has its own, search_dir/trial-k
            return
        space.pop(key, None)
        fixed.pop(key, None)
        if isinstance(value, list):
            if not value:
                raise UserError(f"{key}=[] in {where}: give at least one value")
            space[key] = [check_type(key, v, train_hints[key], where) for v in value]
        elif isinstance(value, Distribution):
            check_type(key, value.sample(random.Random(0)), train_hints[key], f"{where} ({value!r})")
            space[key] = value
        else:
            fixed[key] = check_type(key, value, train_hints[key], where)

    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise UserError(f"flag {arg!r} has no value: write --{key}=VALUE")
            try:
                value = ast.literal_eval(text)  # "3" -> 3, "[1e-3, 3e-3]" -> a list; anything else: the text
            except (ValueError, SyntaxError):
                value = text
            hint = train_hints.get(key, search_hints.get(key))
            if hint is str and not isinstance(value, str) and not isinstance(value, list):
                value = text  # --search_dir=1 means the string "1"
            put(key, value, f"flag {arg!r}")
            continue
        if not Path(arg).is_file():
            raise UserError(f"config file {arg} does not exist: check the path (config files live in config/)")
        try:
            names = runpy.run_path(arg)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"config file {arg} failed: {type(e).__name__}: {e}")
        for key, value in names.items():
            if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
                continue  # helpers and imports (the distributions) are not settings
            put(key, value, f"config file {arg}")
    if not space:
        raise UserError("nothing to search: give a field a list of values (learning_rate = [1e-3, 3e-3]) or a "
                        "distribution (learning_rate = loguniform(1e-4, 1e-2))")
    if search.sampler not in ("auto", "grid", "random", "optuna"):
        raise UserError(f"sampler={search.sampler!r} is unknown: use auto, grid, random or optuna")
    for key in ("trials", "prune_startup", "prune_warmup"):
        if getattr(search, key) < 0:
            raise UserError(f"{key}={getattr(search, key)} must not be negative")
    return search, fixed, space


def describe(space):
    return {k: repr(v) for k, v in space.items()}


# ---- samplers: the settings of trial k ----------------------------------------------------------------------------

def resolve_sampler(search, space):
    grid = all(isinstance(v, list) for v in space.values())
    name = search.sampler
    if name == "auto":
        name = "grid" if grid else "optuna" if have_optuna() else "random"
    if name == "grid" and not grid:
        drawn = ", ".join(k for k, v in space.items() if not isinstance(v, list))
        raise UserError(f"sampler='grid' needs lists only, but {drawn} is a distribution: use sampler='random' or "
                        f"'optuna'")
    if name == "optuna" and not have_optuna():
        raise UserError("sampler='optuna' needs optuna: pip install optuna, or use sampler='random'")
    if name != "grid" and search.trials == 0:
        raise UserError(f"a {name} search needs a number of trials: add --trials=N")
    return name


def have_optuna():
    from importlib.util import find_spec
    return find_spec("optuna") is not None


def grid(space):
    """Every combination of the lists, the first field varying slowest."""
    keys = list(space)
    return [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]


def random_params(space, seed, k):
    """Trial k's draw: its own generator, so a resumed search draws the same trials."""
    rng = random.Random(f"{seed}-{k}")
    return {key: rng.choice(v) if isinstance(v, list) else v.sample(rng) for key, v in space.items()}


class OptunaSampler:
    """Optuna's TPE sampler through its ask-and-tell interface; the search's pruning and bookkeeping stay ours. A
    resumed search tells a new study the trials of search.json first."""

    def __init__(self, space, seed, done):
        import optuna  # optional: only with sampler "optuna" (checked before)
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        self.dists = {}
        for key, v in space.items():
            if isinstance(v, list):
                self.dists[key] = CategoricalDistribution(v)
            elif isinstance(v, randint):
                self.dists[key] = IntDistribution(v.low, v.high)
            else:
                self.dists[key] = FloatDistribution(v.low, v.high, log=isinstance(v, loguniform))
        self.study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
        self.pending = None  # the trial asked for and running
        for t in done:
            self.tell_past(t)

    def tell_past(self, t):
        state = self.optuna.trial.TrialState
        if t["status"] not in ("done", "pruned") or t.get("best_val_loss") is None:
            return
        self.study.add_trial(self.optuna.trial.create_trial(
            params=t["params"], distributions=self.dists, value=t["best_val_loss"] if t["status"] == "done" else None,
            state=state.COMPLETE if t["status"] == "done" else state.PRUNED,
            intermediate_values={int(s): v for s, v in t["curve"].items()}))

    def ask(self):
        self.pending = self.study.ask(self.dists)
        return dict(self.pending.params)

    def tell(self, t):
        """A trial's end: its curve, and its best val loss (finished), or that it was pruned or failed."""
        if self.pending is None:  # a trial a resumed search continued: Optuna never asked for it in this process
            return self.tell_past(t)
        state = self.optuna.trial.TrialState
        for step, v in t["curve"].items():
            self.pending.report(v, int(step))
        if t["status"] == "done":
            self.study.tell(self.pending, t["best_val_loss"])
        else:
            self.study.tell(self.pending, state=state.PRUNED if t["status"] == "pruned" else state.FAIL)
        self.pending = None


# ---- running one trial --------------------------------------------------------------------------------------------

def trial_config(path, out_dir, fixed, params, header):
    """A config file holding every setting of a trial (or of the best one): train.py reads it on its own."""
    lines = [f"# {line}" for line in header] + [""]
    lines += [f"{k} = {v!r}" for k, v in fixed.items()]
    lines += [f"{k} = {v!r}  # searched" for k, v in params.items()]
    lines += [f"out_dir = {str(out_dir)!r}", ""]
    _write(path, "\n".join(lines))


def _write(path, text):
    """A text file replaced in one step (a reader sees the old or the new one, never half)."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def evaluations(out_dir):
    """The evaluations in a running trial's metrics.jsonl so far (whole lines only: the trial may be writing)."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")[:-1]  # the last piece is "" or a line still being written
    records = [json.loads(line) for line in lines if line.strip()]
    return [r for r in records if r.get("kind", "eval") == "eval" and r.get("val_loss") is not None]


def die_with_parent():
    """In the trial's process, before train.py starts: SIGTERM when the search process dies (Linux prctl), so a
    killed search leaves no trial running unwatched; train.py answers it by saving and exiting."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def median_rule(value, step, finished, startup):
    """The reason to prune a trial whose val loss at this step is value, or "" (Optuna's MedianPruner rule)."""
    others = [t["curve"][str(step)] for t in finished if str(step) in t["curve"]]
    if len(others) < max(1, startup):
        return ""
    median = statistics.median(others)
    if value > median:
        return f"val loss {value:.4f} at step {step} is worse than the median {median:.4f} of {len(others)} " \
               f"finished trial{'s' if len(others) > 1 else ''}"
    return ""


class Stopped(Exception):
    """The search got SIGTERM."""


def run_trial(t, cmd, search, finished, save):
    """Run one trial to its end (or its pruning), updating t (its curve, status) and calling save() at each change.
    Returns the trial process's exit code."""
    out_dir = Path(t["out_dir"])
    with open(out_dir / "train.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        try:
            while True:
                done = proc.poll() is not None
                evals = evaluations(out_dir)
                new = [e for e in evals if str(e["iter"]) not in t["curve"]]
                for i, e in enumerate(evals):
                    t["curve"][str(e["iter"])] = e["val_loss"]
                    reason = "" if not search.prune or i < search.prune_warmup or done or t.get("pruned") else \
                        median_rule(e["val_loss"], e["iter"], finished, search.prune_startup)
                    if reason:
                        t["pruned"] = reason
                        proc.send_signal(signal.SIGTERM)  # train.py saves a checkpoint and exits
                if new:
                    save()
                if done:
                    return proc.returncode
                time.sleep(POLL_S)
        except BaseException:  # Ctrl-C or SIGTERM to the search: the trial saves and stops, resumable
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise


def finish(t, code):
    """A trial's status, best val loss and step from its exit code and metrics."""
    evals = evaluations(t["out_dir"])
    if evals:
        best = min(evals, key=lambda e: e["val_loss"])
        t["best_val_loss"], t["at_step"] = best["val_loss"], best["iter"]
        t["steps"] = max(e["iter"] for e in evals)
        t["seconds"] = evals[-1].get("time_s")
    stops = rundir.read_metrics(t["out_dir"], "stop")
    ended = code == 0 or (stops and stops[-1]["reason"] in ("max_iters", "patience"))
    if ended and t.get("pruned"):  # it finished before the SIGTERM arrived (exit 0), or the SIGTERM came after its
        t.pop("pruned")            # loop had ended (its last stop line says so): a whole trial
        code = 0
    if t.get("pruned"):
        t["status"] = "pruned"
    elif code == 0 and evals:
        t["status"] = "done"
    else:
        t["status"] = "failed"
        lines = [x for x in (Path(t["out_dir"]) / "train.log").read_text(errors="replace").splitlines() if x.strip()]
        t["pruned"] = f"exit code {code}: {lines[-1] if lines else 'no output'}"


# ---- the search ---------------------------------------------------------------------------------------------------

def results(trials, space):
    """The ranked rows: finished trials by best val loss, then pruned ones, then failed ones."""
    order = {"done": 0, "pruned": 1, "running": 2, "failed": 3}
    ranked = sorted(trials, key=lambda t: (order[t["status"]], t.get("best_val_loss") or math.inf))
    rows = []
    for rank, t in enumerate(ranked, 1):
        rows.append({"rank": rank, "trial": Path(t["out_dir"]).name, **t["params"],
                     "best val": t.get("best_val_loss"), "at step": t.get("at_step"), "steps": t.get("steps"),
                     "seconds": t.get("seconds"), "status": t["status"],
                     "note": t.get("pruned")})
    return rows, ["rank", "trial", *space, "best val", "at step", "steps", "seconds", "status", "note"]


def search(argv):
    cfg, fixed, space = load(argv)
    sampler_name = resolve_sampler(cfg, space)
    root = Path(cfg.search_dir)
    state_path = root / "search.json"
    settings = {"fixed": fixed, "space": describe(space), "sampler": sampler_name, "search_seed": cfg.search_seed}
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        for key, value in settings.items():
            if state[key] != json.loads(json.dumps(value)):
                raise UserError(f"{root} holds a search with other {key} ({state[key]} there, {value} here): run it "
                                f"with the same files and flags, or pick another --search_dir")
        print(f"continuing the search in {root}: {sum(t['status'] != 'running' for t in state['trials'])} "
              f"trials finished")
    else:
        root.mkdir(parents=True, exist_ok=True)
        state = {**settings, "trials": []}
    trials = state["trials"]
    planned = grid(space) if sampler_name == "grid" else None
    if planned is not None and cfg.trials:
        random.Random(cfg.search_seed).shuffle(planned)
        planned = planned[:cfg.trials]
    total = len(planned) if planned is not None else cfg.trials
    optuna = OptunaSampler(space, cfg.search_seed, trials) if sampler_name == "optuna" else None

    def save():
        checkpoint.write_json(state_path, state)

    def stop_on_sigterm(signum, frame):
        raise Stopped()

    old = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        for k in range(total):
            t = trials[k] if k < len(trials) else None
            if t is not None and t["status"] != "running":
                continue
            resume = False
            if t is None:
                params = planned[k] if planned is not None else optuna.ask() if optuna else \
                    random_params(space, cfg.search_seed, k)
                t = {"id": k, "out_dir": str(root / f"trial-{k:03d}"), "params": params, "status": "running",
                     "curve": {}}
                trials.append(t)
            else:  # the trial this search was running when it stopped
                out = Path(t["out_dir"])
                resume = (out / "ckpt.pt").exists() or (out / "last.pt").exists()
                if not resume:  # it saved nothing: it starts again, its curve too
                    t["curve"] = {}
                    t.pop("pruned", None)
            out_dir = Path(t["out_dir"])
            out_dir.mkdir(parents=True, exist_ok=True)
            trial_config(out_dir / "trial.py", out_dir, fixed, t["params"],
                         [f"trial {k} of the search in {root} (python -m tools.search {' '.join(argv)})"])
            save()
            cmd = [sys.executable, train.__file__, str(out_dir / "trial.py"),
                   "--init_from=resume" if resume else "--overwrite=True"]
            shown = ", ".join(f"{key}={runs.fmt(v)}" for key, v in t["params"].items())
            print(f"trial {k + 1}/{total} ({out_dir}): {shown}" + (" (resuming)" if resume else ""), flush=True)
            finished = [x for x in trials if x["status"] == "done"]
            code = run_trial(t, cmd, cfg, finished, save)
            finish(t, code)
            save()
            if optuna:
                optuna.tell(t)
            best = f"best val loss {t['best_val_loss']:.4f} at step {t['at_step']}" if "best_val_loss" in t else ""
            print(f"  {t['status']}: {best}" + (f"; {t['pruned']}" if t.get("pruned") else ""), flush=True)
    except (KeyboardInterrupt, Stopped) as e:
        save()
        name, code = ("SIGINT", 130) if isinstance(e, KeyboardInterrupt) else ("SIGTERM", 143)
        print(f"search stopped ({name}): run the same command again to continue it; {state_path} has its state",
              file=sys.stderr)
        sys.exit(code)
    finally:
        signal.signal(signal.SIGTERM, old)
    report(root, trials, space, fixed, argv)


def report(root, trials, space, fixed, argv):
    """Print the ranked table, write results.md and results.csv, and best.py from the best finished trial."""
    rows, columns = results(trials, space)
    print(runs.table(rows, columns))
    _write(root / "results.md", runs.table(rows, columns, "markdown") + "\n")
    _write(root / "results.csv", runs.table(rows, columns, "csv") + "\n")
    done = [t for t in trials if t["status"] == "done"]
    if not done:
        raise UserError(f"no trial of the search in {root} finished (see each trial's train.log)")
    best = min(done, key=lambda t: t["best_val_loss"])
    trial_config(root / "best.py", root / "best", fixed, best["params"],
                 [f"the best trial ({Path(best['out_dir']).name}, val loss {best['best_val_loss']:.4f} at step "
                  f"{best['at_step']}) of python -m tools.search {' '.join(argv)}",
                  f"train it: python train.py {root / 'best.py'} (add --max_iters=... to train longer)"])
    print(f"best: {Path(best['out_dir']).name}, val loss {best['best_val_loss']:.4f}; its settings are in "
          f"{root / 'best.py'}; the table is in {root / 'results.md'}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print("SearchConfig (settings of the search; every train.py field can be given too):")
        for f in fields(SearchConfig):
            print(f"  --{f.name}={f.default!r}")
        raise SystemExit(0)
    try:
        search(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
