"""What a run reports: the step log line every log_interval steps, the evaluation line, metrics.jsonl, the progress
bar, and, when asked for, TensorBoard (tensorboard=True, sologpt/board.py) and out_dir/loss.png (plot=True,
sologpt/plots.py). The log line has a fixed format:

    step    500 | loss 1.2345 | lr 9.00e-04 |   123,456 tok/s |    12.3 ms/step | mfu 45.6% | mem 1.23 GiB

MFU (model FLOPs utilisation, Chowdhery et al. 2022) on known GPUs, float16's loss scale when there is one, and
peak memory (allocated GPU memory, or the process's peak RSS on a CPU). Reading the summed loss at a log step is
the only time the CPU waits for the GPU outside evaluation.

metrics.jsonl holds one JSON object per line, each with its "kind" and "iter" (the step):
- "step": every log line (loss: the mean training loss since the previous one, lr, tokens, tokens_per_s,
  ms_per_step, mfu on known GPUs, memory, time_s);
- "eval": every evaluation (its metrics as they are, lr, tokens, time_s, memory);
- "rollback": the spike guard put the last good state back (sologpt/guard.py);
- "stop": why the run ended: "max_iters", "patience", "SIGINT", "SIGTERM" or "diverged".
Lines without a kind (runs of earlier versions) are evaluations; sologpt.rundir.read_metrics reads the file back. Every loss the
monitor reads goes to the run's guard, which stops a diverged run or rolls a spike back (sologpt/guard.py).
"""

import json
import math
import sys
import time

import torch
from tqdm import tqdm

from sologpt import board, plots
from sologpt.configurator import UserError
from sologpt.distributed import Dist
from sologpt.hardware import peak_flops, peak_memory_gib


class Monitor:
    def __init__(self, cfg, model, scaler, run, guard, iter_num, t_start, d=Dist(), sample=None):
        self.cfg, self.scaler, self.run, self.guard, self.t_start = cfg, scaler, run, guard, t_start
        self.tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
        self.flops_per_step = model.flops_per_token(cfg.block_size) * self.tokens_per_step
        self.peak = peak_flops(cfg.device)
        self.d = d  # several ranks: losses averaged over them, MFU against all their GPUs, metrics written by rank 0
        if self.peak:
            self.peak *= d.world
        # disable=None: tqdm draws the bar only on a terminal, so logs written to files stay one line per event
        self.bar = tqdm(total=cfg.max_iters, initial=iter_num, disable=None if cfg.progress and d.main else True,
                        dynamic_ncols=True, unit="step", file=sys.stdout)
        # TensorBoard (rank 0 writes; every rank draws the sample, which under FSDP is a collective)
        self.board = board.Board(run.path, iter_num) if cfg.tensorboard and d.main else None
        self.sample = sample if cfg.tensorboard and cfg.sample_tokens > 0 and cfg.task == "lm" else None
        self.loss_sum = torch.zeros((), device=cfg.device)  # summed on the device; read only at log steps
        self.steps, self.t_log = 0, time.perf_counter()

    def log(self, line):
        self.bar.write(line)

    def step(self, iter_num, loss, lr):
        """After each optimizer step: add its loss; every log_interval steps print the log line."""
        self.loss_sum += loss
        self.steps += 1
        self.bar.update(1)
        if iter_num % self.cfg.log_interval == 0:
            self.report(iter_num, lr)

    def report(self, iter_num, lr):
        """The log line of the steps since the last one (none: nothing to say), its metrics record, and the guard's
        verdict on its loss."""
        if not self.steps:
            return
        loss_val = self.d.mean(self.loss_sum.item()) / self.steps
        dt = (time.perf_counter() - self.t_log) / self.steps
        record = {"loss": loss_val, "lr": lr, "tokens_per_s": round(self.tokens_per_step / dt, 1),
                  "ms_per_step": round(dt * 1000, 3)}
        line = (f"step {iter_num:>6} | loss {loss_val:.4f} | lr {lr:.2e} | "
                f"{self.tokens_per_step / dt:>9,.0f} tok/s | {dt * 1000:7.1f} ms/step")
        if self.scaler.is_enabled():
            line += f" | scale {self.scaler.get_scale():.0f}, {self.scaler.skipped_steps} skipped steps"
        if self.peak:
            record["mfu"] = round(self.flops_per_step / dt / self.peak, 4)
            line += f" | mfu {100 * record['mfu']:4.1f}%"
        alloc, reserved = peak_memory_gib(self.cfg.device)
        self.log(line + (f" | mem {alloc:.2f} GiB (reserved {reserved:.2f})" if self.cfg.device.startswith("cuda")
                         else f" | mem {alloc:.2f} GiB"))
        self.record("step", iter_num, record)
        self.verdict(iter_num, self.guard.loss(iter_num, loss_val))
        self.restart()

    def restart(self):
        """Start a new timing window (after an evaluation, which must not count as step time)."""
        self.loss_sum.zero_()
        self.steps, self.t_log = 0, time.perf_counter()

    def evaluation(self, iter_num, metrics, improved, lr):
        """Print an evaluation's metrics as they are, record them (metrics.jsonl, TensorBoard with a sample, the
        plot), and pass them to the guard (patience, the spike guard's good state)."""
        self.log(f"eval {iter_num:>6} | " + " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items())
                 + (" | best" if improved else ""))
        self.record("eval", iter_num, {**metrics, "lr": lr})
        text = self.sample() if self.sample is not None else None
        if self.board is not None and text is not None:
            self.board.text("sample", text, iter_num)
        if self.cfg.plot and self.d.main:
            plots.draw([self.run.path], self.run.path / "loss.png")
        self.verdict(iter_num, self.guard.evaluation(iter_num, metrics, improved))
        self.restart()

    def record(self, kind, iter_num, values):
        """One line of metrics.jsonl (rank 0), with the tokens, time and memory so far; TensorBoard's scalars."""
        alloc, reserved = peak_memory_gib(self.cfg.device)
        record = {"kind": kind, "iter": iter_num, **values}
        if kind in ("step", "eval"):
            record.update(tokens=iter_num * self.tokens_per_step, time_s=round(time.time() - self.t_start, 3),
                          peak_alloc_gib=round(alloc, 3), peak_reserved_gib=round(reserved, 3))
            if self.scaler.is_enabled():
                record.update(loss_scale=self.scaler.get_scale(), skipped_steps=self.scaler.skipped_steps)
        if not self.d.main:
            return
        record = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in record.items()}  # JSON
        with open(self.run.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None:
            self.board.scalars(kind, iter_num, record)

    def verdict(self, iter_num, event):
        """The guard's answer: None (go on), a rollback it made (printed and recorded), early stopping (printed; the
        loop ends the run), or a diverged run (recorded, then the one-line error)."""
        if event is None:
            return
        message, kind = event.pop("message"), event.pop("kind")
        if kind == "stop" and event["reason"] == "diverged":
            self.end(iter_num, "diverged")
            raise UserError(message)
        self.log(message)
        if kind == "rollback":
            self.record(kind, iter_num, event)

    def end(self, iter_num, reason, message=None, best_val_loss=None):
        """Why the run ended, printed (message) and recorded as a "stop" line of metrics.jsonl."""
        if message:
            self.log(message)
        self.record("stop", iter_num, {"reason": reason, "best_val_loss": best_val_loss,
                                       "time_s": round(time.time() - self.t_start, 3)})

    def close(self):
        self.bar.close()
        if self.board is not None:
            self.board.close()
            self.board = None
