# continue microsoft/mpnet-base at 1,024 tokens: its position table grows by copying the learned rows (Longformer's
# scheme, Beltagy et al. 2020: RoBERTa 512 -> 4,096), the rest is continued pretraining with the never-lose rules
out_dir = 'out-long'
init_from = 'microsoft/mpnet-base' # or a checkpoint of this project, an HF or sentence-transformers folder
dataset = 'HuggingFaceFW/fineweb-edu:sample-10BT'  # your domain's long documents: only they teach the new positions
tokenizer = 'microsoft/mpnet-base' # the model's own vocabulary
max_positions = 1024             # above the checkpoint's 512: rows 512-1023 start as copies of rows 0-511
block_size = 1024
doc_mask = False                 # as the model was pretrained (packed blocks); True keeps documents apart, and then
                                 # only documents longer than 512 tokens reach the new positions (the log counts them)
batch_size = 16
gradient_accumulation_steps = 16 # 256 x 1,024 = 262k tokens a step: Longformer's 64 x 4,096
learning_rate = 3e-5             # Longformer's: the model is trained; the copies only need telling apart
warmup_iters = 500               # Longformer's
max_iters = 10_000               # 2.6B tokens; Longformer's loss was back at RoBERTa's within ~2k steps (it ran 65k)
lr_decay_iters = 10_000
eval_interval = 500              # each eval reports the loss at positions >= 512 apart (val_loss_far)
eval_iters = 50
