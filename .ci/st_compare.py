"""contrastive.py's recipe through sentence-transformers' own trainer, to compare the two (README, "Against
sentence-transformers"). Not part of the project: it needs accelerate, which the project does not.

    python -m venv --system-site-packages /tmp/stv && /tmp/stv/bin/pip install accelerate
    python convert_hf.py out-tiny/best.pt /tmp/st/hf                           # the model both sides start from
    OMP_NUM_THREADS=1 /tmp/stv/bin/python .ci/st_compare.py /tmp/st/hf PAIRS.jsonl OUT SEED [MINI_BATCH [STEPS [BATCH LR WARMUP]]]
    OMP_NUM_THREADS=1 python contrastive.py out-tiny/best.pt --pairs=labelled --dataset=PAIRS.jsonl ...  # ours

PAIRS.jsonl holds 'anchor' and 'positive' (.ci/halves.py writes contrastive.py's halves so). MultipleNegativesRankingLoss
(scale 20), or its cached version with MINI_BATCH (0: plain), batch 64 without duplicates in a batch, lr 1e-4, 10
warmup steps then linear (or BATCH, LR, WARMUP), 100 steps (or STEPS),
weight decay 0.01, clipping 1.0, 128 tokens, mean pooling. Saves the model to OUT; prints one JSON line (seconds,
seconds a step, peak RSS)."""
import json, resource, sys, time
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments, losses
from sentence_transformers.training_args import BatchSamplers
from transformers import set_seed
hf, pairs, out, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
mini = int(sys.argv[5]) if len(sys.argv) > 5 else 0
steps = int(sys.argv[6]) if len(sys.argv) > 6 else 100
batch, lr, warmup = (int(sys.argv[7]), float(sys.argv[8]), int(sys.argv[9])) if len(sys.argv) > 9 else (64, 1e-4, 10)
set_seed(seed)
rows = [json.loads(l) for l in open(pairs)]
model = SentenceTransformer(hf, device='cpu')
model.max_seq_length = 128
loss = (losses.CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=mini) if mini else
        losses.MultipleNegativesRankingLoss(model, scale=20.0))
args = SentenceTransformerTrainingArguments(output_dir=out + '-trainer', per_device_train_batch_size=batch, learning_rate=lr,
                                            warmup_steps=warmup, max_steps=steps, weight_decay=0.01, max_grad_norm=1.0,
                                            lr_scheduler_type='linear', seed=seed, report_to=[], logging_strategy='no',
                                            save_strategy='no', disable_tqdm=True, use_cpu=True,
                                            batch_sampler=BatchSamplers.NO_DUPLICATES)
t0 = time.time()
SentenceTransformerTrainer(model=model, args=args, loss=loss,
                           train_dataset=Dataset.from_list([dict(anchor=r['anchor'], positive=r['positive']) for r in rows])).train()
seconds = time.time() - t0
model.save(out)
print(json.dumps(dict(seed=seed, mini_batch=mini, seconds=round(seconds, 1), ms_per_step=round(seconds / steps * 1000),
                      max_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))))
