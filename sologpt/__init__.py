"""sologpt: the library behind train.py, sample.py and the tools. model.py (the GPT itself) sits at the top level.

The run and its parts (what train.py calls, in order):
    configurator  dataclass defaults, config files, --key=value flags, type-checked; one-line UserError
    checks        every TrainConfig value checked before any work; each feature module checks its own (check)
    hardware      "auto" device and dtype, autocast, the float16 loss scaler, CUDA settings, MFU and peak memory
    batches       the prepared dataset (memmaps + meta.json), the micro-batches of a step, the LM evaluation
    rundir        out_dir: ckpt.pt / best.pt / last.pt / config.json / meta.json / metrics.jsonl, its lock, resume, Ctrl-C
    build         start point + switches (each a module swap, in a fixed order), loss wrappers, batch source
    checkpoint    the checkpoint format: atomic save, weights_only read, resume state, load_model for every kind,
                  locate (a run folder, a checkpoint file or a Hugging Face directory, by what is inside)
    monitor       the log line, evaluation lines, metrics.jsonl (read back by rundir.read_metrics), the progress bar
    guard         what a bad loss or a run that stopped improving leads to: early stopping, the spike guard
    cuda_graph    the training step replayed as one CUDA graph
    tokenizer     text <-> ids from a dataset's meta.json
    hf_gpt2       Hugging Face GPT-2 directories in and out; hf_tokenizer: their tokenizer files

One module per feature, each decided once at setup:
    classify (task head), freeze, lora, quantize (int8/int4 layers, QAT), nf4 (QLoRA's 4-bit base), fp8, memory
    (frozen weights in bf16/int8/nf4, micro-batch search, estimates), lean_optim (8-bit and bf16 AdamW states),
    muon, chunked_ce (chunked loss), distill (teacher), curriculum (sequence warmup, easy-first), inference (the
    batched generation engine), plots (curves to a PNG, plot=True), board (TensorBoard, tensorboard=True)
"""
