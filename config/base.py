# mpnet-base (Song et al. 2020): 12 layers x 768, 512-token blocks, mpnet-base's vocabulary
out_dir = 'out-base'
dataset = 'HuggingFaceFW/fineweb-edu:sample-10BT'  # prepare once: python data.py --dataset=... --num_proc=16
tokenizer = 'microsoft/mpnet-base'
block_size = 512
batch_size = 32                  # per GPU, per micro-step
gradient_accumulation_steps = 8  # 256 sequences per optimizer step on one GPU; the paper used 8192 on 32 GPUs
n_layer = 12
n_head = 12
n_embd = 768
n_inner = 3072
learning_rate = 6e-4             # the paper's peak for batch 8192; lower it for much smaller batches
max_iters = 500_000              # the paper: 500k steps
warmup_iters = 10_000            # the paper: 24k; shorter suits the smaller batch
lr_decay_iters = 500_000
eval_interval = 1000
eval_iters = 50
log_interval = 50
