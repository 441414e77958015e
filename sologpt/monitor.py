"""What a run reports: the step log line every log_interval steps, the evaluation line, metrics.jsonl (one JSON
object per evaluation), the progress bar, and the divergence check. The log line has a fixed format:

    step    500 | loss 1.2345 | lr 9.00e-04 |   123,456 tok/s |    12.3 ms/step | mfu 45.6% | mem 1.23 GiB

MFU (model FLOPs utilisation, Chowdhery et al. 2022) on known GPUs, float16's loss scale when there is one, and
peak memory (allocated GPU memory, or the process's peak RSS on a CPU). Reading the summed loss at a log step is
the only time the CPU waits for the GPU outside evaluation.
"""

import json
import math
import sys
import time

import torch
from tqdm import tqdm

from sologpt.configurator import UserError
from sologpt.distributed import Dist
from sologpt.hardware import peak_flops, peak_memory_gib


class Monitor:
    def __init__(self, cfg, model, scaler, metrics_path, ckpt_path, iter_num, t_start, d=Dist()):
        self.cfg, self.scaler, self.metrics_path, self.ckpt_path, self.t_start = cfg, scaler, metrics_path, ckpt_path, \
            t_start
        self.tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
        self.flops_per_step = model.flops_per_token(cfg.block_size) * self.tokens_per_step
        self.peak = peak_flops(cfg.device)
        self.d = d  # several ranks: losses averaged over them, MFU against all their GPUs, metrics written by rank 0
        if self.peak:
            self.peak *= d.world
        # disable=None: tqdm draws the bar only on a terminal, so logs written to files stay one line per event
        self.bar = tqdm(total=cfg.max_iters, initial=iter_num, disable=None if cfg.progress and d.main else True,
                        dynamic_ncols=True, unit="step", file=sys.stdout)
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
        """The log line of the steps since the last one (none: nothing to say)."""
        if not self.steps:
            return
        loss_val = self.d.mean(self.loss_sum.item()) / self.steps
        if not math.isfinite(loss_val):
            raise UserError(f"loss is {loss_val} at step {iter_num}: training diverged; lower learning_rate, raise "
                            f"warmup_iters or use dtype=bfloat16. {self.ckpt_path} was not overwritten")
        dt = (time.perf_counter() - self.t_log) / self.steps
        line = (f"step {iter_num:>6} | loss {loss_val:.4f} | lr {lr:.2e} | "
                f"{self.tokens_per_step / dt:>9,.0f} tok/s | {dt * 1000:7.1f} ms/step")
        if self.scaler.is_enabled():
            line += f" | scale {self.scaler.get_scale():.0f}, {self.scaler.skipped_steps} skipped steps"
        if self.peak:
            line += f" | mfu {100 * self.flops_per_step / dt / self.peak:4.1f}%"
        alloc, reserved = peak_memory_gib(self.cfg.device)
        self.log(line + (f" | mem {alloc:.2f} GiB (reserved {reserved:.2f})" if self.cfg.device.startswith("cuda")
                         else f" | mem {alloc:.2f} GiB"))
        self.restart()

    def restart(self):
        """Start a new timing window (after an evaluation, which must not count as step time)."""
        self.loss_sum.zero_()
        self.steps, self.t_log = 0, time.perf_counter()

    def evaluation(self, iter_num, metrics, improved, lr):
        """Print an evaluation's metrics as they are and append them to metrics.jsonl."""
        if not all(math.isfinite(v) for v in metrics.values()):
            raise UserError(f"evaluation gave {metrics} at step {iter_num}: training diverged; lower learning_rate "
                            f"or raise warmup_iters. {self.ckpt_path} was not overwritten")
        self.log(f"eval {iter_num:>6} | " + " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items())
                 + (" | best" if improved else ""))
        alloc, reserved = peak_memory_gib(self.cfg.device)
        record = {"iter": iter_num, **metrics, "lr": lr, "tokens": iter_num * self.tokens_per_step,
                  "time_s": round(time.time() - self.t_start, 3), "peak_alloc_gib": round(alloc, 3),
                  "peak_reserved_gib": round(reserved, 3)}
        if self.scaler.is_enabled():
            record.update(loss_scale=self.scaler.get_scale(), skipped_steps=self.scaler.skipped_steps)
        if self.d.main:
            try:
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise UserError(f"cannot append to {self.metrics_path}: {e.strerror or e}: free disk space or check "
                                f"that the folder is writable; {self.ckpt_path} was not overwritten")
        self.restart()

    def close(self):
        self.bar.close()
