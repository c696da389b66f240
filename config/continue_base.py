# continue pretraining microsoft/mpnet-base on new text (domain adaptation)
out_dir = 'out-continue'
init_from = 'microsoft/mpnet-base' # weights and architecture from the hub (or a local HF folder)
dataset = 'HuggingFaceFW/fineweb-edu:sample-10BT'  # replace with your domain's text
tokenizer = 'microsoft/mpnet-base' # must be the model's own vocabulary
block_size = 512
batch_size = 32
gradient_accumulation_steps = 8
learning_rate = 1e-4             # gentle: the model is already trained
max_iters = 20_000
warmup_iters = 1000
lr_decay_iters = 20_000
eval_interval = 1000
eval_iters = 50
log_interval = 50
