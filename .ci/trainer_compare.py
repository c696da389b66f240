"""finetune.py's recipe through transformers' Trainer, to compare the two (README, "Against transformers'
Trainer"). Not part of the project, which uses no Trainer: run it in an environment of its own.

    python -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.13.0 'transformers>=5,<6' accelerate
    python convert_hf.py out/best.pt /tmp/cmp/hf            # any checkpoint of this project, exported
    OMP_NUM_THREADS=1 /tmp/tv/bin/python .ci/trainer_compare.py /tmp/cmp/hf TASK_DIR SEED
    OMP_NUM_THREADS=1 python finetune.py /tmp/cmp/hf config/finetune_tiny.py --task=TASK_DIR --seeds=3   # ours

TASK_DIR holds train/dev/test.jsonl with 'text' and 'label'. MPNetForSequenceClassification from the export,
15 epochs, batch 32, lr 5e-4, 10% warmup then linear, weight decay 0.01, clipping 1.0, 64 tokens, dropout 0.1
(the export's), each epoch evaluated on dev, the best one tested. Prints one JSON line."""
import json, sys, time
import numpy as np, torch
from transformers import (AutoTokenizer, AutoModelForSequenceClassification, Trainer, TrainingArguments,
                          DataCollatorWithPadding, set_seed)
hf, task, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.time()
rows = {s: [json.loads(l) for l in open(f'{task}/{s}.jsonl')] for s in ('train', 'dev', 'test')}
labels = sorted({r['label'] for r in rows['train']})
tok = AutoTokenizer.from_pretrained(hf)
class DS(torch.utils.data.Dataset):
    def __init__(self, rs):
        self.enc = tok([r['text'] for r in rs], truncation=True, max_length=64)
        self.y = [labels.index(r['label']) for r in rs]
    def __len__(self): return len(self.y)
    def __getitem__(self, i): return dict(input_ids=self.enc['input_ids'][i], attention_mask=self.enc['attention_mask'][i], labels=self.y[i])
ds = {s: DS(rs) for s, rs in rows.items()}
set_seed(seed)
model = AutoModelForSequenceClassification.from_pretrained(hf, num_labels=len(labels))
args = TrainingArguments(output_dir=f'/tmp/cmp/out{seed}', num_train_epochs=15, per_device_train_batch_size=32,
                         per_device_eval_batch_size=64, learning_rate=5e-4, warmup_steps=0.1, weight_decay=0.01,
                         lr_scheduler_type='linear', eval_strategy='epoch', save_strategy='epoch', save_total_limit=1,
                         load_best_model_at_end=True, metric_for_best_model='accuracy', seed=seed, report_to=[],
                         logging_strategy='no', disable_tqdm=True, use_cpu=True, max_grad_norm=1.0)
acc = lambda p: {'accuracy': float((p.predictions.argmax(-1) == p.label_ids).mean())}
trainer = Trainer(model=model, args=args, train_dataset=ds['train'], eval_dataset=ds['dev'],
                  data_collator=DataCollatorWithPadding(tok), compute_metrics=acc)
trainer.train()
dev = trainer.evaluate(ds['dev'])['eval_accuracy']
test = trainer.evaluate(ds['test'])['eval_accuracy']
print(json.dumps(dict(seed=seed, dev=dev, test=test, seconds=round(time.time() - t0, 1))))
