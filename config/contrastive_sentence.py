# make a sentence-embedding MPNet (sentence-transformers/all-mpnet-base-v2) better at retrieval on your domain,
# from raw text alone, without losing general similarity: the two halves of each of your documents are a positive
# pair, and each text is pulled toward the start model's embedding of it (distill). Measured (README, "Adapt a
# sentence-embedding model"): most of plain contrastive's in-domain gain, almost none of its general loss.
# Then export the same kind of sentence-transformers model:
#   python contrastive.py path/to/all-mpnet-base-v2 config/contrastive_sentence.py --dataset=my_docs.jsonl
#   python convert_hf.py out-contrastive-sentence/best.pt out-contrastive-sentence/st
# With a general set of your own (scored pairs: sentence1, sentence2, score), watch it: --sts_data=general.csv
out_dir = 'out-contrastive-sentence'
dataset = 'path/to/your/texts'   # .txt / .jsonl / .parquet documents of your domain (or data_dir=, prepared by data.py)
pairs = 'halves'                 # measured better than MLM adaptation; simcse is the other raw-text way
val_frac = 0.05                  # documents held out: the in-domain retrieval that picks best.pt (or eval_data=)
eval_pairs = 1000
max_len = 128                    # the length all-mpnet-base-v2 was trained at; each half is cut here
batch_size = 64                  # measured at 16 on a CPU; more negatives help (all-mpnet-base-v2 trained at 1024)
mini_batch_size = 0              # at batch 256+: 32 keeps memory at 32 texts (gradient caching, exact)
learning_rate = 2e-5             # the rate all-mpnet-base-v2 was trained at: a trained space wants small steps
max_iters = 300
warmup_iters = 30                # 10% of the run, sentence-transformers' usual warmup
eval_interval = 100
distill = 3.0                    # the start's embeddings kept: 1 keeps all the gain, half the loss; 10 no loss, half the gain
