"""The training step replayed as one CUDA graph (train.py: cuda_graphs = "auto", the default, or True).

A small model's step is a few hundred short kernels, and launching them from Python costs more time than
running them: the GPU waits for the CPU (measured on the 10.7M-parameter shakespeare-char model: 17 ms/step
eager, most of it launch overhead). A CUDA graph records the kernels of one step (forward and backward of every
micro-batch, gradient clipping, the optimizer update) once, then replays them with a single launch.

GraphedStep wraps train.py's train_step itself, not a copy of it: whatever that step does (a classifier's row
lengths, a teacher's loss, an easy-first batch) is what the graph records. What a graph needs, and how it is met:
- fixed memory addresses: each step's micro-batches are copied into static buffers the graph reads; gradients,
  activations and the loss live in the graph's private memory pool; the learning rate is a tensor (set_lr fills
  it in place);
- the same shapes every step: sequence-length warmup, whose batches change shape, cannot be captured;
- no host synchronisation inside the step: fused AdamW or Muon with capturable=True, clipping without .item();
  float16 loss scaling (which checks for overflow on the host) and the lean optimizer states cannot be captured;
- warm-up before capture (cuBLAS handles, lazily created optimizer state): the first `warmup` steps run
  eagerly on a side stream. They are real training steps, so nothing is thrown away.
Dropout works: PyTorch advances the CUDA random generator's offset on every replay.
"""

import os

import torch

from sologpt.configurator import resolve_auto_bool


def resolve(cfg):
    """cuda_graphs: "auto" (train.py's default) -> on where a graph can record the step, else off (on CUDA with a
    one-line note saying why; on the CPU or MPS silently, as there is no graph there); True where it cannot ->
    ValueError."""
    needs = []
    if cfg.device not in ("cuda", "cuda:0"):
        needs.append(f"device cuda or cuda:0 (here {cfg.device!r}; pick another card with CUDA_VISIBLE_DEVICES)")
    if cfg.dtype == "float16":
        needs.append("bfloat16 or float32 (float16 loss scaling checks for overflow on the host)")
    if cfg.optim_state != "fp32":
        needs.append(f"optim_state 'fp32' (the lean optimizer states are not capturable; here {cfg.optim_state!r})")
    if cfg.optimizer == "galore" or cfg.update_in_backward or cfg.weights_dtype != "fp32":
        needs.append("no optimizer 'galore', update_in_backward or weights_dtype 'bf16' (sologpt/galore.py's updates "
                     "are not capturable)")
    if cfg.seq_warmup_iters:
        needs.append("no seq_warmup_iters (a graph replays one batch shape)")
    if cfg.spike_guard:
        needs.append("no spike_guard (a rollback loads optimizer state into new tensors, which the graph never reads)")
    if "RANK" in os.environ:  # started by torchrun
        needs.append("plain python, not torchrun (the gradient exchange runs on NCCL's streams, outside the graph)")
    auto = cfg.cuda_graphs == "auto"  # the default
    cfg.cuda_graphs = resolve_auto_bool("cuda_graphs", cfg.cuda_graphs, not needs)
    if cfg.cuda_graphs and needs:
        raise ValueError(f"cuda_graphs=True needs {'; '.join(needs)}: set cuda_graphs=False or 'auto'")
    if auto and needs and cfg.device.startswith("cuda") and os.environ.get("RANK", "0") == "0":
        print(f"note: cuda_graphs='auto' is off for this run: a CUDA graph needs {'; '.join(needs)}")


class GraphedStep:
    """step(batches) -> loss, recorded once as a CUDA graph and replayed. The optimizer's learning rate becomes a
    device tensor that the graph reads (train.set_lr fills it)."""

    def __init__(self, step, optimizer, device, warmup=3):
        if warmup < 1:  # AdamW creates its state on the first step: that must not happen inside the capture
            raise ValueError("GraphedStep needs at least one warm-up step")
        self.step, self.warmup, self.calls = step, warmup, 0
        self.graph = self.static = self.loss = None
        for group in optimizer.param_groups:  # the graph must read the learning rate from device memory
            group["lr"] = torch.tensor(float(group["lr"]), device=device)

    def __call__(self, batches):
        if self.static is None:  # the buffers the graph reads: one per tensor of every micro-batch
            self.static = [(torch.empty_like(x), torch.empty_like(y), {k: torch.empty_like(v) for k, v in kw.items()})
                           for x, y, kw in batches]
        for (x, y, kw), (sx, sy, skw) in zip(batches, self.static, strict=True):
            sx.copy_(x)
            sy.copy_(y)
            for k, v in kw.items():
                skw[k].copy_(v)
        self.calls += 1
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self.step(self.static)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:  # record once; recording runs nothing, the replay below does the step
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss = self.step(self.static)
        self.graph.replay()
        return self.loss
