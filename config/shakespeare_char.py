# The one-GPU recipe: a 10.7M-parameter character-level model on tiny-shakespeare.
#   python train.py config/shakespeare_char.py
# Small data (1M characters), so the model overfits without dropout; evaluate often and keep the best.
# Measured on an H200 (docs/training.md, Results): best val 1.4458 at step 1750; val <= 1.47 26 s after process start.
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
always_save_checkpoint = False  # keep only the checkpoint with the best val loss

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
block_size = 256  # characters of context
batch_size = 64

learning_rate = 1e-3  # small models tolerate a high peak learning rate (2e-3 measured worse)
max_iters = 2500  # the best val loss comes at 1750 of 2500 steps; a 5000-step cosine got 1.4738 at 1500-1750
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # 256 * 64 tokens per step is a small batch: average the second moment over more steps
warmup_iters = 100

eval_interval = 250
eval_iters = 50  # 50 * 64 * 256 windows cover the 111k-token val split about 7 times over
log_interval = 50
# This model is too small to keep the GPU busy: eager steps are bound by Python and kernel launches.
# Replaying each step as one CUDA graph removes that (10.7-17 -> 7.8 ms/step on an H200), while torch.compile's
# ~14 s of start-up cost more than it saves over 2500 steps (measured; docs/performance.md)
compile = False
cuda_graphs = "auto"  # on for CUDA; off on CPU or MPS, where the recipe still runs, slowly
