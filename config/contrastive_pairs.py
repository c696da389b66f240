# contrastive fine-tuning on labelled pairs or triplets, as sentence-transformers' CachedMultipleNegativesRankingLoss
# trained all-mpnet-base-v2 (its model card: batch 1024, lr 2e-5, warmup 500, 128 tokens):
#   python contrastive.py sentence-transformers/all-mpnet-base-v2 config/contrastive_pairs.py --dataset=pairs.jsonl
#   python convert_hf.py out-contrastive-pairs/best.pt out-contrastive-pairs/st
out_dir = 'out-contrastive-pairs'
dataset = 'path/to/pairs.jsonl'  # anchor/positive(/negative), sentence1/sentence2 or query/document columns; .csv/.tsv too
pairs = 'labelled'
val_frac = 0.02                  # pairs held out by anchor text: each held-out anchor must find its positive among theirs
max_len = 128                    # the length all-mpnet-base-v2 was trained at (it embeds up to 384)
batch_size = 1024                # all-mpnet-base-v2's batch: 1023 in-batch negatives a pair (x GPUs under torchrun)
mini_batch_size = 32             # gradient caching: the memory of 32 texts, the exact gradient of 1024 pairs, ~1/3 more compute
learning_rate = 2e-5             # the rate all-mpnet-base-v2 was trained at, sentence-transformers' default
warmup_iters = 100               # 10% of the run, sentence-transformers' usual warmup
max_iters = 1000                 # 1M pairs
eval_interval = 100
