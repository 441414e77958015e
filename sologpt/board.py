"""TensorBoard output (tensorboard=True; the tensorboard package is optional): the scalars of every metrics.jsonl line
and, at each evaluation, a sample of the model's text, written to out_dir, so that

    tensorboard --logdir .

shows every run of the folder by its out_dir's name. A resumed run cuts the events at its first step (TensorBoard
drops what an earlier file logged from there on), as metrics.jsonl is cut."""

from importlib.util import find_spec

# metrics.jsonl keys that are not curves (the step is the x axis)
NOT_SCALARS = ("kind", "iter", "reason")
INSTALL_HINT = "pip install tensorboard (or pip install -e '.[dev]')"


def check(cfg):
    if cfg.tensorboard and find_spec("tensorboard") is None:
        raise ValueError(f"tensorboard=True needs the tensorboard package: {INSTALL_HINT}, or drop --tensorboard")


class Board:
    def __init__(self, log_dir, iter_num):
        from torch.utils.tensorboard import SummaryWriter  # optional: checked at start (check above)
        # purge_step: events an earlier run of this out_dir logged from this step on are dropped (a resume)
        self.writer = SummaryWriter(str(log_dir), purge_step=iter_num if iter_num else None)

    def scalars(self, kind, iter_num, record):
        """A metrics.jsonl record as scalars tagged kind/key: step/loss, eval/val_loss, rollback/loss, ..."""
        for key, value in record.items():
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{kind}/{key}", value, iter_num)

    def text(self, tag, text, iter_num):
        # markdown: indent four spaces so the sample shows as written (line breaks, no markup)
        self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), iter_num)

    def close(self):
        self.writer.close()
