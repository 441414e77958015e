"""sologpt/monitor.py and what it writes: metrics.jsonl's records at every log line and evaluation (read back by
read_metrics, old files too), the plot (train.py plot=True and python -m tools.plot: a real PNG), TensorBoard's
event file (its scalars and the sample text, read back with TensorBoard's own reader), and the one-line errors when
the optional packages are missing."""

import json

import pytest

from conftest import error_of, run_train
from sologpt import board, plots
from sologpt.rundir import read_metrics
from tools import plot as plot_tool
import train as train_mod


def png_size(path):
    """(width, height) of a PNG, read by Pillow (matplotlib's own dependency): the file must be a whole image."""
    from PIL import Image
    with Image.open(path) as im:
        im.verify()  # a truncated or corrupt file raises here
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_metrics_record_every_log_line_and_evaluation(tiny_flags, tmp_path):
    run_train(tiny_flags + ["--max_iters=6", "--log_interval=2", "--eval_interval=3"])
    records = read_metrics(tmp_path / "out", kind=None)
    assert [(r["kind"], r["iter"]) for r in records] == [("eval", 0), ("step", 2), ("eval", 3), ("step", 4),
                                                         ("step", 6), ("eval", 6), ("stop", 6)]
    step = records[1]
    for key in ("loss", "lr", "tokens", "tokens_per_s", "ms_per_step", "time_s", "peak_alloc_gib"):
        assert isinstance(step[key], float | int) and step[key] > 0, key
    assert step["tokens"] == 2 * 8 * 32 and "mfu" not in step  # MFU only on known GPUs
    assert records[-1]["reason"] == "max_iters" and records[-1]["best_val_loss"] == records[-2]["val_loss"]
    # a metrics.jsonl of an earlier version (evaluations without a kind) reads as evaluations
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"iter": 0, "val_loss": 4.0}) + "\n")
    assert read_metrics(old) == [{"iter": 0, "val_loss": 4.0}] and read_metrics(old, "step") == []


def test_plot_during_training_and_the_plot_tool(tiny_flags, tmp_path, capsys):
    run_train(tiny_flags + ["--max_iters=3", "--plot=True"])
    png = tmp_path / "out" / "loss.png"
    assert png_size(png) == (1200, 640)  # 15 x 8 inches at 80 dpi
    assert not list((tmp_path / "out").glob("*.tmp"))
    run_train(tiny_flags + ["--max_iters=4", f"--out_dir={tmp_path / 'b'}", "--learning_rate=1e-3"])
    # two runs, one of them from an earlier version (no step records: the evaluations' train loss is drawn)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(x) for x in lines if json.loads(x)["kind"] == "eval"]
    (tmp_path / "b" / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in e.items() if k != "kind"})
                                                          + "\n" for e in evals))
    plot_tool.main([str(tmp_path / "out"), str(tmp_path / "b"), f"--out={tmp_path / 'both.png'}",
                    "--labels=new,old"])
    assert "wrote" in capsys.readouterr().out and png_size(tmp_path / "both.png") == (1200, 640)
    steps, evals, _ = plots.curves(tmp_path / "b")
    assert [s["loss"] for s in steps] == [e["train_loss"] for e in evals]
    err = error_of(plot_tool.main, [str(tmp_path)], capsys)
    assert "has no metrics.jsonl" in err
    assert "2 names for 1 runs" in error_of(plot_tool.main, [str(tmp_path / "b"), "--labels=a,b"], capsys)


def test_tensorboard_holds_the_scalars_and_the_sample(tiny_flags, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_train(tiny_flags + ["--max_iters=6", "--eval_interval=3", "--log_interval=2", "--tensorboard=True",
                            "--sample_tokens=12"])
    events = EventAccumulator(str(tmp_path / "out"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    evals = {m["iter"]: m for m in read_metrics(tmp_path / "out")}
    val = {e.step: e.value for e in events.Scalars("eval/val_loss")}
    assert val.keys() == evals.keys() and all(val[i] == pytest.approx(evals[i]["val_loss"]) for i in val)
    steps = {m["iter"]: m["loss"] for m in read_metrics(tmp_path / "out", "step")}
    assert {e.step: pytest.approx(e.value) for e in events.Scalars("step/loss")} == steps
    assert {e.step for e in events.Scalars("step/tokens_per_s")} == {2, 4, 6}
    samples = events.Tensors("sample/text_summary")
    assert [s.step for s in samples] == [0, 3, 6]
    assert all(len(s.tensor_proto.string_val[0].decode()) >= 12 for s in samples)


def test_the_plot_tool_without_matplotlib_is_one_line(trained, monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import matplotlib.figure raises ImportError
    assert "needs matplotlib: pip install matplotlib" in error_of(plot_tool.main, [str(trained)], capsys)


def test_missing_optional_packages_stop_in_one_line_at_start(tiny_flags, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(board, "find_spec", lambda name: None)
    monkeypatch.setattr(plots, "find_spec", lambda name: None)
    err = error_of(train_mod.main, tiny_flags + ["--tensorboard=True"], capsys)
    assert "tensorboard=True needs the tensorboard package: pip install tensorboard" in err
    assert "plot=True needs matplotlib: pip install matplotlib" in error_of(train_mod.main, tiny_flags +
                                                                            ["--plot=True"], capsys)
    assert not (tmp_path / "out").exists()  # before any work
