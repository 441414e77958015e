"""The whole training step as one CUDA graph (train.py: cuda_graphs = True).

A small model's step is a few hundred short kernels, and launching them from Python costs more time than
running them: the GPU waits for the CPU (measured on the 10.7M-parameter shakespeare-char model: 17 ms/step
eager, most of it launch overhead). A CUDA graph records the kernels of one step (forward and backward of every
micro-batch, gradient clipping, the fused AdamW update) once, then replays them with a single launch.

What a graph needs, and how this module provides it:
- fixed memory addresses: batches are copied into static input buffers; gradients, activations and the loss
  live in the graph's private memory pool; the learning rate is a tensor the step reads (set_lr fills it);
- no host synchronisation inside the step: fused AdamW with capturable=True, clipping without .item();
  float16 loss scaling is not captured here, so only bfloat16 or float32;
- warm-up before capture (cuBLAS handles, lazily created optimizer state): the first `warmup` steps run
  eagerly on a side stream. They are real training steps, so nothing is thrown away.
Dropout works: PyTorch advances the CUDA random generator's offset on every replay.
"""

import torch


class GraphedStep:
    def __init__(self, model, optimizer, grad_clip, ctx, warmup=3):
        if warmup < 1:  # AdamW creates its state on the first step: that must not happen inside the capture
            raise ValueError("GraphedStep needs at least one warm-up step")
        self.model, self.optimizer, self.grad_clip, self.ctx, self.warmup = model, optimizer, grad_clip, ctx, warmup
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.calls = 0
        self.graph = self.x = self.y = self.loss = None
        device = self.params[0].device
        for group in optimizer.param_groups:  # the graph must read the learning rate from device memory
            group["lr"] = torch.tensor(float(group["lr"]), device=device)

    def set_lr(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)  # in place: the recorded AdamW kernels read it from this memory

    def _step(self):
        """forward/backward of each micro-batch, clip, AdamW: the work the graph records."""
        accum = self.x.size(0)
        total = torch.zeros((), device=self.x.device)
        for i in range(accum):
            with self.ctx:
                _, loss = self.model(self.x[i], self.y[i])
                loss = loss / accum
            loss.backward()
            total += loss.detach()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        return total

    def __call__(self, x, y):
        """One optimizer step on micro-batches x, y of shape (accum, B, T); returns the mean loss (a device
        tensor that the next call overwrites)."""
        if self.x is None:
            self.x, self.y = torch.empty_like(x), torch.empty_like(y)
        self.x.copy_(x)
        self.y.copy_(y)
        self.calls += 1
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self._step()
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:  # record once; recording runs nothing, the replay below does the step
            self.optimizer.zero_grad(set_to_none=True)  # backward then allocates gradients in the graph's pool
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss = self._step()
        self.graph.replay()
        return self.loss
