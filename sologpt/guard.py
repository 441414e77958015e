"""The run's guard: what happens when a loss the monitor reads is bad, or the run stops getting better. The monitor
(sologpt/monitor.py) hands it every logged training loss and every evaluation; the loop only asks it, after each
evaluation, whether to stop (guard.stop) and multiplies the learning rate by progress.lr_scale. All off by default:
then a NaN or infinite loss stops the run with one line, the last good checkpoint untouched, as it always did.

- early stopping (patience = N): N evaluations in a row without a new best val loss end the run cleanly. ckpt.pt
  keeps the best model, so it needs always_save_checkpoint=False (as the Hugging Face Trainer's early stopping
  needs load_best_model_at_end).
- the spike guard (spike_guard = True): a logged loss above spike_factor x the running mean of the earlier ones
  (an exponential moving average, 0.1 on the newest), or a NaN or infinite loss or evaluation, rolls the run back
  to the last good state: the state at the last evaluation, kept in host memory (spike_rollback = "memory"; until
  the run's first evaluation, and with "disk", the checkpoint last saved). The weights, optimizer, loss scaler
  and RNG go back exactly (sologpt/checkpoint.py's rewind). The step counter and the batch generator do not: the
  batches drawn since the good state, among them the ones that led to the spike, are skipped, and the
  learning-rate schedule and step numbers go on (the updates of those steps are dropped, as Megatron-LM's
  --skip-iters drops an iteration; PaLM restarted before a spike and skipped 200-500 batches). Each rollback can
  lower the learning rate (spike_lr_factor) and is printed and recorded in metrics.jsonl. After
  spike_max_rollbacks rollbacks in a row (no evaluation past the good state between them) the next spike stops the
  run with one line. Under torchrun every rank sees the same loss (averaged over the ranks), so all roll back
  together; FSDP is refused (its sharded state would need a sharded copy).
The guard's counters (evaluations since the best, rollbacks, the learning-rate scale, the running mean) are in
Progress, so they are checkpointed and a resumed run goes on with them.
"""

import copy
import math

import torch

from sologpt import checkpoint

EMA = 0.1  # weight of the newest logged loss in the running mean


def check(cfg):
    if cfg.patience < 0:
        raise ValueError(f"patience={cfg.patience} must not be negative (0 turns early stopping off)")
    if cfg.patience and cfg.always_save_checkpoint:
        raise ValueError(f"patience={cfg.patience} keeps the best model in ckpt.pt, which always_save_checkpoint=True "
                         f"overwrites at every evaluation: add --always_save_checkpoint=False")
    if not cfg.spike_guard:
        return
    if not (math.isfinite(cfg.spike_factor) and cfg.spike_factor > 1):
        raise ValueError(f"spike_factor={cfg.spike_factor} must be a number above 1 (a spike is a loss above "
                         f"spike_factor x the running mean)")
    if cfg.spike_max_rollbacks < 1:
        raise ValueError(f"spike_max_rollbacks={cfg.spike_max_rollbacks} must be at least 1")
    if not 0 < cfg.spike_lr_factor <= 1:
        raise ValueError(f"spike_lr_factor={cfg.spike_lr_factor} must be in (0, 1] (1 keeps the learning rate)")
    if cfg.spike_rollback not in ("memory", "disk"):
        raise ValueError(f"spike_rollback={cfg.spike_rollback!r} is unknown: use 'memory' or 'disk'")
    if cfg.eval_interval % cfg.log_interval:
        raise ValueError(f"spike_guard checks the loss at log steps and keeps the state of evaluations that follow a "
                         f"check: make eval_interval={cfg.eval_interval} a multiple of log_interval="
                         f"{cfg.log_interval}")
    if cfg.parallel == "fsdp":
        raise ValueError("spike_guard keeps a full copy of the training state, which FSDP shards: use "
                         "parallel='ddp' or spike_guard=False")


class Guard:
    def __init__(self, cfg, progress, run, state, rewind):
        """progress: the run's Progress (the guard's counters live there); run: its RunDir (the checkpoint files);
        state(): the training state dict; rewind(ckpt): put such a dict back into the live run."""
        self.cfg, self.progress, self.run, self.state, self.rewind = cfg, progress, run, state, rewind
        self.stop = ""  # why the run should end now (early stopping), else ""
        self.good, self.good_iter = None, None  # the last good state (serialized, in memory) and its step
        self.streak, self.last_rollback = 0, None  # rollbacks since the run last got past the good state

    def loss(self, it, loss):
        """A logged training loss (the mean since the last log line, the same on every rank): None to go on, or the
        event of a rollback or of a diverged run (the monitor prints and records it)."""
        mean = self.progress.loss_mean
        finite = math.isfinite(loss)
        if not self.cfg.spike_guard:
            if finite:
                return None
            return diverged(f"loss is {loss} at step {it}: training diverged; lower learning_rate, raise "
                            f"warmup_iters, use dtype=bfloat16 or spike_guard=True. {self.run.ckpt} was not "
                            f"overwritten")
        if finite and not (mean > 0 and loss > self.cfg.spike_factor * mean):
            self.progress.loss_mean = loss if mean == 0 else (1 - EMA) * mean + EMA * loss
            return None
        why = f"loss {loss:.4f} > {self.cfg.spike_factor:g} x the running mean {mean:.4f}" if finite else \
            f"loss is {loss}"
        return self.roll_back(it, why, loss=loss, mean=mean)

    def evaluation(self, it, metrics, improved):
        """After an evaluation: a non-finite one rolls back or stops, as a bad loss; a good one becomes the state to
        roll back to; patience counts the evaluations without a new best."""
        if not all(math.isfinite(v) for v in metrics.values()):
            if not self.cfg.spike_guard:
                return diverged(f"evaluation gave {metrics} at step {it}: training diverged; lower learning_rate, "
                                f"raise warmup_iters or use spike_guard=True. {self.run.ckpt} was not overwritten")
            return self.roll_back(it, f"evaluation gave {metrics}")
        if self.cfg.spike_guard and self.last_rollback != it:  # an evaluation right after a rollback is the old state
            self.streak = 0
            if self.cfg.spike_rollback == "memory":  # the checkpoint as it would be written, in host memory
                self.good, self.good_iter = host_copy(self.state(), into=self.good), it
        self.progress.evals_since_best = 0 if improved else self.progress.evals_since_best + 1
        if self.cfg.patience and self.progress.evals_since_best >= self.cfg.patience:
            self.stop = "patience"
            return {"kind": "stop", "reason": "patience",
                    "message": f"early stopping at step {it}: val loss has not improved on "
                               f"{self.progress.best_val_loss:.4f} for {self.progress.evals_since_best} evaluations "
                               f"(patience={self.cfg.patience}); {self.run.ckpt} holds the best model"}
        return None

    def roll_back(self, it, why, **values):
        """Put the last good state back (see the module docstring); the event to print and record."""
        if self.streak >= self.cfg.spike_max_rollbacks:
            return diverged(f"{why} at step {it}, after {self.streak} rollbacks in a row (spike_max_rollbacks="
                            f"{self.cfg.spike_max_rollbacks}): training keeps diverging; lower learning_rate, raise "
                            f"warmup_iters or spike_factor. {self.run.ckpt} was not overwritten")
        if self.good is not None:  # a copy of the copy: the live run must not write into the saved state
            ckpt, source = host_copy(self.good), "memory"
        else:  # no evaluation yet in this process, or spike_rollback="disk": the checkpoint last saved
            path = self.run.last if self.run.last.exists() else self.run.ckpt
            try:
                ckpt, source = checkpoint.read(path), str(path)
            except ValueError as e:
                return diverged(f"{why} at step {it}, and there is no good state to roll back to ({e})")
        self.rewind(ckpt)
        self.streak += 1
        self.last_rollback = it
        self.progress.rollbacks += 1
        self.progress.lr_scale *= self.cfg.spike_lr_factor
        lr = f"; learning rate x{self.progress.lr_scale:g} from now on" if self.cfg.spike_lr_factor < 1 else ""
        return {"kind": "rollback", "to_iter": ckpt["iter_num"], "from": source, "reason": why, **values,
                "rollbacks": self.progress.rollbacks, "lr_scale": self.progress.lr_scale,
                "message": f"spike guard: {why} at step {it}: rolled back to the state of step {ckpt['iter_num']} "
                           f"({source}), skipping the batches of steps {ckpt['iter_num'] + 1}-{it}{lr} "
                           f"(rollback {self.streak} of at most {self.cfg.spike_max_rollbacks} in a row)"}


def host_copy(state, into=None):
    """The training state with every tensor copied to host memory: into the tensors of an earlier copy of the same
    layout (`into`), so the evaluations of a run reuse one set of pinned buffers and a GPU copies at full speed
    without waiting (one synchronize at the end), or into new tensors."""
    devices = set()  # the CUDA devices copied from, to wait for
    done = {}  # tensors already copied, by where their values live: tied weights (wte = lm_head) are copied once

    def copy_of(value, old):
        if isinstance(value, torch.Tensor):
            key = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), value.shape,
                   value.stride(), value.dtype)
            if key in done:
                return done[key]
            if value.is_cuda:
                devices.add(value.device)
            same = isinstance(old, torch.Tensor) and (old.shape, old.dtype) == (value.shape, value.dtype)
            out = old if same else torch.empty(value.shape, dtype=value.dtype, pin_memory=value.is_cuda)
            done[key] = out.copy_(value.detach(), non_blocking=value.is_cuda)
            return out
        if isinstance(value, dict):
            old = old if isinstance(old, dict) else {}
            return {k: copy_of(v, old.get(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            old = old if isinstance(old, (list, tuple)) and len(old) == len(value) else [None] * len(value)
            return type(value)(copy_of(v, o) for v, o in zip(value, old))
        return copy.deepcopy(value)
    out = copy_of(state, into)
    for device in devices:
        torch.cuda.synchronize(device)  # the non-blocking copies have landed before anyone reads them
    return out


def diverged(message):
    return {"kind": "stop", "reason": "diverged", "message": message}
