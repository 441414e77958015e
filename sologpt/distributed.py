"""More than one GPU (or CPU process): PyTorch's own torch.distributed, launched by torchrun.

    torchrun --standalone --nproc_per_node=2 train.py config/x.py                  # data parallel (DDP)
    torchrun --standalone --nproc_per_node=2 train.py config/x.py --parallel=fsdp  # sharded (FSDP2)

Plain `python train.py` runs none of this: setup() sees no torchrun variables and returns a single-process Dist
whose collectives are identities. Under torchrun, every part of the run stays what it is; this module adds, once at
setup, what data parallelism needs (docs/distributed.md):
- the global batch stays the config's: gradient_accumulation_steps micro-batches per optimizer step in all, split
  over the ranks; every rank draws the whole step's micro-batches from one generator seeded alike and keeps every
  world-th one (the batch sources), so a step trains on the same data whatever the number of ranks;
- the model wrapped for gradient averaging: DDP, syncing gradients only on a step's last micro-batch, or FSDP2
  (fully_shard per block, then the whole model), which shards parameters, gradients and optimizer state;
- evaluation averaged over ranks; rank 0 alone prints, writes metrics.jsonl and checkpoints; a stop (Ctrl-C,
  SIGTERM) is agreed by all ranks at a log step, so none hangs in a collective;
- checkpoints as one file a single process reads (FSDP gathers the full state to rank 0), in the single-process
  format: sample.py, tools/score.py and a later resume with any number of ranks read it.
"""

import datetime
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sologpt.configurator import UserError

TIMEOUT = datetime.timedelta(minutes=10)  # a collective that waits longer (a rank died or hangs) ends the job


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (even with one process: then DDP or FSDP with one rank)
    nodes: int = 1  # machines (torchrun --nnodes)

    @property
    def main(self):
        return self.rank == 0

    def sum(self, t):
        """The sum over ranks of a tensor (itself in a single process)."""
        if self.world == 1:
            return t
        t = t.detach().to(_device(), copy=True)
        dist.all_reduce(t)
        return t

    def mean(self, x):
        """The mean over ranks of a number (itself in a single process)."""
        return x if self.world == 1 else self.sum(torch.tensor(float(x), dtype=torch.float64)).item() / self.world

    def any(self, flag):
        """True on every rank if flag is True on any."""
        if self.world == 1:
            return flag
        t = torch.tensor(float(flag), device=_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def check(cfg):
    if cfg.parallel not in ("ddp", "fsdp"):
        raise ValueError(f"parallel={cfg.parallel!r} is unknown: use 'ddp' or 'fsdp'")


def setup(cfg):
    """The process group (NCCL on CUDA, gloo on the CPU) when torchrun started this process, else a single-process
    Dist. Refuses in one line what more than one rank cannot combine with, sets each rank's CUDA device, and quiets
    the standard output of every rank but 0. Call after the config checks (sologpt/cuda_graph.py turns CUDA graphs
    off under torchrun: the gradient exchange would run outside the graph)."""
    if "RANK" not in os.environ:
        if cfg.parallel == "fsdp":
            raise UserError("parallel='fsdp' shards the model over processes: start with torchrun "
                             "--nproc_per_node=N (docs/distributed.md), or drop --parallel")
        return Dist()
    world = int(os.environ["WORLD_SIZE"])
    d = Dist(int(os.environ["RANK"]), world, int(os.environ["LOCAL_RANK"]), launched=True,
             nodes=world // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    accum, nearest = cfg.gradient_accumulation_steps, d.world * max(1, round(cfg.gradient_accumulation_steps / d.world))
    refuse = [(accum % d.world, f"gradient_accumulation_steps={accum} (the micro-batches of one step, all ranks "
                                f"together) must be a multiple of the {d.world} ranks: set it to e.g. {nearest}"),
              (cfg.batch_size == "auto", "batch_size='auto' searches one process's memory: give a number"),
              (cfg.device not in ("auto", "cpu", "cuda"), f"device={cfg.device!r}: torchrun gives each rank its own "
                                                          f"GPU; use device=cuda (or cpu)")]
    if cfg.parallel == "fsdp":
        refuse += [(cfg.optimizer == "muon", "optimizer='muon' orthogonalises whole matrices, which FSDP shards: "
                                             "use optimizer='adamw'"),
                   (cfg.optim_state != "fp32", f"optim_state={cfg.optim_state!r} quantizes whole tensors, which FSDP "
                                               f"shards: use optim_state='fp32' (FSDP already shards the moments)"),
                   (cfg.base_dtype != "fp32", f"base_dtype={cfg.base_dtype!r} swaps in layers FSDP cannot shard: "
                                              f"use base_dtype='fp32'"),
                   (cfg.chunked_loss, "chunked_loss reads the model's hidden states outside its forward, where FSDP "
                                      "has the weights sharded: set chunked_loss=0"),
                   (cfg.lora_rank, "LoRA trains a few MB of adapters, which DDP replicates at no cost: use "
                                   "parallel='ddp'")]
    for bad, why in refuse:
        if bad:
            raise UserError(f"with {d.world} ranks: {why}")
    cuda = cfg.device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(d.local_rank)
        cfg.device = f"cuda:{d.local_rank}"
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    if not d.main:
        sys.stdout = open(os.devnull, "w")  # one log: rank 0's
    return d


def shard(model, cfg, d):
    """FSDP2 (parallel="fsdp" under torchrun): each block's parameters split over the ranks, then the rest (embeddings,
    final norm, output layer). fully_shard moves each block to this rank's GPU as it shards it, so a model larger
    than one card never sits whole on one; a block gathers its full weights only while it runs. Call before
    model.to(device) and before making the optimizer (which then holds the shards). Otherwise nothing happens."""
    if not fsdp(cfg, d):
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # bf16: the gathered weights and the matmuls in bf16, the gradients averaged in float32; the shards stay float32
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if cfg.dtype == "bfloat16" else MixedPrecisionPolicy()
    # the logits FSDP hands back are a slice (vocabulary padding); nothing changes them in place, which is what the
    # warning is about
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def wrap(loss_model, cfg, d):
    """DDP under torchrun (parallel="ddp"): the module the step calls, made to average gradients over the ranks.
    Unchanged in a single process or under FSDP (shard() did that)."""
    if not d.launched or cfg.parallel == "fsdp":
        return loss_model
    devices = [d.local_rank] if cfg.device.startswith("cuda") else None
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")  # torch 2.13; 2.11 has no successor
    # a classifier or tagger leaves an untied output layer unused: DDP must then look for parameters without gradients.
    # No buffer broadcast: the model's only buffers are derived (rotary frequencies), and it would make every forward
    # a collective, which evaluation (each rank its own share of the batches) cannot have
    return DistributedDataParallel(loss_model, device_ids=devices,
                                   find_unused_parameters=cfg.task in ("classify", "tag"), broadcast_buffers=False)


def sync_on_last(step, module):
    """The step, with DDP averaging gradients over ranks only in the backward of the step's last micro-batch: the
    others accumulate locally (what DDP's no_sync does). The step function stays the single-process one: DDP's
    flag is set as each micro-batch is taken, outside the (compiled) forward."""
    if not isinstance(module, DistributedDataParallel):
        return step
    return lambda micro_batches: step(SyncOnLast(micro_batches, module))


class SyncOnLast:
    def __init__(self, micro_batches, ddp):
        self.micro_batches, self.ddp = micro_batches, ddp

    def __len__(self):
        return len(self.micro_batches)

    def __iter__(self):
        for i, micro_batch in enumerate(self.micro_batches):
            self.ddp.require_backward_grad_sync = i == len(self.micro_batches) - 1
            yield micro_batch


def fsdp(cfg, d):
    return d.launched and cfg.parallel == "fsdp"


def model_state(model, cfg, d):
    """The full model state dict (FSDP: gathered to rank 0, on the CPU)."""
    if not fsdp(cfg, d):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model, optimizer, cfg, d):
    """The optimizer's state dict in the single-process layout (parameters numbered in the optimizer's order)."""
    if not fsdp(cfg, d):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.main:
        return {}
    index = {name: i for i, name in enumerate(param_names(model, optimizer))}
    return {"state": {index[name]: s for name, s in full["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]}


def load_optimizer_state(model, optimizer, state, cfg, d):
    """Load a single-process optimizer state dict (every rank reads the same file)."""
    if not fsdp(cfg, d):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = param_names(model, optimizer)
    full = {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def param_names(model, optimizer):
    """The names of the optimizer's parameters, in its order (the numbering of a state dict)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def resume_command(d, args):
    """The command that continues this run: python ..., or the same torchrun launch."""
    if not d.launched:
        return f"python {' '.join(args)}"
    nproc = d.world // d.nodes
    if d.nodes == 1:
        return f"torchrun --standalone --nproc_per_node={nproc} {' '.join(args)}"
    return f"torchrun <the same --nnodes, --node_rank and --rdzv_* flags> --nproc_per_node={nproc} {' '.join(args)}"


def close(d):
    """Tear the process group down. After a run that ended well, first wait until every rank is done (a rank that
    left early would close its connections while another still talks); after an error, at once (torchrun ends the
    others)."""
    if d.launched and dist.is_initialized():
        if d.world > 1 and sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()
