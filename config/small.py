# CPU quick start: a small character-level model on tiny-shakespeare, a few minutes on a 2-core laptop CPU.
#   python train.py config/small.py
# Tuned for the CPU, where every matmul costs real time: a small model and a high learning rate.
out_dir = "out-small"
dataset = "shakespeare_char"

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0  # too few steps to overfit
block_size = 64
batch_size = 12

learning_rate = 2e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 2e-4
warmup_iters = 50

eval_interval = 500
eval_iters = 20
log_interval = 50
device = "auto"
