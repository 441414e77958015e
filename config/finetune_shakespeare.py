# Continued pretraining of GPT-2 on tiny-shakespeare (GPT-2 BPE tokens), on one GPU.
#   python prepare/shakespeare.py
#   python train.py config/finetune_shakespeare.py --init_from=path/to/gpt2   # a Hugging Face GPT-2 directory
# The weights fix the model's shape; block_size crops its 1024 positions. A small learning rate and a short
# schedule: the model already knows English, it only has to learn the style (and should not forget the rest).
out_dir = "out-ft-shakespeare"
dataset = "shakespeare"
init_from = "gpt2"  # replace on the command line with the directory holding config.json + model.safetensors
block_size = 512
batch_size = 8
gradient_accumulation_steps = 4  # 32 x 512 = 16k tokens per step
vocab_pad_multiple = 64  # a faster output matmul on GPUs; export drops the padding again
learning_rate = 3e-5
min_lr = 3e-6
warmup_iters = 20
max_iters = 300
eval_interval = 50
eval_iters = 40
dropout = 0.1
always_save_checkpoint = False  # keep the best model: fine-tuning overfits 1 MB of text quickly
