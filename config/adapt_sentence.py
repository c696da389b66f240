# adapt a sentence-embedding MPNet (sentence-transformers/all-mpnet-base-v2) to your domain's text, then
# export the same sentence-transformers model: python convert_hf.py out-adapt/best.pt out-adapt/st
out_dir = 'out-adapt'
init_from = 'sentence-transformers/all-mpnet-base-v2'  # or a local copy of the folder; its modules travel to the export
dataset = 'path/to/your/texts'   # a .txt / .jsonl / .parquet file or folder of your domain
tokenizer = 'sentence-transformers/all-mpnet-base-v2'  # the model's own vocabulary
block_size = 384                 # its max_seq_length: adapt at the length it embeds
batch_size = 32
gradient_accumulation_steps = 1
head_warmup_iters = 500          # its MLM head is new: train it alone first, so a random head cannot push the encoder
head_warmup_lr = 1e-3
learning_rate = 2e-5             # gentle: the embedding geometry is what you want to keep
warmup_iters = 1500              # counted from iteration 0: the encoder ramps up over the 1000 after the head warmup
lr_decay_iters = 10_000
max_iters = 10_000
eval_interval = 500
eval_iters = 50
probe = True                     # watch the embeddings: probe_found should not fall, probe_cos should not climb
