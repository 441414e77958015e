# Learning rate x batch size for config/small.py on the CPU: a 3 x 3 grid of 500-step runs, about 5 minutes on
# 2 cores (docs/experiments.md has the table it gave). Give it after the recipe:
#   python -m tools.search config/small.py config/search_small.py
# Lists are grids; a distribution draws at random instead, e.g. (with --trials=8):
#   from tools.search import loguniform
#   learning_rate = loguniform(1e-3, 2e-2)
search_dir = "search-small"
learning_rate = [2e-3, 5e-3, 1e-2]
batch_size = [8, 16, 32]

max_iters = 500  # config/small.py trains 3000 steps; 500 ranks the settings in a tenth of the time
eval_interval = 100
eval_iters = 20
sample_tokens = 0
