"""A general-retrieval set for issue 42's "adapt without forgetting" (MEASUREMENTS.md): WordNet's definitions, each to find
its own usage example among 1,000, as a BEIR folder. The text is far from any user's domain and was written by nobody here.
Not part of the project: it needs Debian's wordnet-base package.

    apt-get download wordnet-base && dpkg -x wordnet-base_*.deb /tmp/wn
    python .ci/general_set.py /tmp/wn OUT        # -> OUT/wordnet/{corpus,queries}.jsonl, qrels/test.tsv
    python finetune.py MODEL --task=beir --eval_data=OUT/wordnet

A synset of data.noun or data.verb with a gloss and a quoted example gives a pair: the definition (the query) and its
first example (the document). 1,000 of them are kept, picked by the md5 of the synset's offset, so the set is rebuilt
byte for byte."""
import hashlib, json, pathlib, re, sys

src, out = pathlib.Path(sys.argv[1]) / 'usr/share/wordnet', pathlib.Path(sys.argv[2]) / 'wordnet'
pairs = []
for part in ('noun', 'verb'):
    for line in open(src / f'data.{part}', encoding='utf-8'):
        if line.startswith(' ') or '|' not in line:
            continue  # the licence header
        offset, gloss = line.split(' ', 1)[0], line.split('|', 1)[1].strip()
        examples = re.findall(r'"([^"]{20,})"', gloss)
        definition = gloss.split(';')[0].strip()
        if examples and len(definition) >= 20 and '"' not in definition:
            pairs.append((hashlib.md5(f'{part}{offset}'.encode()).hexdigest(), f'{part[0]}{offset}', definition, examples[0]))
pairs = sorted(pairs)[:1000]
(out / 'qrels').mkdir(parents=True, exist_ok=True)
with open(out / 'corpus.jsonl', 'w') as c, open(out / 'queries.jsonl', 'w') as q, open(out / 'qrels/test.tsv', 'w') as r:
    r.write('query-id\tcorpus-id\tscore\n')
    for _, key, definition, example in pairs:
        q.write(json.dumps({'_id': f'q{key}', 'text': definition}) + '\n')
        c.write(json.dumps({'_id': f'd{key}', 'title': '', 'text': example}) + '\n')
        r.write(f'q{key}\td{key}\t1\n')
print(f'wordnet/: {len(pairs):,} definitions, each to find its usage example among {len(pairs):,}')
