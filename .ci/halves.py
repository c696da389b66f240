"""contrastive.py's training pairs from raw text (--pairs=halves), written as text for another trainer: the first and
second half of each training document, cut at max_len tokens as contrastive.py cuts them, decoded. Held-out
documents (--eval_data) are left out as contrastive.py leaves them out. Not part of the project: it feeds
.ci/st_compare.py the same pairs contrastive.py trains on (MEASUREMENTS.md, "Adapting without forgetting").

    python .ci/halves.py MODEL train.jsonl heldout.jsonl OUT.jsonl [MAX_LEN]     # -> {"anchor": ..., "positive": ...}
"""
import json, os, sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import data, evaluation  # noqa: E402
from pairs import clip, raw_text, text_pairs  # noqa: E402

model, dataset, eval_data, out = sys.argv[1:5]
max_len = int(sys.argv[5]) if len(sys.argv) > 5 else 128
ckpt, tok = evaluation.load_model(model)
eos = data._special_ids(tok)['eos_id']
c = dict(data_dir='', dataset=dataset, eval_data=eval_data, val_frac=0.05, pairs='halves', text_field='text',
         txt_split='paragraph')
tokens, docs, held, said = raw_text(tok, eos, c)
spans = clip(text_pairs(docs, 'halves'), max_len)  # (2, n, 2): first halves, second halves
text = lambda a, b: tok.decode(tokens[a:b].tolist(), clean_up_tokenization_spaces=True).removeprefix('##')  # a half may start mid-word
with open(out, 'w') as f:
    for (a0, a1), (p0, p1) in zip(spans[0], spans[1]):
        f.write(json.dumps(dict(anchor=text(a0, a1), positive=text(p0, p1))) + '\n')
print(f'{out}: {spans.shape[1]:,} pairs' + ''.join(f'; {s}' for s in said))
