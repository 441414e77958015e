# The one-GPU recipe: a 10.7M-parameter character-level model on tiny-shakespeare.
#   python train.py config/shakespeare_char.py
# Small data (1M characters), so the model overfits without dropout; evaluate often and keep the best.
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
always_save_checkpoint = False  # keep only the checkpoint with the best val loss

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
block_size = 256  # characters of context
batch_size = 64

learning_rate = 1e-3  # small models tolerate a high peak learning rate
max_iters = 5000
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # 256 * 64 tokens per step is a small batch: average the second moment over more steps
warmup_iters = 100

eval_interval = 250
eval_iters = 200
log_interval = 10
