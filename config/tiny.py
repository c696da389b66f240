# a few-million-parameter MPNet on the built-in pydocs corpus: learns visibly on 2 CPU cores in ~5 minutes
out_dir = 'out-tiny'
dataset = 'pydocs'               # Python's own documentation, built on first run (no download)
tokenizer = 'train'              # WordPiece learned on the corpus, saved with the prepared data
vocab_size = 8192
val_frac = 0.05                  # ~20k validation tokens
block_size = 128
batch_size = 16
n_layer = 4
n_head = 4
n_embd = 128
n_inner = 512
max_positions = 128
learning_rate = 1e-3             # escapes the unigram plateau sooner than 2e-3 or 5e-4
max_iters = 1000
warmup_iters = 30
lr_decay_iters = 1000
eval_interval = 100
eval_iters = 10
log_interval = 10
device = 'cpu'                   # also fine on a GPU: --device=cuda --dtype=bfloat16
dtype = 'float32'
compile = False
