"""The corpora of README's "Adapt a sentence-embedding model" measurement (MEASUREMENTS.md): real text this project
did not write, from Debian packages. Not part of the project: it needs root for apt and Debian's archive.

    apt-get download linux-doc-6.1 && dpkg -x linux-doc-6.1_*.deb /tmp/linux-doc
    apt-get install -y diatheke sword-text-web sword-text-kjv
    python .ci/adapt_corpus.py /tmp/linux-doc OUT

OUT/train.jsonl, OUT/heldout.jsonl: the kernel's Documentation/*.rst (index pages and lines of rst markup dropped,
100 words or more), split by document, 1 in 10 held out by the md5 of its path. OUT/bible/: 1,000 verses of the
World English Bible, each to find the same verse in the King James Version, as a BEIR folder (corpus.jsonl,
queries.jsonl, qrels/test.tsv): a general paraphrase set far from the domain."""
import gzip, hashlib, json, pathlib, random, re, subprocess, sys

src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
root = next(src.glob('usr/share/doc/linux-doc-*/Documentation'))
docs = []
for p in sorted(root.rglob('*.rst.gz')):
    if p.name.startswith('index.'):
        continue
    lines = gzip.open(p, 'rt', errors='replace').read().splitlines()
    text = '\n'.join(l for l in lines if not re.match(r'^\s*(\.\. |:[A-Za-z]+:|[=\-~^*#+`]{3,}\s*$)', l))
    text = re.sub(r'\n{3,}', '\n\n', text).strip()
    if len(text.split()) >= 100:
        docs.append(dict(text=text, source=str(p.relative_to(root))))
held_out = lambda d: int(hashlib.md5(d['source'].encode()).hexdigest(), 16) % 10 == 0
out.mkdir(parents=True, exist_ok=True)
for name, part in (('train', [d for d in docs if not held_out(d)]), ('heldout', [d for d in docs if held_out(d)])):
    with open(out / f'{name}.jsonl', 'w') as f:
        f.writelines(json.dumps(d) + '\n' for d in part)
    print(f'{name}.jsonl: {len(part):,} documents, {sum(len(d["text"].split()) for d in part):,} words')


def verses(module, book):
    """{'John 3:16': text} of one book, markup stripped; verses of 8 words or more."""
    found = {}
    for line in subprocess.run(['diatheke', '-b', module, '-k', book], capture_output=True, text=True).stdout.splitlines():
        m = re.match(r'^([1-3]?\s?[A-Za-z ]+ \d+:\d+): (.*)$', line)
        text = m and re.sub(r'\s+', ' ', re.sub(r'<[^>]+>', '', m.group(2)).replace('¶', '')).strip()
        if m and len(text.split()) >= 8:
            found[m.group(1)] = text
    return found


pairs = []
for book in ['Matthew', 'Mark', 'Luke', 'John', 'Acts', 'Romans', 'Proverbs', 'Psalms', 'Genesis', 'Isaiah']:
    web, kjv = verses('engWEB2015eb', book), verses('engKJV2006eb', book)
    pairs += [(web[k], kjv[k]) for k in web if k in kjv]
random.Random(0).shuffle(pairs)
bible = out / 'bible'
(bible / 'qrels').mkdir(parents=True, exist_ok=True)
with open(bible / 'corpus.jsonl', 'w') as c, open(bible / 'queries.jsonl', 'w') as q, open(bible / 'qrels/test.tsv', 'w') as r:
    r.write('query-id\tcorpus-id\tscore\n')
    for i, (modern, kjv) in enumerate(pairs[:1000]):
        c.write(json.dumps({'_id': f'd{i}', 'title': '', 'text': kjv}) + '\n')
        q.write(json.dumps({'_id': f'q{i}', 'text': modern}) + '\n')
        r.write(f'q{i}\td{i}\t1\n')
print(f'bible/: {min(len(pairs), 1000):,} verse pairs')
