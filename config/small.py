# CPU quick start: a small character-level model on tiny-shakespeare in under 3 minutes on 2 CPU cores.
#   python train.py config/small.py
# Tuned on a 2-core CPU (docs/training.md, Results): at a fixed time budget a shallow model that takes many steps at a
# high learning rate beat deeper or wider ones (3 or 4 layers, width 192) and longer contexts (block 128).
out_dir = "out-small"
dataset = "shakespeare_char"

n_layer = 2
n_head = 4
n_embd = 128
dropout = 0.0  # 3000 steps of 1024 tokens is about 3 passes over the data: too few to overfit
block_size = 64
batch_size = 16

learning_rate = 5e-3  # measured: 5e-3 beat 3e-3 and 2e-3 at this size
max_iters = 3000
min_lr = 5e-4
warmup_iters = 50

eval_interval = 1000
eval_iters = 50
log_interval = 100
