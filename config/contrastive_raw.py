# contrastive fine-tuning from raw text: the two halves of a document are a positive pair, the other documents of
# the batch its negatives (the retrieval the held-out evaluation measures). After pretraining here, long enough
# (12,000 iterations of config/tiny.py match or beat a random encoder, 4,000 lose with all pairs: see the README):
#   python contrastive.py out-tiny/best.pt config/contrastive_raw.py
#   python convert_hf.py out-contrastive-raw/best.pt out-contrastive-raw/st   # SentenceTransformer('out-contrastive-raw/st')
out_dir = 'out-contrastive-raw'
dataset = 'pydocs'               # config/tiny.py's corpus; your domain: a .txt/.jsonl/.parquet file or folder (or data_dir=)
pairs = 'halves'                 # two spans of one document; 'simcse' (a text twice, dropout the only noise) is the other way
val_frac = 0.05                  # documents held out by data.py's rule: their halves are the evaluation, never trained on
eval_pairs = 1000                # held-out pairs, each ranked against all the others: more is steadier, and slower
max_len = 128                    # config/tiny.py's max_positions; a longer document's halves are cut here
batch_size = 64                  # 63 in-batch negatives a pair, at the memory of 128 texts of 128 tokens
learning_rate = 1e-3             # swept at 100 steps (1e-4, 3e-4, 1e-3): 1e-3 best, pretrained or not (MEASUREMENTS.md)
max_iters = 1000                 # 64k pairs seen
warmup_iters = 100               # 10% of the run, sentence-transformers' usual warmup
eval_interval = 100
device = 'cpu'                   # as config/tiny.py; on a GPU: --device=cuda --dtype=bfloat16
dtype = 'float32'
