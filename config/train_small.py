# GPU demo: the 'small' preset (16 layers, hidden 512, 8 experts top-2: ~97M active / ~325M total parameters)
# on the default stdlib dataset with the byte tokenizer, 7 minutes on one H100 (measured: README, "Quick start (one GPU)"):
#     python train.py config/train_small.py
#     torchrun --standalone --nproc_per_node=8 train.py config/train_small.py --gradient_accumulation_steps=8
#     python sample.py --out_dir=out-small
# Byte tokens: the stdlib is small (10.3M byte tokens; cl100k_base turns it into only 2.3M), and with a
# 320-row vocabulary instead of 100k nearly all the compute goes to the layers.
out_dir = "out-small"
preset = "small"
dataset = "stdlib"
tokenizer = "byte"
seq_len = 1024
batch_size = 16                   # 16,384 tokens per micro-batch: ~4k rows per expert, enough for grouped GEMMs
gradient_accumulation_steps = 2   # 32,768 tokens per optimizer step
max_iters = 2000                  # ~66M tokens, ~7 passes over the data: val loss is lowest near step 670 (0.717
                                  # nats/byte on an H100) and rises after, as the model memorises the stdlib
warmup_iters = 100
learning_rate = 1e-3
min_lr_frac = 0.1
eval_interval = 333
eval_iters = 20
log_interval = 25
compile = False                   # the lightning Triton kernels are custom autograd Functions; try --compile
