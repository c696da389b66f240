# fine-tune a config/tiny.py model (4 x 128) on the built-in task: which standard-library package a docstring is from
task = 'pydocs'
max_len = 64                     # a docstring's first lines say what it is about; half the time of 128
epochs = 15                      # ~1,300 training docstrings; at 5 both pretrained and random init were still climbing
batch_size = 32
learning_rate = 5e-4             # a small model takes a far larger rate than mpnet-base's 2e-5
warmup_frac = 0.1
device = 'cpu'                   # also fine on a GPU: --device=cuda --dtype=bfloat16
dtype = 'float32'
