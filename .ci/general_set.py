"""General sets for issue 42's "adapt without forgetting" (MEASUREMENTS.md): what a model adapted to one domain should
not lose. Not part of the project: each comes from a package of a registry, fetched by hand, and is rebuilt byte for byte.

    pip download --no-deps gensim==4.4.0 -d /tmp/gs      # any gensim wheel: its tests ship the Lee corpus
    python .ci/general_set.py OUT /tmp/gs/gensim-*.whl    # -> OUT/lee.csv
    python contrastive.py MODEL ... --sts_data=OUT/lee.csv    # or: python finetune.py MODEL --task=sts --eval_data=OUT/lee.csv

    apt-get download wordnet-base && dpkg -x wordnet-base_*.deb /tmp/wn
    python .ci/general_set.py OUT /tmp/wn                 # -> OUT/wordnet/{corpus,queries}.jsonl, qrels/test.tsv (BEIR)

lee.csv: the Lee, Pincombe & Welsh (2005) document-similarity set, human-judged: 50 news articles of the Australian
Broadcasting Corporation, every one of the 1,225 pairs rated by about ten people (the mean, 0 to 1), as gensim's
test_lee.py reads it (lee.cor, similarities0-1.txt). all-mpnet-base-v2: Spearman 0.543, far below the ceiling; it is
the set on which plain contrastive fine-tuning loses general similarity.

wordnet/: WordNet's definitions, each to find its usage example among 1,000 (a synset of data.noun or data.verb with a
gloss and a quoted example: the definition is the query, its first example the document), picked by the md5 of the
synset's offset. all-mpnet-base-v2: nDCG@10 0.467; plain contrastive fine-tuning did not lose on it."""
import csv, hashlib, io, json, pathlib, re, sys, zipfile


def lee(wheel, out):
    try:
        with zipfile.ZipFile(wheel) as z:
            read = lambda name: z.read(f'gensim/test/test_data/{name}').decode('latin-1')
            docs, rows = read('lee.cor').splitlines(), read('similarities0-1.txt').splitlines()
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        sys.exit(f'error: {wheel} is not a gensim wheel with its test data ({e}): pip download --no-deps gensim')
    scores = [[float(x) for x in row.split()] for row in rows]
    assert len(docs) == len(scores) == 50, (len(docs), len(scores))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator='\n')
    w.writerow(['sentence1', 'sentence2', 'score'])
    for i in range(50):  # the upper triangle: the matrix holds each pair once
        for j in range(i + 1, 50):
            w.writerow([docs[i], docs[j], f'{scores[i][j]:.6g}'])
    (out / 'lee.csv').write_text(buf.getvalue(), encoding='utf-8')
    print(f'lee.csv: 1,225 pairs of 50 documents, human-judged (md5 {hashlib.md5(buf.getvalue().encode()).hexdigest()})')


def wordnet(src, out):
    src, out = src / 'usr/share/wordnet', out / 'wordnet'
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


if __name__ == '__main__':
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for source in map(pathlib.Path, sys.argv[2:]):
        lee(source, out) if source.suffix == '.whl' else wordnet(source, out)
