# mpnet-large shape (24 layers x 1024, 16 heads): same recipe as base, smaller step
out_dir = 'out-large'
dataset = 'HuggingFaceFW/fineweb-edu:sample-10BT'
tokenizer = 'microsoft/mpnet-base'
block_size = 512
batch_size = 16                  # per GPU, per micro-step
gradient_accumulation_steps = 16 # 256 sequences per optimizer step on one GPU
n_layer = 24
n_head = 16
n_embd = 1024
n_inner = 4096
learning_rate = 3e-4
max_iters = 500_000
warmup_iters = 10_000
lr_decay_iters = 500_000
eval_interval = 1000
eval_iters = 50
log_interval = 50
